"""The CPU path: decoder processes feed whole batches of uint8 crops to the model, in order."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.devices import torch_threads, usable_cores
from retrieval.extraction.mapper import Fc7Mapper
from retrieval.extraction.reader import crop_file
from retrieval.extraction.types import (
    MIN_FILES_FOR_WORKERS,
    ExtractedBatch,
    ExtractOptions,
    FileRecord,
    StageTimes,
)
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import LoadedModel

SMALL_DECODE_MS = 4.0  # reading, decoding, signing and cropping a 224-px JPEG, about
PROBES = 4  # files decoded to learn what a folder's pictures cost


class _Files(Dataset):
    """Read, hash, decode and crop one file; never raises for a bad file."""

    def __init__(
        self,
        paths: Sequence[Path],
        preprocessing: Preprocessing,
        max_megapixels: float,
        sign: bool = False,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.preprocessing = preprocessing
        self.max_megapixels = max_megapixels
        self.sign = sign

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[FileRecord, torch.Tensor | None, StageTimes]:
        record, pixels, times = crop_file(
            position, self.paths[position], self.preprocessing, self.max_megapixels, self.sign
        )
        times.cpu_decoded += int(pixels is not None)
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


def default_workers(
    paths: Sequence[Path], preprocessing: Preprocessing, max_megapixels: float, sign: bool = False
) -> int:
    """Decoder processes for the CPU path: one per eight cores, at least two, and as many more
    as this folder's pictures take longer to decode than a small JPEG (a few of them decoded
    here, timed), up to one more than the cores.

    Decoding, signing and cropping a 224-px JPEG takes about 3 ms of one core, AlexNet 7 (bf16
    on AMX) to 27 ms (fp32, AVX2) of core time, so one decoder per eight cores keeps up with
    such pictures; a camera photo's decode takes 24 ms even at 1/8 scale, and there a decoder
    per eight cores starves the model. Measured on a 2-core Xeon with AMX (Embedder.files,
    signing on, two rounds): two decoders against one, 600 224-px JPEGs 1.04-1.08x (fp32) and
    1.23-1.28x (bf16); 200 4,000 x 3,000 JPEGs 1.36-1.37x and 1.42-1.48x. A third helps the
    camera photos (1.14-1.26x more) and costs the 224-px ones 0.94-0.99x.
    """
    cores = usable_cores()
    if len(paths) < MIN_FILES_FOR_WORKERS or cores < 2:
        return 0
    base = max(2, cores // 8)
    cost = _decode_ms(paths, preprocessing, max_megapixels, sign)
    return min(cores + 1, max(base, math.ceil(base * cost / SMALL_DECODE_MS)))


def _decode_ms(
    paths: Sequence[Path], preprocessing: Preprocessing, max_megapixels: float, sign: bool
) -> float:
    """Milliseconds of one core to read, decode, sign and crop one of ``paths``: the median of
    PROBES of them, spread over the list (a file that fails costs what it cost)."""
    step = max(1, len(paths) // PROBES)
    costs = []
    for position in range(0, len(paths), step)[:PROBES]:
        started = time.perf_counter()
        crop_file(position, str(paths[position]), preprocessing, max_megapixels, sign)
        costs.append((time.perf_counter() - started) * 1000)
    return float(np.median(costs))


def default_threads() -> int:
    """Torch threads for the model: every core, the decoders' included.

    Decoders wait on the model much of the time, so cores of their own would idle. Measured
    on an idle 2-core EPYC (AVX2; 400 Imagenette JPEGs, two rounds): 1 decoder + 2 threads
    62-72 images/s, 0 + 2: 57-63, 1 + 1: 40-44. On a machine that other jobs keep busy the
    order turns (an earlier measurement at load average 4-5: 1 + 1 52, 1 + 2 44): there
    pass ``threads`` (``--threads``) explicitly. The CLI asks for this; the library leaves
    torch's process-wide setting alone unless ``ExtractOptions.threads`` says otherwise.
    """
    return usable_cores()


@contextmanager
def _decoders_may_outnumber_cores() -> Iterator[None]:
    """torch warns ("might ... freeze") when decoder processes outnumber the cores, which
    :func:`default_workers` asks for on purpose where decoding is the bottleneck (measured
    there): a user would read it as a fault."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        yield


def extract_on_cpu(
    paths: Sequence[Path], loaded: LoadedModel, mapper: Fc7Mapper, options: ExtractOptions
) -> Iterator[ExtractedBatch]:
    """Decoder processes feed whole batches of uint8 crops to the model, in order."""
    workers = options.workers
    if workers is None:
        workers = default_workers(paths, loaded.preprocessing, options.max_megapixels, options.sign)
    with _decoders_may_outnumber_cores():
        loader = DataLoader(
            _Files(paths, loaded.preprocessing, options.max_megapixels, options.sign),
            batch_size=options.batch_size,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=4 if workers else None,
            # Its own generator: a DataLoader otherwise draws its workers' seed from torch's
            # global RNG, and extraction must leave the caller's random state as it found it.
            generator=torch.Generator().manual_seed(0),
        )
    threads = options.threads  # None: torch's setting, as the caller left it
    with torch_threads(threads):
        resumed = time.perf_counter()
        with _decoders_may_outnumber_cores():
            batches = iter(loader)  # the decoder processes start here
        for records, pixels, times in batches:
            if pixels is None:
                features = np.zeros((0, mapper.out_features), dtype=np.float32)
            else:
                start = time.perf_counter()
                features = mapper(pixels).numpy()
                times.model = time.perf_counter() - start
            times.images = len(features)
            times.skipped = len(records) - len(features)
            times.wall = time.perf_counter() - resumed
            yield ExtractedBatch(records, features, times)
            resumed = time.perf_counter()
