"""The CUDA path of :mod:`retrieval.extraction`: reader threads, decoding and the model on
the GPU.

Reader threads stat, read and hash files a few batches ahead and look at each JPEG's header;
files nvjpeg can take travel on as bytes, everything else is decoded, resized and cropped on the
CPU right there in the thread (Pillow releases the GIL while it decodes). The main thread then,
per batch: decodes the JPEGs on the GPU in one call, resizes and crops them there, adds the
CPU-decoded crops through pinned memory, and runs the mapper. Features come back through pinned
memory with a non-blocking copy, and a batch is handed out only after the next one has been
queued, so the GPU computes while the caller writes the previous batch.

Progressive JPEGs and large photos go to Pillow in the reader threads too (see
:func:`better_on_cpu`), and the rare JPEG nvjpeg refuses to a small fallback pool, never to the
main thread. nvjpeg's output is ordered against the queued work of the previous batch (a side
stream, ``record_stream``; see :mod:`retrieval.images.gpu_decode`), and nothing between decoding
and the model waits for the device (no index tensors, no pageable copies). Each batch counts
the road its images took (nvjpeg, Pillow by choice, Pillow after nvjpeg failed); a run where
nvjpeg failed ends with one warning line, so a GPU run never silently becomes a CPU run.

Stage times: decoding on the host clock (it returns when the pixels are ready, so waiting for
the previous batch is not counted), cropping and the model from CUDA events; reader times are
summed over the threads. The numeric policy ("fp32" is IEEE fp32, deterministic cuDNN, fixed
shapes) is the mapper's, the same for every road a vector takes.

The same code runs on the CPU (torchvision decodes with libjpeg-turbo there), which is how
``tests/test_gpu_decode.py`` checks its order, records and fallbacks without a GPU; its tests
marked ``cuda`` run it with nvjpeg.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.devices import usable_cores
from retrieval.extraction.mapper import Fc7Mapper
from retrieval.extraction.reader import decode_on_cpu, read_file
from retrieval.extraction.types import (
    GPU_BATCH,
    ExtractedBatch,
    ExtractOptions,
    FileRecord,
    StageTimes,
)
from retrieval.images.gpu_decode import DecodeFailures, decode_jpegs, resize_and_crop
from retrieval.images.jpeg import JpegInfo, inspect_jpeg
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import LoadedModel

log = logging.getLogger(__name__)

# Files per reader task: large enough that task overhead vanishes, small enough to spread a
# batch over the threads.
READ_CHUNK = 16
# Batches read ahead of the one the GPU is on.
READ_AHEAD = 4
# The start-of-frame marker of a progressive (Huffman) JPEG.
PROGRESSIVE = 0xC2
# Threads that decode the JPEGs nvjpeg refused (rare: it is told only about files it takes).
FALLBACK_THREADS = 2
# JPEGs whose shorter side is at least this many times the resize go to Pillow's draft mode.
CPU_DRAFT_SCALE = 8


@dataclass
class _Jpeg:
    """Bytes for nvjpeg, with the header facts the decoder needs."""

    data: torch.Tensor
    info: JpegInfo


_Item = tuple[FileRecord, "_Jpeg | torch.Tensor | None", StageTimes]


def default_reader_threads() -> int:
    """Reading is I/O and hashing, with Pillow for the odd non-JPEG: two threads a core."""
    return max(4, min(32, 2 * usable_cores()))


def better_on_cpu(info: JpegInfo, preprocessing: Preprocessing) -> bool:
    """Whether a JPEG nvjpeg could take is still cheaper to decode in a reader thread.

    Progressive JPEGs: torchvision's batched nvjpeg decode takes them one by one, Huffman
    decoding on the host, in the main thread, while the GPU waits. Large photos: Pillow's draft
    mode decodes them at 1/8 scale (8 x the resize on the shorter side, e.g. 2048 px for 256),
    an eighth of the IDCT work, where nvjpeg decodes every pixel and the GPU then resizes them.
    ``bench/gpu_check.py`` measures where the crossover lies on the machine it runs on.
    """
    return info.frame == PROGRESSIVE or min(info.width, info.height) >= (
        CPU_DRAFT_SCALE * preprocessing.resize
    )


def read_for_device(
    position: int, path: str, preprocessing: Preprocessing, max_megapixels: float
) -> _Item:
    """One file: JPEG bytes for the GPU, a CPU-decoded uint8 crop, or a record with a reason."""
    record, data, times = read_file(position, path)
    if data is None:
        return record, None, times
    return record, route(record, data, times, preprocessing, max_megapixels), times


def route(
    record: FileRecord,
    data: bytearray,
    times: StageTimes,
    preprocessing: Preprocessing,
    max_megapixels: float,
) -> _Jpeg | torch.Tensor | None:
    """Encoded bytes -> a JPEG for nvjpeg, or a crop Pillow decoded here (None: the record says
    why). Files and bytes (an upload, a query by bytes) take this one road on a GPU."""
    info = inspect_jpeg(data)
    if (
        info is not None
        and info.gpu_decodable(max_megapixels)
        and not better_on_cpu(info, preprocessing)
    ):
        return _Jpeg(torch.frombuffer(data, dtype=torch.uint8), info)
    pixels = decode_on_cpu(record, data, times, preprocessing, max_megapixels)
    times.cpu_decoded += int(pixels is not None)
    return pixels


def crops_on_device(
    items: Sequence[_Item], preprocessing: Preprocessing, device: torch.device, max_mp: float
) -> torch.Tensor | None:
    """One batch of items (JPEGs for nvjpeg, CPU crops) as uint8 crops on ``device``, in order
    of the items that decoded; the rest have their record's reason set."""
    images, crops = decode_items(items, preprocessing, device, max_mp)
    return assemble(images, crops, preprocessing, device)


