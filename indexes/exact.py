"""Exact Euclidean search over the default ``IDMap2,Flat`` file, memory-mapped.

Why not faiss here: faiss scans one query on one thread, and reading its file through Python
copies every vector into the process (16 KiB a row). This maps the file's vector block
read-only (the OS pages it in once and shares it between processes and generations) and
answers with torch matrix products over blocks of rows, which use every core even for a
single query. Candidates are picked with ``|x|^2 - 2 q.x`` (norms computed once, on first use)
and the final ``k`` are ranked by exactly computed ``sum((x - q)^2)``: distances do not suffer
the cancellation of the expanded form (an indexed image is at distance 0 from itself), and the
answer is the same whether a query comes alone or in a batch. Ties go to the smaller id.

A long-lived searcher (``retrieve serve``) can instead scan a bf16 copy kept in memory
(``scan="bf16"``): half the bytes per query and native bf16 matrix products where the CPU has
them (``bench/scan_precision.py`` on a 2-core AMX Xeon, 60,000 x 4096, the whole search: one
query 28.7 against 32.6 ms, 16 queries 31.5 against 75.4 ms). The copy is of the rows less
their mean, so products stay small and the products' bf16 rounding costs less, and its best
``k + BF16_MARGIN`` candidates are re-ranked from the fp32 file exactly as above: the answer is
the exact one whenever the true ``k`` nearest are among them (``bench/scan_precision.py``
measures how often).

Safe to share between threads: the mapping is read-only and the norms and the bf16 copy are
made once, under a lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from . import flat_file

# Extra candidates per query re-ranked exactly: the expanded form's rounding (about 1e-7 of
# |x|^2) can swap only neighbours that close, and a margin of 16 covers any such run of ties.
RERANK_MARGIN = 16
# Candidates beyond k a bf16 scan hands to the exact re-ranking.
BF16_MARGIN = 64
SCANS = ("fp32", "bf16")
# Elements of one (rows x queries) product block: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class _Bf16Copy:
    """The rows less their mean, in bf16, with the fp32 squared norms of those differences."""

    centre: Any  # torch.Tensor, d, float32
    rows: Any  # torch.Tensor, n x d, bfloat16
    norms: Any  # torch.Tensor, n, float32


class MappedFlat:
    """The vectors and ids of an ``IDMap2,Flat`` file, mapped; :meth:`search` is exact k-NN."""

    def __init__(self, handle: BinaryIO) -> None:
        layout = flat_file.flat_layout(handle)
        self.d, self.ntotal = layout.dim, layout.ntotal
        if self.ntotal:
            # Copy-on-write: pages are read from the file and never written, but the array is
            # writable, which torch.from_numpy wants (it warns about read-only buffers).
            self.vectors = np.memmap(
                handle, dtype="<f4", mode="c", offset=layout.vectors_at, shape=(self.ntotal, self.d)
            )
            self.ids = np.array(
                np.memmap(handle, dtype="<i8", mode="r", offset=layout.ids_at, shape=(self.ntotal,))
            )
        else:
            self.vectors = np.zeros((0, self.d), np.float32)
            self.ids = np.zeros(0, np.int64)
        self._order = np.argsort(self.ids, kind="stable")
        self._norms: np.ndarray | None = None
        self._bf16: _Bf16Copy | None = None
        self._norms_lock = threading.Lock()

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
                    block = torch.from_numpy(self.vectors[s : s + step])
                    total += block.sum(0, dtype=torch.float64)
                centre = (total / max(1, self.ntotal)).float()
                rows = torch.empty((self.ntotal, self.d), dtype=torch.bfloat16)
                norms = torch.empty(self.ntotal, dtype=torch.float32)
                for s in range(0, self.ntotal, step):
                    block = torch.from_numpy(self.vectors[s : s + step]) - centre
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
        return _nearest_rows(
            lambda s, e: torch.from_numpy(self.vectors[s:e]), norms, torch.from_numpy(q), wanted
        )

    def _bf16_candidates(self, q: np.ndarray, wanted: int) -> np.ndarray:
        """The same from the bf16 copy: bf16 products (fp32 accumulation), fp32 norms."""
        import torch

        copy = self.bf16_copy()
        tq = (torch.from_numpy(q) - copy.centre).to(torch.bfloat16)
        return _nearest_rows(lambda s, e: copy.rows[s:e], copy.norms, tq, wanted)

    def _exact(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """sum((x - q)^2) for each query's candidate rows, in float32 as faiss computes it."""
        out = np.empty(rows.shape, np.float32)
        for i in range(len(q)):
            order = np.argsort(rows[i])  # read the mapping front to back
            diff = np.asarray(self.vectors[rows[i][order]], dtype=np.float32) - q[i]
            out[i, order] = np.einsum("ij,ij->i", diff, diff)
        return out


def _nearest_rows(block_of: Any, norms: Any, tq: Any, wanted: int) -> np.ndarray:
    """Row positions of the ``wanted`` smallest ``|x|^2 - 2 q.x`` per query, scanning the rows
    ``block_of(start, end)`` in blocks (a running top-k: memory stays one block)."""
    import torch

    total, n = len(norms), len(tq)
    step = max(wanted, _BLOCK_ELEMENTS // max(1, n))
    best_d = best_rows = None
    with torch.inference_mode():
        for s in range(0, total, step):
            block = block_of(s, s + step)
            products = (block @ tq.T).float()  # rows x queries
            d = norms[s : s + len(block), None] - 2.0 * products
            part_d, part_rows = torch.topk(d, min(wanted, len(block)), dim=0, largest=False)
            part_rows += s
            if best_d is not None:
                part_d = torch.cat([best_d, part_d])
                part_rows = torch.cat([best_rows, part_rows])
                part_d, keep = torch.topk(part_d, wanted, dim=0, largest=False)
                part_rows = torch.gather(part_rows, 0, keep)
            best_d, best_rows = part_d, part_rows
    return best_rows.T.contiguous().numpy()
