"""Querying a built index: its search-time knobs, k-NN search, and what it costs in memory.

Why apart from ``kinds.py``: that module makes an index (build, train, prune rows) when a collection
is written; this one only reads a finished index, on every query and in the quality and
benchmark reports. :func:`search` returns Euclidean distances, not FAISS's squared ones, measured
after the pre-transforms (in the PCA space with ``reduce``), and asks ``gpu.pick_searcher``
where to run.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np

from retrieval.errors import RetrieveError

from . import gpu
from .kinds import _as_matrix, _first

__all__ = [
    "search",
    "search_params",
    "set_search_params",
]

log = logging.getLogger(__name__)


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


def search_params(index: Any) -> dict[str, int | None]:
    """The query-time knobs an index has now (None where a knob does not apply)."""
    import faiss

    found: dict[str, int | None] = {"nprobe": None, "ef_search": None}
    with contextlib.suppress(RuntimeError, AttributeError):  # not an IVF kind
        found["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    hnsw = _first(index, faiss.IndexHNSW)
    if hnsw is not None:
        found["ef_search"] = int(hnsw.hnsw.efSearch)
    return found


def search(
    index: Any,
    queries: np.ndarray,
    k: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
    device: str = "auto",
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """(Euclidean distances, ids), each n x k, nearest first; -1 / inf where fewer than k rows.

    ``device``: "cpu", "cuda", "cuda:N" or "auto" (a GPU when there is one: the faiss GPU build,
    else exact torch search for Flat kinds, else faiss on CPU). The GPU paths copy the index to
    the GPU once per call, so pass many queries at once; for a resident database across calls
    use ``gpu.TorchExactSearcher``. The knobs stick to ``index`` (see set_search_params).
    """
    q = _as_matrix(queries, index.d, "queries")
    if int(k) < 1 or batch_size < 1:
        raise RetrieveError(f"k and batch_size must be at least 1, got {k} and {batch_size}")
    k = int(k)
    set_search_params(index, nprobe=nprobe, ef_search=ef_search, refine_k_factor=refine_k_factor)
    dist = np.full((len(q), k), np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    if index.ntotal == 0 or len(q) == 0:
        return dist, ids
    run, where = gpu.pick_searcher(index, device, k)
    log.debug("searching %d queries (k=%d) with %s", len(q), k, where)
    for s in range(0, len(q), batch_size):
        d2, found = run(q[s : s + batch_size])
        dist[s : s + len(d2)] = np.sqrt(np.maximum(d2, 0.0))
        ids[s : s + len(d2)] = found
    dist[ids < 0] = np.inf
    return dist, ids
