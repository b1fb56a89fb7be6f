"""Files to fc7 features: reader -> decoder -> preprocess (worker processes) -> model (main).

Workers read each file, hash it, decode it safely and resize and crop it to uint8; the main process
normalises whole batches and runs the model. A file that cannot be used comes back as a record
with a reason instead of pixels, so a bad file never stops the run and ids stay aligned with paths.
Each stage is timed so a slow one shows (``--verbose``, ``bench/extract.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .devices import resolve_device
from .errors import ImageReadError
from .images import DEFAULT_MAX_MEGAPIXELS, SkipReason, load_image
from .preprocess import Preprocessing
from .weights import LoadedModel

log = logging.getLogger(__name__)

# Below this many files, starting worker processes costs more than it saves.
MIN_FILES_FOR_WORKERS = 64


@dataclass(frozen=True)
class ExtractOptions:
    """How to run extraction; the defaults suit the machine it runs on."""

    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    precision: str = "fp32"  # or "bf16": autocast, a speed/accuracy trade the user opts into
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    channels_last: bool = True


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
    """Seconds spent in each stage; worker stages are summed over workers (busy time)."""

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
        path = self.paths[position]
        record, times = FileRecord(position, path), StageTimes()
        start = time.perf_counter()
        try:
            stat = os.stat(path)
            record.size, record.mtime_ns = stat.st_size, stat.st_mtime_ns
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            record.reason, record.detail = SkipReason.UNREADABLE.value, exc.strerror or str(exc)
            return record, None, times
        record.sha256 = hashlib.sha256(data).hexdigest()
        decoded = time.perf_counter()
        times.read = decoded - start
        try:
            image = load_image(
                data,
                mode=self.preprocessing.mode,
                max_megapixels=self.max_megapixels,
                draft_size=self.preprocessing.resize,
                path_for_errors=path,
            )
        except ImageReadError as exc:
            record.reason, record.detail = exc.reason, exc.detail
            return record, None, times
        cropped = time.perf_counter()
        times.decode = cropped - decoded
        pixels = self.preprocessing.resize_and_crop(image)
        times.preprocess = time.perf_counter() - cropped
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


def default_workers(n_files: int) -> int:
    if n_files < MIN_FILES_FOR_WORKERS:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 16))


def extract_fc7(
    paths: Sequence[Path], loaded: LoadedModel, options: ExtractOptions = ExtractOptions()
) -> Iterator[ExtractedBatch]:
    """fc7 features of ``paths`` in order, one batch at a time (memory stays flat)."""
    device = resolve_device(options.device)
    model = loaded.model.to(device).eval()
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    workers = options.workers if options.workers is not None else default_workers(len(paths))
    loader = DataLoader(
        _Files(paths, loaded.preprocessing, options.max_megapixels),
        batch_size=options.batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16")
    with torch.inference_mode():
        for records, pixels, times in loader:
            if pixels is None:
                features = np.zeros((0, model.classifier[4].out_features), dtype=np.float32)
            else:
                start = time.perf_counter()
                batch = pixels.to(device, non_blocking=True)
                if options.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with autocast:
                    fc7 = model.forward_fc7(loaded.preprocessing.normalize(batch))
                features = fc7.float().cpu().numpy()
                times.model = time.perf_counter() - start
            times.images = len(features)
            times.skipped = len(records) - len(features)
            yield ExtractedBatch(records, features, times)


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
