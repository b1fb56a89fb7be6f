"""Files to fc7 features: reader -> decoder -> preprocess -> model (mapper), each stage timed.

Two paths share the records, the options and the mapper (:mod:`retrieval.mapper`):

- CPU: worker processes read each file, hash it, decode it safely (Pillow, JPEG draft mode) and
  resize and crop it to uint8; the main process normalises whole batches and runs the model.
- CUDA (:mod:`retrieval.extract_cuda`): threads read and hash bytes ahead of the GPU, which
  decodes JPEGs in batches with nvjpeg and resizes, crops and normalises them; whatever nvjpeg
  cannot take is decoded on the CPU in those threads.

A file that cannot be used comes back as a record with a reason instead of pixels, so a bad file
never stops the run and ids stay aligned with paths. Output is one batch at a time, so memory
does not grow with the number of files. Stage times show a slow stage (``--verbose``,
``bench/extract.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .devices import resolve_device
from .errors import ImageReadError, SkipReason
from .images import DEFAULT_MAX_MEGAPIXELS, load_image
from .mapper import Fc7Mapper
from .preprocess import Preprocessing
from .weights import LoadedModel

log = logging.getLogger(__name__)

# Below this many files, starting worker processes costs more than it saves.
MIN_FILES_FOR_WORKERS = 64
# Default batch sizes: on the CPU 32, 64 and 128 ran alike; a GPU needs more work per launch.
CPU_BATCH = 64
GPU_BATCH = 256


@dataclass(frozen=True)
class ExtractOptions:
    """How to run extraction; ``None`` means the default measured best for this machine."""

    device: str = "auto"
    batch_size: int | None = None  # None: CPU_BATCH or GPU_BATCH
    workers: int | None = None  # CPU: decoder processes; CUDA: reader threads
    precision: str = "fp32"  # "bf16" or "int8" (CPU): faster, slightly different numbers
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    channels_last: bool = True
    threads: int | None = None  # torch threads for the CPU model; None: every core
    compile: bool = False  # torch.compile the model (a one-off warm-up of tens of seconds)


@dataclass
class FileRecord:
    """What the reader learnt about one file, whether or not it could be used."""

    position: int
    path: str
    size: int = -1
    mtime_ns: int = -1
    sha256: str = ""
    reason: str | None = None  # None: decoded and in this batch's features
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class StageTimes:
    """Seconds spent in each stage; reader stages are summed over workers (busy time)."""

    read: float = 0.0
    decode: float = 0.0
    preprocess: float = 0.0
    model: float = 0.0
    write: float = 0.0
    wall: float = 0.0
    images: int = 0
    skipped: int = 0

    def add(self, other: StageTimes) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        rate = self.images / self.wall if self.wall > 0 else 0.0
        return (
            f"{self.images} images in {self.wall:.1f}s ({rate:.1f} images/s); busy time: "
            f"read {self.read:.1f}s, decode {self.decode:.1f}s, preprocess {self.preprocess:.1f}s "
            f"(summed over workers), model {self.model:.1f}s, write {self.write:.1f}s"
        )


@dataclass
class ExtractedBatch:
    """One batch out of the pipeline: every file's record, and fc7 rows for the good ones."""

    records: list[FileRecord]
    features: np.ndarray  # (number of ok records, 4096) float32, in record order
    times: StageTimes = field(default_factory=StageTimes)


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


def decode_on_cpu(
    record: FileRecord,
    data: bytes | bytearray,
    times: StageTimes,
    preprocessing: Preprocessing,
    max_megapixels: float,
) -> torch.Tensor | None:
    """Pillow decode, resize and crop to uint8; a bad file sets the record's reason instead."""
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
    pixels = preprocessing.resize_and_crop(image)
    times.preprocess += time.perf_counter() - decoded
    return pixels


