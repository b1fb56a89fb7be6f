"""The reader and decoder stages on the host: read and hash one file, decode and crop it."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING

from retrieval.errors import ImageReadError, SkipReason
from retrieval.extraction.types import FileRecord, StageTimes
from retrieval.images.decode import convert_mode, load_image
from retrieval.images.signing import signature_of_decoded
from retrieval.model.preprocess import Preprocessing

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)


def read_file(position: int, path: str) -> tuple[FileRecord, bytearray | None, StageTimes]:
    """Stat, read and hash one file; an unreadable one is a record with a reason."""
    record, times = FileRecord(position, path), StageTimes()
    start = time.perf_counter()
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            record.size, record.mtime_ns = stat.st_size, stat.st_mtime_ns
            data = bytearray(stat.st_size)
            got = handle.readinto(data)
            if got != stat.st_size:  # the file changed under us: keep what is there
                data = data[:got] + bytearray(handle.read())
    except OSError as exc:
        record.reason, record.detail = SkipReason.UNREADABLE.value, exc.strerror or str(exc)
        return record, None, times
    record.sha256 = hashlib.sha256(data).hexdigest()
    times.read = time.perf_counter() - start
    return record, data, times


def crop_file(
    position: int,
    path: str,
    preprocessing: Preprocessing,
    max_megapixels: float,
    sign: bool = False,
) -> tuple[FileRecord, torch.Tensor | None, StageTimes]:
    """Read, hash, decode and crop one file (``sign``: and sign it); a bad file is a record
    with a reason and no pixels."""
    record, data, times = read_file(position, path)
    if data is None:
        return record, None, times
    return record, decode_on_cpu(record, data, times, preprocessing, max_megapixels, sign), times


def decode_on_cpu(
    record: FileRecord,
    data: bytes | bytearray,
    times: StageTimes,
    preprocessing: Preprocessing,
    max_megapixels: float,
    sign: bool = False,
) -> torch.Tensor | None:
    """Pillow decode, resize and crop to uint8; a bad file sets the record's reason instead.
    ``sign``: also set the record's signature, from the same decode where it can."""
    start = time.perf_counter()
    try:
        image = load_image(
            data,
            mode=preprocessing.mode,
            max_megapixels=max_megapixels,
            draft_size=preprocessing.resize,
            path_for_errors=record.path,
        )
    except ImageReadError as exc:
        record.reason, record.detail = exc.reason, exc.detail
        return None
    decoded = time.perf_counter()
    times.decode += decoded - start
    if sign:
        _sign(record, data, image, preprocessing)
        times.sign += time.perf_counter() - decoded
        decoded = time.perf_counter()
    pixels = preprocessing.resize_and_crop(image)
    times.preprocess += time.perf_counter() - decoded
    return pixels


def _sign(
    record: FileRecord, data: bytes | bytearray, image: Image.Image, preprocessing: Preprocessing
) -> None:
    """The record's signature; a file the model could use but the signature cannot (a second
    decode failing) keeps none, and the duplicates pass tries again from the file."""
    try:
        record.signature = signature_of_decoded(
            data, image, preprocessing.mode, preprocessing.resize
        )
    except Exception as exc:  # a signature is a cache: nothing it raises may cost the row
        log.debug("%s: no signature (%s)", record.path, exc)


def crop_in_memory(
    position: int,
    image: bytes | bytearray | Image.Image,
    preprocessing: Preprocessing,
    max_megapixels: float,
) -> tuple[FileRecord, torch.Tensor | None]:
    """An image given as bytes (an upload) or as a PIL image, through the same safe decoding
    and cropping as a file; a bad one gets the record a bad file gets."""
    from PIL import Image

    if isinstance(image, Image.Image):
        record = FileRecord(position, f"<image {position}>")
        if image.width * image.height > max_megapixels * 1e6:
            record.reason = SkipReason.TOO_LARGE.value
            record.detail = f"{image.width}x{image.height}, over {max_megapixels:g} MP"
            return record, None
        return record, preprocessing.resize_and_crop(convert_mode(image, preprocessing.mode))
    data = bytes(image)
    record = FileRecord(position, f"<upload {position}>", size=len(data))
    record.sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        record.reason = SkipReason.EMPTY.value
        return record, None
    pixels = decode_on_cpu(record, data, StageTimes(), preprocessing, max_megapixels)
    return record, pixels
