"""``kind="auto"``: choose a concrete index kind from the collection size and a memory budget.

Why apart from ``kinds.py``: the choice is policy (what fits, what is fast enough), not FAISS
plumbing; it only reads an :class:`~retrieval.indexes.kinds.IndexSpec` and returns another.
"""

from __future__ import annotations

import numpy as np

from retrieval.devices import physical_memory
from retrieval.errors import RetrieveError
from retrieval.units import human_bytes

from .kinds import POINTS_PER_CENTROID, IndexSpec

__all__ = ["resolve_auto"]

# Exact search is "fast enough" while one query scans at most 2**28 floats (1 GiB; ~0.1-0.3 s on
# a laptop CPU, milliseconds on a GPU).
FLAT_MAX_SCAN = 2**28
# Per-row bytes beyond the vector: IDMap2's id table (8) and its id -> row hash map (~40).
_IDMAP_ROW = 48


def resolve_auto(
    spec: IndexSpec, n_vectors: int, dim: int, memory_budget_bytes: int | None
) -> tuple[IndexSpec, str]:
    """Turn ``kind="auto"`` into a concrete kind from collection size and a memory budget.

    As autofaiss does: exact Flat while it fits and one query scans little; IVF-Flat while the
    raw vectors fit; else IVF with the largest fast-scan PQ code that fits. Returns the spec and one
    sentence saying why. Without a budget, half of the machine's RAM is assumed.
    """
    if spec.kind != "auto":
        return spec, f"{spec.kind}: chosen explicitly"
    n, d = max(0, int(n_vectors)), spec.reduced_dim or int(dim)
    budget = memory_budget_bytes if memory_budget_bytes is not None else physical_memory() // 2
    size = f"{n:,} vectors x {d}-d"
    flat = n * (4 * d + _IDMAP_ROW)
    if flat <= budget and n * d <= FLAT_MAX_SCAN:
        why = f"Flat: {size} fit in {human_bytes(flat)}, exact search is fast enough"
        return IndexSpec("Flat", spec.reduce, spec.normalize), why
    nlist = _auto_nlist(n)
    ivf_flat = n * (4 * d + 8) + nlist * d * 4
    if ivf_flat <= budget:
        why = (
            f"IVF{nlist},Flat: {size} ({human_bytes(ivf_flat)}) fit in the "
            f"{human_bytes(budget)} budget, "
            f"but exact search would scan all of them per query; {nlist} lists, a few scanned"
        )
        return IndexSpec(f"IVF{nlist},Flat", spec.reduce, spec.normalize), why
    # 4-bit fast-scan PQ: cheap to train (16 centroids per sub-vector), SIMD to scan, and per
    # byte as accurate as 8-bit PQ on fc7-like data (bench/search.py); 2+ dims per sub-vector.
    fixed = nlist * d * 4 + 16 * d * 4
    for m in (2048, 1024, 512, 256, 128, 64, 32, 16, 8):
        need = n * (m // 2 + 8) + fixed
        if m <= d // 2 and d % m == 0 and need <= budget:
            kind = f"IVF{nlist},PQ{m}x4fs"
            why = (
                f"{kind}: {size} would need {human_bytes(n * 4 * d)} uncompressed, over the "
                f"{human_bytes(budget)} budget; {m // 2}-byte codes need {human_bytes(need)} "
                f"(approximate: check it with `retrieve recall --against`)"
            )
            return IndexSpec(kind, spec.reduce, spec.normalize), why
    raise RetrieveError(
        f"a memory budget of {human_bytes(budget)} is too small for {size}; "
        f"the smallest index (IVF{nlist},PQ8x4fs) needs {human_bytes(n * 12 + fixed)}"
    )


def _auto_nlist(n: int) -> int:
    """A power of two near 4 sqrt(n) (faiss's guideline), with >= 40 vectors per list."""
    target = max(16.0, 4 * np.sqrt(max(n, 1)))
    nlist = 2 ** round(np.log2(target))
    while nlist > 16 and nlist * POINTS_PER_CENTROID > n:
        nlist //= 2
    return int(nlist)
