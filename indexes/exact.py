"""Exact Euclidean search: the one blockwise top-k, and the default ``IDMap2,Flat`` index mapped.

Why not faiss's own search: it scans one query on one thread, and reading its file whole copies
every vector into the process (16 KiB a row). Instead the snapshot opens the file with faiss's
memory-map flag (``IO_FLAG_MMAP_IFC``: the OS pages it in on use and shares it between
processes and generations), :func:`flat_view` views its vectors and ids in place, and
:func:`nearest` scans them with torch matrix products over blocks of rows, which use every core
even for one query. The resident CUDA copy (``gpu.TorchExactSearcher``) runs the same
:func:`nearest`: one top-k, whatever the device and dtype of the blocks.

Candidates are picked with ``|x|^2 - 2 q.x`` (norms computed once, on first use) and the final
``k`` ranked by exactly computed ``sum((x - q)^2)``: no cancellation of the expanded form (an
indexed image is at distance 0 from itself), the same answer alone or in a batch, ties to the
smaller id. ``scan="bf16"`` (``retrieve serve``) picks the candidates from a bf16 copy of the
rows less their mean, kept in memory: half the bytes per query and native bf16 products where
the CPU has them (``bench/scan_precision.py``, 2-core AMX Xeon, 60,000 x 4096: one query 28.7
against 32.6 ms, 16 queries 31.5 against 75.4 ms); its best ``k + BF16_MARGIN`` are re-ranked
exactly, so the answer is exact whenever the true ``k`` are among them (the benchmark measures
how often).

Safe to share between threads: the mapping is read-only, the norms and the bf16 copy are made
once under a lock. torch is imported inside functions: ``retrieve remove`` copies a snapshot's
rows without it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Extra candidates per query re-ranked exactly: the expanded form's rounding (about 1e-7 of
# |x|^2) can swap only neighbours that close, and a margin of 16 covers any such run of ties.
RERANK_MARGIN = 16
# Candidates beyond k a bf16 scan hands to the exact re-ranking.
BF16_MARGIN = 64
SCANS = ("fp32", "bf16")
# Elements of one (rows x queries) product block: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


def nearest(
    queries: Any,
    block_of: Callable[[int, int], Any],
    norms: Any,
    k: int,
    *,
    block_rows: int,
    query_norms: Any = None,
    product_scale: float = 1.0,
) -> tuple[Any, Any]:
    """(values, row positions), each n x min(k, rows), smallest first, of
    ``[|q|^2 +] |x|^2 - 2 s q.x`` over the rows ``block_of(start, stop)``, scanned
    ``block_rows`` at a time with a running top-k, so memory stays one block whatever the
    number of rows. The blocks' device and dtype are the caller's (a mapped fp32 file or a bf16
    copy on the CPU, fp32 or fp16 on a GPU); ``queries`` match them. ``norms`` are the rows'
    fp32 ``|x|^2``; with ``query_norms`` (n x 1) the values are squared distances, clamped at
    0; ``product_scale`` (``s``) undoes a scaling of the stored rows."""
    import torch

    total = len(norms)
    best_d = best_rows = None
    with torch.inference_mode():
        for start in range(0, total, block_rows):
            block = block_of(start, start + block_rows)
            products = inner_products(queries, block)
            if product_scale != 1.0:
                products = products * product_scale
            d = norms[None, start : start + len(block)]
            if query_norms is not None:
                d = query_norms + d
            d = d - 2.0 * products
            if query_norms is not None:
                d.clamp_min_(0)
            part_d, part_rows = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
            part_rows += start
            if best_d is not None:
                part_d = torch.cat([best_d, part_d], 1)
                part_rows = torch.cat([best_rows, part_rows], 1)
                part_d, keep = torch.topk(part_d, min(k, part_d.shape[1]), dim=1, largest=False)
                part_rows = torch.gather(part_rows, 1, keep)
            best_d, best_rows = part_d, part_rows
    if best_d is None:
        empty = torch.empty((len(queries), 0))
        return empty, empty.long()
    return best_d, best_rows


def inner_products(queries: Any, rows: Any) -> Any:
    """``queries @ rows.T`` (n x rows) as float32, however the operands are stored.

    On a CPU the product runs as ``rows @ queries.T`` (transposed back as a view): oneDNN's
    GEMM measured 1.6x faster that way round here (16 queries x 20,000 x 4096 fp32: 22 against
    37 ms). bf16 rows multiply natively there (AMX or AVX-512 BF16), fp16 ones are upcast. On
    CUDA, fp16 operands use ``torch.mm(..., out_dtype=torch.float32)`` (torch >= 2.8), which
    keeps the fp32 accumulator's result instead of rounding it to fp16 (3 significant digits,
    which reordered near neighbours); on an older torch they are upcast first.
    """
    import torch

    if queries.device.type == "cuda":
        if queries.dtype == torch.float32:
            return queries @ rows.T
        try:
            return torch.mm(queries, rows.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            return queries.float() @ rows.float().T
    if queries.dtype in (torch.float32, torch.bfloat16):
        return (rows @ queries.T).float().T
    return (rows.float() @ queries.float().T).T


@dataclass(frozen=True)
class _Bf16Copy:
    """The rows less their mean, in bf16, with the fp32 squared norms of those differences."""

    centre: Any  # torch.Tensor, d, float32
    rows: Any  # torch.Tensor, n x d, bfloat16
    norms: Any  # torch.Tensor, n, float32


class _Pinned:
    """faiss's vector storage as numpy sees it, holding the faiss index that owns the memory:
    every view of the array keeps this object (its ``base``), so the index (and its mapping)
    cannot be freed while a view, a block or a tensor made from one is still in use."""

    def __init__(self, owner: Any, address: int, shape: tuple[int, int]) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "data": (address, False),
            "shape": shape,
            "typestr": "<f4",
            "version": 3,
        }


def flat_view(index: Any) -> MappedFlat | None:
    """The vectors and ids of ``index`` viewed in place when it is an ``IDMap2,Flat`` (an
    ``IndexIDMap2`` over an L2 ``IndexFlat``), else None. Read with ``IO_FLAG_MMAP_IFC`` the
    vectors stay in the file's mapping: nothing is read until a search touches them."""
    import faiss

    outer = faiss.downcast_index(index)
    if type(outer) is not faiss.IndexIDMap2:
        return None
    core = faiss.downcast_index(outer.index)
    if (
        type(core) not in (faiss.IndexFlat, faiss.IndexFlatL2)
        or core.metric_type != faiss.METRIC_L2
    ):
        return None
    ntotal, dim = int(core.ntotal), int(core.d)
    ids = faiss.vector_to_array(outer.id_map).astype(np.int64, copy=False)
    if not ntotal:
        return MappedFlat(np.zeros((0, dim), np.float32), ids)
    storage = faiss.rev_swig_ptr(core.get_xb(), ntotal * dim)
    address = storage.__array_interface__["data"][0]
    rows = np.asarray(_Pinned(index, address, (ntotal, dim)))
    _read_ahead(rows)
    return MappedFlat(rows, ids)


