"""faiss helpers only the benchmarks use: coarse centroids shared between IVF builds, and the
memory an index takes on disk and in RAM (the product itself needs neither)."""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.indexes import kinds
from retrieval.indexes.gpu import unwrap


def ivf_centroids(index: Any) -> np.ndarray | None:
    """The coarse centroids of the IVF inside ``index`` (nlist x d), or None without an IVF."""
    import faiss

    ivf = kinds._first(index, faiss.IndexIVF)
    return None if ivf is None else ivf.quantizer.reconstruct_n(0, ivf.quantizer.ntotal)


def build_seeded(
    spec: kinds.IndexSpec, dim: int, sample: np.ndarray | None, centroids: np.ndarray | None
) -> Any:
    """``kinds.build_index`` whose IVF starts from ``centroids`` (from :func:`ivf_centroids` of
    an index with the same pre-transforms and list count): the coarse k-means, the slow part of
    training IVF on 4096-d fc7, is done once for every kind of a benchmark that shares it."""
    import faiss

    index = kinds.new_index(spec, dim)
    ivf = kinds._first(index, faiss.IndexIVF)
    if centroids is not None and ivf is not None:
        if centroids.shape != (ivf.nlist, ivf.d):
            raise RetrieveError(f"{spec.kind} needs {ivf.nlist} x {ivf.d} IVF centroids")
        # faiss skips k-means when the quantizer already holds nlist trained centroids.
        ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return kinds.prepare_index(index, sample, spec.factory_string(dim))


def index_memory_bytes(index: Any) -> int:
    """Serialized size in bytes (what ``write_index`` puts on disk), counted without a copy."""
    import faiss

    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer
    return total


def index_ram_bytes(index: Any) -> int:
    """Estimated RAM once loaded: serialized size plus structures faiss builds on load.

    Those are IVF-PQ's precomputed distance tables and IDMap2's id -> row hash map (about 40
    bytes per row: an unordered_map node plus its bucket).
    """
    import faiss

    extra = 40 * index.ntotal if isinstance(unwrap(index)[0], faiss.IndexIDMap2) else 0
    ivfpq = kinds._first(index, faiss.IndexIVFPQ)
    if ivfpq is not None:
        extra += 4 * ivfpq.precomputed_table.size()
    return index_memory_bytes(index) + extra