def _read_chunk(
    start: int, paths: Sequence[str], preprocessing: Preprocessing, max_megapixels: float
) -> list[_Item]:
    return [
        read_for_device(start + offset, path, preprocessing, max_megapixels)
        for offset, path in enumerate(paths)
    ]


def decode_items(
    items: Sequence[_Item],
    preprocessing: Preprocessing,
    device: torch.device,
    max_megapixels: float,
    pool: ThreadPoolExecutor | None = None,
    ordering: str = "streams",
    failures: DecodeFailures | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Upright decoded images on ``device`` and CPU-decoded crops, by position in ``items``.

    A JPEG nvjpeg refuses goes to Pillow, in ``pool``'s reader threads when given (not one by
    one in the thread that feeds the GPU); if Pillow rejects it too, its record gets the reason
    and it is in neither result. Each item's times count the road it took (``gpu_decoded``,
    ``gpu_fallback``); ``failures`` collects the nvjpeg errors.
    """
    jobs = [(i, payload) for i, (_, payload, _) in enumerate(items) if isinstance(payload, _Jpeg)]
    crops = {
        i: payload for i, (_, payload, _) in enumerate(items) if isinstance(payload, torch.Tensor)
    }
    decoded = (
        decode_jpegs(
            [job.data for _, job in jobs],
            [job.info for _, job in jobs],
            device,
            preprocessing.channels,
            ordering,
            failures,
        )
        if jobs
        else []
    )
    images: dict[int, torch.Tensor] = {}
    refused: dict[int, Future[torch.Tensor | None] | torch.Tensor | None] = {}
    for (i, job), image in zip(jobs, decoded, strict=True):
        if image is not None:
            images[i] = image
            items[i][2].gpu_decoded += 1
            continue
        record, _, times = items[i]
        args = (record, job.data.numpy().tobytes(), times, preprocessing, max_megapixels)
        refused[i] = pool.submit(decode_on_cpu, *args) if pool else decode_on_cpu(*args)
    for i, outcome in refused.items():
        pixels = outcome.result() if isinstance(outcome, Future) else outcome
        if pixels is not None:
            crops[i] = pixels
            items[i][2].gpu_fallback += 1
    return images, crops


def assemble(
    images: dict[int, torch.Tensor],
    crops: dict[int, torch.Tensor],
    preprocessing: Preprocessing,
    device: torch.device,
) -> torch.Tensor | None:
    """One ``N x C x crop x crop`` uint8 batch on ``device``, in position order.

    No index tensors and no pageable copies: the host never waits for the device here (a
    ``torch.tensor(list, device="cuda")`` is a blocking copy).
    """
    if not images and not crops:
        return None
    placed: dict[int, torch.Tensor] = {}
    if images:
        order = list(images)
        placed.update(zip(order, resize_and_crop([images[i] for i in order], preprocessing)))
    if crops:
        order = list(crops)
        staged = torch.stack([crops[i] for i in order])
        if device.type == "cuda":  # the caching host allocator keeps it alive until copied
            staged = staged.pin_memory()
        placed.update(zip(order, staged.to(device, non_blocking=True)))
    return torch.stack([placed[i] for i in sorted(placed)])


class _Marks:
    """Stage boundaries: CUDA events on a GPU (timed there, no synchronisation), else a clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def wait(self) -> None:
        """Block until the work queued before the last mark is done."""
        if self.cuda:
            self.marks[-1].synchronize()

    def seconds(self, first: int, last: int) -> float:
        if self.cuda:
            return self.marks[first].elapsed_time(self.marks[last]) / 1000
        return self.marks[last] - self.marks[first]


@dataclass
class _InFlight:
    records: list[FileRecord]
    features: torch.Tensor | None  # host copy (pinned on CUDA), maybe still being filled
    marks: _Marks
    times: StageTimes


