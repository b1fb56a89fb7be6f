"""Stored vectors by position, in blocks: an index's rows or a plain array (benchmarks).

The collection tools walk every vector more than once (PCA sample, reduced copy, verification);
this small interface lets them do so from an :class:`~retrieval.Index` (memory-mapped
``reconstruct``) or from a NumPy array / memmap of synthetic vectors alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from retrieval.indexes.rows import Row
    from retrieval.search.index import Index

BLOCK = 8192  # 8192 x 4096 float32 = 128 MiB per block


class VectorSource(Protocol):
    count: int
    dim: int

    def take(self, positions: np.ndarray) -> np.ndarray:
        """float32 vectors at these positions (0..count-1), in that order."""


@dataclass
class ArrayVectors:
    """Vectors held in (or mapped from) one N x D array."""

    array: np.ndarray

    @property
    def count(self) -> int:
        return len(self.array)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        if len(positions) and np.all(np.diff(positions) == 1):
            block = self.array[positions[0] : positions[-1] + 1]
        else:
            block = self.array[positions]
        return np.ascontiguousarray(block, dtype=np.float32)


class IndexVectors:
    """An index's indexed rows, in id order; position ``p`` is ``rows[p]``."""

    def __init__(self, index: Index, rows: Sequence[Row] | None = None) -> None:
        self.index = index
        self.rows = list(rows) if rows is not None else index.rows(limit=None)
        self.ids = np.asarray([r.id for r in self.rows], np.int64)
        self.count = len(self.rows)
        self.dim = index.dim

    def take(self, positions: np.ndarray) -> np.ndarray:
        ids = self.ids[np.asarray(positions, np.int64)]
        return np.ascontiguousarray(self.index.vectors(ids), dtype=np.float32)


def blocks(count: int, size: int = BLOCK) -> Iterator[np.ndarray]:
    """Positions 0..count-1 in consecutive blocks."""
    for start in range(0, count, size):
        yield np.arange(start, min(count, start + size), dtype=np.int64)


def sample_positions(count: int, size: int, seed: int) -> np.ndarray:
    """A sorted seeded sample of ``size`` positions (all of them when fewer)."""
    if size >= count:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=size, replace=False)).astype(np.int64)