def _read_ahead(rows: np.ndarray) -> None:
    """Let the OS read ahead in the vectors' part of the mapping again: faiss maps with
    ``MADV_RANDOM``, and a first scan of 400 MB not in the page cache then faulted 4 KiB at a
    time, 6.6 s here against 0.24 s with ``MADV_NORMAL`` (what ``np.memmap`` maps with)."""
    try:
        import ctypes
        import mmap

        madvise = ctypes.CDLL(None, use_errno=True).madvise
        advice = mmap.MADV_NORMAL
    except (AttributeError, OSError, TypeError):  # no madvise here: scans are only slower
        return
    address = rows.__array_interface__["data"][0]
    start = address - address % mmap.PAGESIZE
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if madvise(start, address + rows.nbytes - start, advice) != 0:
        log.debug("madvise(MADV_NORMAL) failed (errno %d); scans read 4 KiB at a time",
                  ctypes.get_errno())  # fmt: skip


class MappedFlat:
    """The vectors and ids of an ``IDMap2,Flat`` index, viewed in place (see :func:`flat_view`);
    :meth:`search` is exact k-NN."""

    def __init__(self, rows: np.ndarray, ids: np.ndarray) -> None:
        self.ntotal, self.d = rows.shape
        # Writable as numpy sees it, because torch.from_numpy warns about read-only arrays;
        # the mapping itself is read-only, so nothing here ever writes through it.
        self._rows = rows
        self.vectors = rows.view()  # what callers get: numpy refuses writes to it
        self.vectors.flags.writeable = False
        self.ids = ids
        self._order = np.argsort(self.ids, kind="stable")
        self._norms: np.ndarray | None = None
        self._bf16: _Bf16Copy | None = None
        self._norms_lock = threading.Lock()

    def as_tensor(self) -> Any:
        """The vectors as a CPU torch tensor over the same memory (no copy); never write to it."""
        import torch

        return torch.from_numpy(self._rows)

    def blocks(self, rows: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(vectors, ids)`` in file order, ``rows`` at a time, as read-only views."""
        for start in range(0, self.ntotal, rows):
            yield self.vectors[start : start + rows], self.ids[start : start + rows]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` in the file; -1 where an id is not stored."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if not self.ntotal:
            return np.full(len(ids), -1, np.int64)
        at = np.searchsorted(self.ids, ids, sorter=self._order)
        at = np.minimum(at, self.ntotal - 1)
        rows = self._order[at]
        return np.where(self.ids[rows] == ids, rows, -1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (KeyError for an id that is not stored)."""
        rows = self.rows_of(ids)
        if (rows < 0).any():
            raise KeyError(f"id {int(np.asarray(ids).ravel()[rows < 0][0])} is not in the index")
        return np.array(self.vectors[rows], dtype=np.float32)

    def norms(self) -> np.ndarray:
        """|x|^2 of every row, computed once (a pass over the file) and kept (4 bytes a row)."""
        with self._norms_lock:
            if self._norms is None:
                norms = np.empty(self.ntotal, np.float32)
                step = max(1, _BLOCK_ELEMENTS // max(1, self.d))
                for s in range(0, self.ntotal, step):
                    block = self.vectors[s : s + step]
                    norms[s : s + len(block)] = np.einsum("ij,ij->i", block, block)
                self._norms = norms
            return self._norms

    def bf16_bytes(self) -> int:
        """Memory a bf16 copy of the rows takes."""
        return self.ntotal * self.d * 2

    def bf16_copy(self) -> _Bf16Copy:
        """The bf16 copy :meth:`search` scans with ``scan="bf16"``, made on first use (two
        passes over the file) and kept."""
        import torch

        with self._norms_lock:
            if self._bf16 is None:
                step = max(1, _BLOCK_ELEMENTS // max(1, self.d))
                total = torch.zeros(self.d, dtype=torch.float64)
                for s in range(0, self.ntotal, step):
                    block = torch.from_numpy(self._rows[s : s + step])
                    total += block.sum(0, dtype=torch.float64)
                centre = (total / max(1, self.ntotal)).float()
                rows = torch.empty((self.ntotal, self.d), dtype=torch.bfloat16)
                norms = torch.empty(self.ntotal, dtype=torch.float32)
                for s in range(0, self.ntotal, step):
                    block = torch.from_numpy(self._rows[s : s + step]) - centre
                    rows[s : s + len(block)] = block
                    norms[s : s + len(block)] = (block * block).sum(1)
                self._bf16 = _Bf16Copy(centre, rows, norms)
            return self._bf16

    def search(
        self, queries: np.ndarray, k: int, *, scan: str = "fp32"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, ids), each n x k, nearest first; inf / -1 past the end.
        ``scan``: ``fp32`` (the mapped file) or ``bf16`` (the copy) picks the candidates; either
        way they are ranked by exact fp32 distances."""
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {', '.join(SCANS)}, not {scan!r}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, k = len(q), int(k)
        dist = np.full((n, k), np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        if not self.ntotal or not n:
            return dist, ids
        if scan == "bf16":
            wanted = min(self.ntotal, k + BF16_MARGIN)
            candidates = self._bf16_candidates(q, wanted)
        else:
            wanted = min(self.ntotal, k + RERANK_MARGIN)
            candidates = self._candidates(q, wanted)
        exact = self._exact(q, candidates)
        # Rank by (exact distance, id); keep k.
        order = np.lexsort((self.ids[candidates], exact), axis=1)[:, :k]
        rows = np.take_along_axis(candidates, order, 1)
        kk = rows.shape[1]
        dist[:, :kk] = np.take_along_axis(exact, order, 1)
        ids[:, :kk] = self.ids[rows]
        return dist, ids

    def _candidates(self, q: np.ndarray, wanted: int) -> np.ndarray:
        """Row positions of the ``wanted`` nearest rows per query, by the expanded distance.

        The products run in torch: its CPU matrix-vector kernels use every core and measured
        7x numpy's here (20,000 x 4096 rows, one query: 24 ms against 166 ms on 2 cores).
        """
        import torch

        norms = torch.from_numpy(self.norms())
        step = max(wanted, _BLOCK_ELEMENTS // max(1, len(q)))
        _, rows = nearest(
            torch.from_numpy(q),
            lambda s, e: torch.from_numpy(self._rows[s:e]),
            norms,
            wanted,
            block_rows=step,
        )
        return rows.contiguous().numpy()

    def _bf16_candidates(self, q: np.ndarray, wanted: int) -> np.ndarray:
        """The same from the bf16 copy: bf16 products (fp32 accumulation), fp32 norms."""
        import torch

        copy = self.bf16_copy()
        tq = (torch.from_numpy(q) - copy.centre).to(torch.bfloat16)
        step = max(wanted, _BLOCK_ELEMENTS // max(1, len(q)))
        _, rows = nearest(tq, lambda s, e: copy.rows[s:e], copy.norms, wanted, block_rows=step)
        return rows.contiguous().numpy()

    def _exact(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """sum((x - q)^2) for each query's candidate rows, in float32 as faiss computes it."""
        out = np.empty(rows.shape, np.float32)
        for i in range(len(q)):
            order = np.argsort(rows[i])  # read the mapping front to back
            diff = np.asarray(self.vectors[rows[i][order]], dtype=np.float32) - q[i]
            out[i, order] = np.einsum("ij,ij->i", diff, diff)
        return out
