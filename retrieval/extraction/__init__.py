"""Files to fc7 features: reader -> decoder -> preprocess -> model (mapper), each stage timed.

Two paths share the records, the options and the mapper (:mod:`retrieval.extraction.mapper`):

- CPU: worker processes read each file, hash it, decode it safely (Pillow, JPEG draft mode) and
  resize and crop it to uint8; the main process normalises whole batches and runs the model.
- CUDA (:mod:`retrieval.extraction.cuda`): threads read and hash bytes ahead of the GPU, which
  decodes JPEGs in batches with nvjpeg and resizes, crops and normalises them; whatever nvjpeg
  cannot take is decoded on the CPU in those threads.

A file that cannot be used comes back as a record with a reason instead of pixels, so a bad file
never stops the run and ids stay aligned with paths. Output is one batch at a time, so memory
does not grow with the number of files. Stage times show a slow stage (``--verbose``,
``bench/extract.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.extraction.types import (
    CPU_BATCH,
    GPU_BATCH,
    ExtractedBatch,
    ExtractOptions,
    FileRecord,
    StageTimes,
)
from retrieval.images.decode import DEFAULT_MAX_MEGAPIXELS

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from retrieval.extraction.mapper import Fc7Mapper
    from retrieval.model.weights import LoadedModel

__all__ = [
    "ExtractOptions",
    "ExtractedBatch",
    "FileRecord",
    "StageTimes",
    "embed_decoded",
    "extract_fc7",
    "extract_images",
    "make_mapper",
]


def make_mapper(loaded: LoadedModel, options: ExtractOptions = ExtractOptions()) -> Fc7Mapper:
    """The model stage for these options, to build once and pass to every call that runs it."""
    from retrieval.devices import resolve_device
    from retrieval.extraction.mapper import Fc7Mapper

    device = resolve_device(options.device)
    precision = options.precision or "fp32"
    return Fc7Mapper(loaded, device, precision, options.channels_last, options.compile)


def extract_fc7(
    paths: Sequence[Path],
    loaded: LoadedModel,
    options: ExtractOptions = ExtractOptions(),
    mapper: Fc7Mapper | None = None,
) -> Iterator[ExtractedBatch]:
    """fc7 features of ``paths`` in order, one batch at a time (memory stays flat).

    torch and the runners are imported here, not at the top: naming the options and records
    (``info``, a re-index with nothing to do) must not pay for them. ``mapper``: a model stage
    kept by the caller (``Index`` keeps one), else one is made for this call.
    """
    mapper = mapper or make_mapper(loaded, options)
    device = mapper.device
    if options.batch_size is None:
        options = replace(options, batch_size=GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    if device.type == "cuda":
        from retrieval.extraction.cuda import extract_on_device

        yield from extract_on_device(paths, loaded, mapper, options)
    else:
        from retrieval.extraction.cpu import extract_on_cpu

        yield from extract_on_cpu(paths, loaded, mapper, options)


def extract_images(
    paths: Sequence[Path],
    loaded: LoadedModel,
    options: ExtractOptions = ExtractOptions(),
    mapper: Fc7Mapper | None = None,
) -> tuple[np.ndarray, list[FileRecord]]:
    """All at once, for a handful of query images: features of the good ones and every record."""
    records: list[FileRecord] = []
    chunks = []
    for batch in extract_fc7(paths, loaded, options, mapper):
        records.extend(batch.records)
        chunks.append(batch.features)
    import numpy as np

    if chunks:
        return np.concatenate(chunks), records
    return np.zeros((0, loaded.fc7_dim), np.float32), records


def embed_decoded(
    images: Sequence[bytes | Image.Image],
    mapper: Fc7Mapper,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    *,
    flip: bool = False,
) -> tuple[np.ndarray, list[FileRecord]]:
    """fc7 of images already in memory (uploads, PIL images), decoded as files are: a bad one
    gets a record with the reason a file would get, and no row of features. ``flip``: the mean
    of the image's fc7 and its mirror image's (the paper's test-time flips, section 4.1)."""
    import numpy as np
    import torch

    from retrieval.extraction.reader import crop_in_memory

    records, crops = [], []
    if mapper.device.type == "cuda":
        # Bytes take the files' road on a GPU (nvjpeg for the JPEGs it takes), so a query by
        # bytes gets the vector a query by path gets; PIL images are already decoded.
        records, batch = _on_device(images, mapper, max_megapixels)
    else:
        for position, image in enumerate(images):
            record, pixels = crop_in_memory(position, image, mapper.preprocessing, max_megapixels)
            records.append(record)
            if pixels is not None:
                crops.append(pixels)
        batch = torch.stack(crops).to(mapper.device) if crops else None
    if batch is None:
        return np.zeros((0, mapper.out_features), np.float32), records
    features = mapper(batch)
    if flip:
        features = (features + mapper(batch.flip(-1))) / 2
    return features.cpu().numpy(), records


def _on_device(
    images: Sequence[bytes | Image.Image], mapper: Fc7Mapper, max_megapixels: float
) -> tuple[list[FileRecord], torch.Tensor | None]:
    """Records and a uint8 batch on the mapper's CUDA device, decoded as files are there."""
    import hashlib

    from PIL import Image

    from retrieval.errors import SkipReason
    from retrieval.extraction.cuda import crops_on_device, route
    from retrieval.extraction.reader import crop_in_memory

    items = []
    for position, image in enumerate(images):
        if isinstance(image, Image.Image):
            record, pixels = crop_in_memory(position, image, mapper.preprocessing, max_megapixels)
            items.append((record, pixels, StageTimes()))
            continue
        data = bytearray(image)
        record, times = FileRecord(position, f"<upload {position}>", size=len(data)), StageTimes()
        record.sha256 = hashlib.sha256(data).hexdigest()
        if not data:
            record.reason = SkipReason.EMPTY.value
            items.append((record, None, times))
            continue
        payload = route(record, data, times, mapper.preprocessing, max_megapixels)
        items.append((record, payload, times))
    batch = crops_on_device(items, mapper.preprocessing, mapper.device, max_megapixels)
    return [record for record, _, _ in items], batch
