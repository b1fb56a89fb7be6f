"""Exact Euclidean search over the default ``IDMap2,Flat`` file, memory-mapped.

Why not faiss here: faiss scans one query on one thread, and reading its file through Python
copies every vector into the process (16 KiB a row). This maps the file's vector block
read-only (the OS pages it in once and shares it between processes and generations) and
answers with torch matrix products over blocks of rows, which use every core even for a
single query. Candidates are picked with ``|x|^2 - 2 q.x`` (norms computed once, on first use)
and the final ``k`` are ranked by exactly computed ``sum((x - q)^2)``: distances do not suffer
the cancellation of the expanded form (an indexed image is at distance 0 from itself), and the
answer is the same whether a query comes alone or in a batch. Ties go to the smaller id.

Safe to share between threads: the mapping is read-only and the norms are computed under a lock.
"""

from __future__ import annotations

import threading
from typing import BinaryIO

import numpy as np

from . import flat_file

# Extra candidates per query re-ranked exactly: the expanded form's rounding (about 1e-7 of
# |x|^2) can swap only neighbours that close, and a margin of 16 covers any such run of ties.
RERANK_MARGIN = 16
# Elements of one (rows x queries) product block: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, ids), each n x k, nearest first; inf / -1 past the end."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, k = len(q), int(k)
        dist = np.full((n, k), np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        if not self.ntotal or not n:
            return dist, ids
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
        tq = torch.from_numpy(q)
        step = max(wanted, _BLOCK_ELEMENTS // max(1, len(q)))
        best_d = best_rows = None
        with torch.inference_mode():
            for s in range(0, self.ntotal, step):
                block = torch.from_numpy(self.vectors[s : s + step])
                d = norms[s : s + len(block), None] - 2.0 * (block @ tq.T)  # rows x queries
                part_d, part_rows = torch.topk(d, min(wanted, len(block)), dim=0, largest=False)
                part_rows += s
                if best_d is not None:
                    part_d = torch.cat([best_d, part_d])
                    part_rows = torch.cat([best_rows, part_rows])
                    part_d, keep = torch.topk(part_d, wanted, dim=0, largest=False)
                    part_rows = torch.gather(part_rows, 0, keep)
                best_d, best_rows = part_d, part_rows
        return best_rows.T.contiguous().numpy()

    def _exact(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """sum((x - q)^2) for each query's candidate rows, in float32 as faiss computes it."""
        out = np.empty(rows.shape, np.float32)
        for i in range(len(q)):
            order = np.argsort(rows[i])  # read the mapping front to back
            diff = np.asarray(self.vectors[rows[i][order]], dtype=np.float32) - q[i]
            out[i, order] = np.einsum("ij,ij->i", diff, diff)
        return out