class _Files(Dataset):
    """Read, hash, decode and crop one file; never raises for a bad file."""

    def __init__(
        self, paths: Sequence[Path], preprocessing: Preprocessing, max_megapixels: float
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.preprocessing = preprocessing
        self.max_megapixels = max_megapixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[FileRecord, torch.Tensor | None, StageTimes]:
        record, data, times = read_file(position, self.paths[position])
        if data is None:
            return record, None, times
        pixels = decode_on_cpu(record, data, times, self.preprocessing, self.max_megapixels)
        return record, pixels, times


def _collate(
    items: list[tuple[FileRecord, torch.Tensor | None, StageTimes]],
) -> tuple[list[FileRecord], torch.Tensor | None, StageTimes]:
    records = [record for record, _, _ in items]
    good = [pixels for _, pixels, _ in items if pixels is not None]
    times = StageTimes()
    for _, _, item_times in items:
        times.add(item_times)
    return records, (torch.stack(good) if good else None), times


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(n_files: int) -> int:
    """Decoder processes for the CPU path: one per eight cores, at least one.

    Decoding and cropping a 224-px JPEG takes about 3 ms of one core, AlexNet about 27 ms of
    core time (fp32), so one decoder feeds the model of up to about eight cores.
    """
    if n_files < MIN_FILES_FOR_WORKERS:
        return 0
    return max(1, _cores() // 8) if _cores() > 1 else 0


def default_threads() -> int:
    """Torch threads for the model: every core, the decoders' included.

    A decoder is busy about a tenth of the time, so leaving it a core idles most of that core.
    Measured on an idle 2-core EPYC (AVX2; 400 Imagenette JPEGs, two rounds): 1 decoder + 2
    threads 62-72 images/s, 0 + 2: 57-63, 1 + 1: 40-44. On a machine that other jobs keep busy
    the order turns (an earlier measurement at load average 4-5: 1 + 1 52, 1 + 2 44): there
    pass ``threads`` (``--threads``) explicitly.
    """
    return _cores()


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the model with ``threads`` torch threads, and put the global setting back after."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def extract_fc7(
    paths: Sequence[Path], loaded: LoadedModel, options: ExtractOptions = ExtractOptions()
) -> Iterator[ExtractedBatch]:
    """fc7 features of ``paths`` in order, one batch at a time (memory stays flat)."""
    device = resolve_device(options.device)
    if options.batch_size is None:
        options = replace(options, batch_size=GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    mapper = Fc7Mapper(loaded, device, options.precision, options.channels_last, options.compile)
    if device.type == "cuda":
        from .extract_cuda import extract_on_device

        yield from extract_on_device(paths, loaded, mapper, options)
    else:
        yield from _extract_on_cpu(paths, loaded, mapper, options)


def _extract_on_cpu(
    paths: Sequence[Path], loaded: LoadedModel, mapper: Fc7Mapper, options: ExtractOptions
) -> Iterator[ExtractedBatch]:
    """Decoder processes feed whole batches of uint8 crops to the model, in order."""
    workers = options.workers if options.workers is not None else default_workers(len(paths))
    loader = DataLoader(
        _Files(paths, loaded.preprocessing, options.max_megapixels),
        batch_size=options.batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
    )
    threads = options.threads if options.threads is not None else default_threads()
    with _torch_threads(threads):
        resumed = time.perf_counter()
        for records, pixels, times in loader:
            if pixels is None:
                features = np.zeros((0, mapper.out_features), dtype=np.float32)
            else:
                start = time.perf_counter()
                features = mapper(pixels, pad_to=options.batch_size).numpy()
                times.model = time.perf_counter() - start
            times.images = len(features)
            times.skipped = len(records) - len(features)
            times.wall = time.perf_counter() - resumed
            yield ExtractedBatch(records, features, times)
            resumed = time.perf_counter()


def extract_images(
    paths: Sequence[Path], loaded: LoadedModel, options: ExtractOptions = ExtractOptions()
) -> tuple[np.ndarray, list[FileRecord]]:
    """All at once, for a handful of query images: features of the good ones and every record."""
    records: list[FileRecord] = []
    chunks = []
    for batch in extract_fc7(paths, loaded, options):
        records.extend(batch.records)
        chunks.append(batch.features)
    dim = loaded.model.classifier[4].out_features
    return (np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)), records
