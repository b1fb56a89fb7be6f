"""A resident searcher for one snapshot: where its searches run, chosen once and kept.

A long-lived :class:`retrieval.Index` (a server, a notebook, a duplicate finder) keeps one
:class:`Searcher` per generation. It picks, once:

- the default exact ``IDMap2,Flat`` kind: the exact search of ``exact.py`` over the vectors in
  the file's mapping, on the CPU (``scan="bf16"`` or ``auto``: its candidates from a bf16 copy
  in memory, re-ranked exactly), or a resident copy on a CUDA device (``gpu.TorchExactSearcher``);
- any other kind: the faiss index memory-mapped read-only, or a resident faiss GPU copy.

``backend`` says which one runs. Searches are safe from several threads: the mapped search shares
nothing mutable, and a faiss index's query-time knobs (nprobe, efSearch) are set and used under a
lock, then put back (:func:`search_faiss`), so one request's knobs never leak into another's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import numpy as np

from retrieval.devices import fast_bf16, parse_device, physical_memory
from retrieval.errors import RetrieveError

from . import gpu
from .exact import SCANS, MappedFlat
from .kinds import _as_matrix, _first
from .store import Snapshot

log = logging.getLogger(__name__)


class Searcher:
    """k-NN over one snapshot; distances are Euclidean (not squared), -1 / inf past the end."""

    def __init__(self, snapshot: Snapshot, device: str = "auto", scan: str = "fp32") -> None:
        self.snapshot = snapshot
        self.dim = snapshot.dim
        self._lock = threading.Lock()
        self._flat: MappedFlat | None = snapshot.mapped_flat()
        self._faiss: Any = None
        self._torch: gpu.TorchExactSearcher | None = None
        self.backend = self._place(device)
        mapped = self._flat if self.backend == "exact-mapped-cpu" else None
        self.scan = choose_scan(scan, mapped)
        if self.scan == "bf16":
            self.backend += "-bf16-scan"

    def prepare(self) -> None:
        """Do now what the first search would otherwise pay for: the fp32 norms, or the bf16
        copy (which has its own)."""
        if self._flat is not None and self._torch is None:
            if self.scan == "bf16":
                self._flat.bf16_copy()
            else:
                self._flat.norms()

    def _place(self, device: str) -> str:
        ordinal = _cuda_ordinal(device)
        flat = self._flat
        if (
            ordinal is not None
            and flat is not None
            and flat.ntotal
            and gpu.torch_cuda_count() > ordinal
        ):
            try:
                self._torch = gpu.TorchExactSearcher(flat.as_tensor(), device=f"cuda:{ordinal}")
                return f"torch-cuda:{ordinal}-{self._torch.precision}"
            except RetrieveError as exc:
                log.warning("exact GPU search unavailable (%s); searching on the CPU", exc)
        if self._flat is not None:
            return "exact-mapped-cpu"
        index = self.snapshot.search_index()
        if ordinal is not None and gpu.faiss_gpu_count() > ordinal:
            try:
                self._faiss = gpu.faiss_index_to_gpu(index, ordinal)
                return f"faiss-gpu:{ordinal}"
            except RuntimeError as exc:
                log.warning("faiss cannot hold this index on the GPU (%s)", gpu.faiss_message(exc))
        if parse_device(device).kind == "cuda":
            log.warning("no GPU search for this index kind here; searching on the CPU")
        self._faiss = index
        return "faiss-cpu"

    @property
    def ntotal(self) -> int:
        return self.snapshot.count

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _as_matrix(queries, self.dim, "queries")
        if int(k) < 1:
            raise RetrieveError(f"k must be at least 1, not {k}")
        k = int(k)
        if self._torch is not None:
            d2, rows = self._torch.search(q, k)
            ids = np.where(rows >= 0, self._flat.ids[np.maximum(rows, 0)], -1)
            return _euclidean(d2, ids)
        if self._flat is not None:
            return _euclidean(*self._flat.search(q, k, scan=self.scan))
        index = self._faiss
        if k > gpu.FAISS_GPU_MAX_K and self.backend.startswith("faiss-gpu"):
            index = self.snapshot.search_index()  # more neighbours than faiss-gpu answers
        with self._lock:
            return search_faiss(index, q, k, nprobe=nprobe, ef_search=ef_search)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids``, in the space queries are given in (for a reduced or
        compressed kind, decoded back from what the index keeps, so approximate).
        KeyError for an id the index does not hold."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if self._flat is not None:
            return self._flat.reconstruct(ids)
        index = self.snapshot.search_index()
        with self._lock:
            try:
                return np.stack([_reconstruct(index, int(i)) for i in ids])
            except RuntimeError as exc:
                raise KeyError(gpu.faiss_message(exc)) from exc


def _reconstruct(index: Any, row_id: int) -> np.ndarray:
    try:
        return index.reconstruct(row_id)
    except RuntimeError as exc:
        if "direct map" not in str(exc):
            raise
    import faiss  # an IVF kind answers by id only once it has its id -> list map

    faiss.extract_index_ivf(index).make_direct_map()
    return index.reconstruct(row_id)


def choose_scan(asked: str, flat: MappedFlat | None) -> str:
    """``fp32`` or ``bf16`` for the mapped exact search (``flat``; None: another kind or place,
    which has no scan to choose: fp32). ``auto``: bf16 where the CPU has native bf16 and the copy
    takes at most a quarter of this machine's memory, else fp32."""
    if asked not in ("auto", *SCANS):
        raise RetrieveError(f"search precision must be auto, fp32 or bf16, not {asked!r}")
    if flat is None:
        return "fp32"
    if asked != "auto":
        return asked
    import torch

    fits = flat.bf16_bytes() <= physical_memory() // 4
    return "bf16" if fits and flat.ntotal and fast_bf16(torch.device("cpu")) else "fp32"


