"""Where work runs: the cores this process may use, and the torch device for ``--device``.

One answer to each question for every stage (extraction, training, search). torch is imported
inside the functions that need it, so naming a device costs nothing until a model runs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from retrieval.errors import RetrieveError

if TYPE_CHECKING:
    import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def torch_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """Run with ``threads`` torch threads (None: as they are), and put the process-wide
    setting back after."""
    import torch

    return _threads(torch.get_num_threads, torch.set_num_threads, threads)


def faiss_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """Run faiss calls on this thread with ``threads`` OpenMP threads (None: as they are), and
    put this thread's setting back after (OpenMP keeps it per calling thread, so a pool's
    threads each set their own)."""
    import faiss

    return _threads(faiss.omp_get_max_threads, faiss.omp_set_num_threads, threads)


@contextlib.contextmanager
def _threads(
    get: Callable[[], int], put: Callable[[int], None], threads: int | None
) -> Iterator[None]:
    if threads is None or threads == get():
        yield
        return
    before = get()
    put(threads)
    try:
        yield
    finally:
        put(before)


def physical_memory() -> int:
    """Bytes of RAM on this machine, for sizing what is kept in memory (16 GiB where the OS
    does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


@dataclass(frozen=True)
class DeviceRequest:
    """What ``--device`` asked for: ``auto``, ``cpu`` or ``cuda``, and a CUDA ordinal."""

    kind: str
    ordinal: int = 0


def parse_device(device: str) -> DeviceRequest:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (also ``auto:N``); one line for anything else.
    The one reading of a device string, for the model and the searcher alike."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", str(device))
    if match is None or (match.group(1) == "cpu" and match.group(2)):
        raise RetrieveError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return DeviceRequest(match.group(1), int(match.group(2) or 0))


def one_device(device: str, also: str) -> str:
    """The one device of an object given two (an ``Index``'s ``device`` and its extraction
    options' ``device``): the one that is not ``auto``; both named and different is refused."""
    parse_device(device), parse_device(also)
    if device == "auto" or device == also:
        return also
    if also != "auto":
        raise RetrieveError(f"two devices given, {device} and {also}: name one")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``device``; asking for CUDA where there is none is a user error."""
    import torch

    request = parse_device(device)
    if request.kind == "cpu" or (request.kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RetrieveError(f"--device {device}: no CUDA device is available here; use cpu or auto")
    if request.ordinal >= torch.cuda.device_count():
        raise RetrieveError(f"--device {device}: there are {torch.cuda.device_count()} GPUs")
    return torch.device("cuda", request.ordinal)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native here: any CUDA GPU torch runs on, or a CPU with
    AVX-512 BF16 / AMX. Elsewhere oneDNN emulates it, about 6x slower than fp32."""
    import torch

    if device.type == "cuda":
        return True
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def choose_precision(asked: str | None, device: str = "auto") -> str:
    """``fp32`` or ``bf16`` for ``asked`` (``None`` / ``auto``: bf16 where it is native, on a
    GPU or a CPU with AVX-512 BF16 / AMX, where it measured 1.5x fp32 with 0.997 of top-6 lists
    unchanged; fp32 elsewhere, where bf16 is emulated and ~6x slower)."""
    if asked not in (None, "auto"):
        if asked not in ("fp32", "bf16"):
            raise RetrieveError(f"precision must be auto, fp32 or bf16, not {asked!r}")
        return asked
    return "bf16" if fast_bf16(resolve_device(device)) else "fp32"
