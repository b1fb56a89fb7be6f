"""Query results: images in, their nearest indexed images out, as records with paths and labels.

The searching itself is :class:`retrieval.Index`'s (it keeps the model and the searcher open);
this module holds what a result is and how raw ``(distances, ids)`` become one, so the Index,
the quality measures and the figures agree on it. Paths are absolute, as stored; showing them
relative to the current directory is the CLI's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.images.walk import find_images
from retrieval.indexes.rows import Row

MAX_K = 1000
EMPTY_INDEX = "the index holds no images yet: `retrieve index FOLDER` adds them"


@dataclass
class Neighbor:
    rank: int
    path: str
    distance: float
    label: str
    id: int


@dataclass
class QueryResult:
    """One query's neighbours, nearest first; ``error`` says why a query image could not be used.

    ``query_id`` is set when the query is itself an indexed row (``Index.neighbors``)."""

    query: str
    neighbors: list[Neighbor] = field(default_factory=list)
    error: str | None = None
    query_id: int | None = None

    def to_dict(self) -> dict:
        data: dict = {"query": self.query}
        if self.query_id is not None:
            data["id"] = self.query_id
        data["neighbors"] = [asdict(n) for n in self.neighbors]
        if self.error:
            data["error"] = self.error
        return data


def expand_queries(queries: Sequence[Path | str]) -> list[Path]:
    """Files as given; folders replaced by the images under them."""
    expanded: list[Path] = []
    for query in queries:
        query = Path(query)
        if query.is_dir():
            found, _ = find_images(query)
            if not found:
                raise RetrieveError(f"no images found in {query}")
            expanded.extend(found)
        elif not query.exists():
            raise RetrieveError(f"query image not found: {query}")
        else:
            expanded.append(query)
    return expanded


def check_k(k: int, count: int) -> None:
    """k must be 1..MAX_K, and the index (of ``count`` images) hold something to find. k is a
    most: an index holding fewer images gives all it holds (the default 6 on a collection of 3
    is not a mistake)."""
    if not 1 <= k <= MAX_K:
        raise RetrieveError(f"k must be between 1 and {MAX_K}, not {k}")
    if count < 1:
        raise RetrieveError(EMPTY_INDEX)


def neighbors_of(
    distances: np.ndarray, ids: np.ndarray, rows: dict[int, Row], skip_id: int, k: int
) -> list[Neighbor]:
    """The first ``k`` found rows, nearest first, leaving out ``skip_id`` (a query's own row)."""
    found = []
    for distance, row_id in zip(distances, ids):
        if row_id < 0 or row_id == skip_id or len(found) == k:
            continue
        row = rows[int(row_id)]
        found.append(Neighbor(len(found) + 1, row.path, float(distance), row.label, int(row_id)))
    return found