def _cuda_ordinal(device: str) -> int | None:
    """The CUDA device a search should use, or None for the CPU; RetrieveError for a device
    string :func:`parse_device` refuses, for ``cuda`` where none is visible, and for an
    ordinal past the GPUs there are."""
    request = parse_device(device)
    if request.kind == "cpu":
        return None
    visible = max(gpu.torch_cuda_count(), gpu.faiss_gpu_count())
    if not visible:
        if request.kind == "cuda":
            raise RetrieveError(f"device {device!r} requested but no CUDA device is visible")
        return None
    if request.ordinal >= visible:
        raise RetrieveError(f"device {device!r} requested but there are {visible} GPUs here")
    return request.ordinal


def search_faiss(
    index: Any,
    queries: np.ndarray,
    k: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-NN with a faiss index, as :class:`Searcher` answers for every kind but the exact Flat:
    (Euclidean distances, ids), each n x k, nearest first, inf / -1 past the end, measured after
    the index's pre-transforms (in the PCA space with ``reduce``). The knobs given apply to
    this call and are then put back; calls on one index must not overlap (Searcher locks)."""
    q = _as_matrix(queries, index.d, "queries")
    if int(k) < 1:
        raise RetrieveError(f"k must be at least 1, not {k}")
    k = int(k)
    if len(q) == 0 or index.ntotal == 0:
        return np.full((len(q), k), np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    asked = {"nprobe": nprobe, "ef_search": ef_search, "refine_k_factor": refine_k_factor}
    asked = {name: value for name, value in asked.items() if value is not None}
    before = search_params(index) if asked else {}
    set_search_params(index, **asked)
    try:
        return _euclidean(*index.search(q, k))
    finally:
        set_search_params(index, **{name: before[name] for name in asked})


def _euclidean(d2: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances as Euclidean ones, inf where no row was found."""
    dist = np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)
    dist[ids < 0] = np.inf
    return dist, ids


def set_search_params(
    index: Any,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
) -> None:
    """Set query-time knobs through any IDMap / PreTransform / Refine wrappers; they stick."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor", refine_k_factor)):
        if value is None:
            continue
        if value < 1:
            raise RetrieveError(f"{name} must be at least 1, got {value}")
        try:
            space.set_index_parameter(index, name if name != "k_factor" else "k_factor_rf", value)
        except RuntimeError:
            log.warning("%s does not apply to this kind of index; ignored", name)


def search_params(index: Any) -> dict[str, Any]:
    """The query-time knobs an index has now (None where a knob does not apply)."""
    import faiss

    found: dict[str, Any] = {"nprobe": None, "ef_search": None, "refine_k_factor": None}
    with contextlib.suppress(RuntimeError, AttributeError):  # not an IVF kind
        found["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    hnsw = _first(index, faiss.IndexHNSW)
    if hnsw is not None:
        found["ef_search"] = int(hnsw.hnsw.efSearch)
    refine = _first(index, faiss.IndexRefine)
    if refine is not None:
        found["refine_k_factor"] = float(refine.k_factor)
    return found