def _finish(batch: _InFlight, out_features: int) -> ExtractedBatch:
    batch.marks.wait()
    times, marks = batch.times, batch.marks
    times.preprocess += marks.seconds(0, 1)
    times.model = marks.seconds(1, 2)
    if batch.features is None:
        features = np.zeros((0, out_features), dtype=np.float32)
    else:
        features = batch.features.numpy().copy()  # the pinned buffer goes back to its cache
    times.images = len(features)
    times.skipped = len(batch.records) - len(features)
    return ExtractedBatch(batch.records, features, times)


def _launch(
    items: list[_Item],
    preprocessing: Preprocessing,
    mapper: Fc7Mapper,
    options: ExtractOptions,
    pool: ThreadPoolExecutor | None = None,
    ordering: str = "streams",
    failures: DecodeFailures | None = None,
) -> _InFlight:
    """Queue one batch's decoding, cropping, model and copy back; return without waiting.

    Decoding is timed on the host clock (nvjpeg returns when its pixels are ready), so time
    the device spends finishing the previous batch is not counted as decoding; cropping and the
    model are timed with CUDA events on the main stream.
    """
    device = mapper.device
    started = time.perf_counter()
    images, cpu_crops = decode_items(
        items, preprocessing, device, options.max_megapixels, pool, ordering, failures
    )
    decode_seconds = time.perf_counter() - started
    marks = _Marks(device)
    marks.mark()
    crops = assemble(images, cpu_crops, preprocessing, device)
    marks.mark()
    host = None
    if crops is not None:
        fc7 = mapper(crops)
        if device.type == "cuda":
            host = torch.empty(fc7.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(fc7, non_blocking=True)
        else:
            host = fc7
    marks.mark()
    times = StageTimes(decode=decode_seconds if images else 0.0)
    for _, _, item_times in items:  # after decode_items, which may add CPU fallbacks
        times.add(item_times)
    return _InFlight([record for record, _, _ in items], host, marks, times)


def extract_on_device(
    paths: Sequence[Path],
    loaded: LoadedModel,
    mapper: Fc7Mapper,
    options: ExtractOptions,
    *,
    ordering: str = "streams",
) -> Iterator[ExtractedBatch]:
    """fc7 of ``paths`` in order, one batch at a time, with the device one batch ahead.

    Made for CUDA (``extract_fc7`` sends it nothing else); it runs on the CPU too, which is
    how its ordering and bookkeeping are tested without a GPU. ``ordering`` is how nvjpeg is
    ordered against queued work (:data:`retrieval.images.gpu_decode.ORDERINGS`); anything but
    the default is for ``bench/gpu_check.py``'s probe of the decode race.

    nvjpeg failures never pass silently: the batch's counts say how many images Pillow decoded
    instead (``StageTimes.gpu_fallback``), and the run ends with one warning line saying so.
    """
    names = [str(p) for p in paths]
    size = options.batch_size or GPU_BATCH
    pool = ThreadPoolExecutor(options.workers or default_reader_threads(), "retrieve-read")
    reads: deque[list[Future[list[_Item]]]] = deque()
    starts = iter(range(0, len(names), size))

    def read_next_batch() -> None:
        start = next(starts, None)
        if start is not None:
            stop = min(start + size, len(names))
            reads.append(
                [
                    pool.submit(
                        _read_chunk,
                        chunk,
                        names[chunk : min(chunk + READ_CHUNK, stop)],
                        loaded.preprocessing,
                        options.max_megapixels,
                    )
                    for chunk in range(start, stop, READ_CHUNK)
                ]
            )

    # nvjpeg's rare refusals are decoded by Pillow here, not behind the read-ahead queue.
    fallback = ThreadPoolExecutor(FALLBACK_THREADS, "retrieve-fallback")
    failures = DecodeFailures()
    fell_back = 0
    try:
        for _ in range(READ_AHEAD):
            read_next_batch()
        in_flight: _InFlight | None = None
        resumed = time.perf_counter()
        while reads or in_flight is not None:
            launched = None
            if reads:
                items = [item for future in reads.popleft() for item in future.result()]
                read_next_batch()
                launched = _launch(
                    items, loaded.preprocessing, mapper, options, fallback, ordering, failures
                )
            if in_flight is not None:
                finished = _finish(in_flight, mapper.out_features)
                finished.times.wall = time.perf_counter() - resumed
                fell_back += finished.times.gpu_fallback
                yield finished
                resumed = time.perf_counter()
            in_flight = launched
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        fallback.shutdown(wait=True, cancel_futures=True)
        if failures.calls:
            log.warning(
                "nvjpeg failed %d time(s) (first: %s): %d image(s) were decoded on the CPU "
                "instead, the rest retried file by file on the GPU",
                failures.calls,
                failures.first_error,
                fell_back,
            )
