"""``retrieve query``: images in, their nearest indexed images out.

A query is prepared with the model and preprocessing the index records, and refused if the
weights differ: fc7 of another network lives in another space, so its neighbours would be noise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrieval.errors import IndexMismatchError, RetrieveError, WeightsError
from retrieval.extraction import extract_images
from retrieval.extraction.types import ExtractOptions
from retrieval.images.walk import find_images
from retrieval.indexes import querying, store
from retrieval.indexes.rows import Row
from retrieval.indexes.store import default_index_dir
from retrieval.model.weights import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class Neighbor:
    rank: int
    path: str
    distance: float
    label: str
    id: int


@dataclass
class QueryResult:
    """One query's neighbours, nearest first; ``error`` says why a query image could not be used."""

    query: str
    neighbors: list[Neighbor] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        data = {"query": self.query, "neighbors": [asdict(n) for n in self.neighbors]}
        if self.error:
            data["error"] = self.error
        return data


@dataclass(frozen=True)
class SearchOptions:
    k: int = 6
    weights: str | None = None  # None: the model the index records
    nprobe: int | None = None
    ef_search: int | None = None
    exclude_self: bool = False  # drop a query's own row (for evaluation on indexed images)
    extract: ExtractOptions = field(default_factory=ExtractOptions)


def display_path(path: str) -> str:
    """Relative to the current directory when below it, so it opens from here as printed."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def expand_queries(queries: Sequence[Path]) -> list[Path]:
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


def model_for_index(snapshot: store.Snapshot, weights: str | None, device: str) -> LoadedModel:
    """The model an index was built with, checked by the sha256 of its weights."""
    recorded = snapshot.manifest["model"]
    source = weights or recorded["source"]
    try:
        loaded = load_model(source, device="cpu" if device == "auto" else device)
    except WeightsError as exc:
        if weights:
            raise
        raise WeightsError(
            f"cannot load the model this index was built with ({exc}); pass it with --weights"
        ) from exc
    if loaded.sha256 != recorded["sha256"]:
        raise IndexMismatchError(
            f"{source} is not the model this index was built with ({recorded['source']}, sha256 "
            f"{recorded['sha256'][:12]}); query with that model or rebuild the index with "
            "`retrieve index FOLDER --rebuild --weights ...`"
        )
    return loaded


def search_images(
    queries: Sequence[Path], index_dir: Path | None = None, options: SearchOptions = SearchOptions()
) -> list[QueryResult]:
    """The ``k`` nearest indexed images of each query image, by Euclidean distance of fc7."""
    paths = expand_queries(queries)
    snapshot = store.open_snapshot(Path(index_dir or default_index_dir()))
    try:
        _check_k(options.k, snapshot.count)
        loaded = model_for_index(snapshot, options.weights, options.extract.device)
        features, records = extract_images(paths, loaded, options.extract)
        results = [QueryResult(query=display_path(r.path)) for r in records]
        good = [i for i, r in enumerate(records) if r.ok]
        for i, r in enumerate(records):
            if not r.ok:
                results[i].error = f"{r.reason}" + (f" ({r.detail})" if r.detail else "")
        if good:
            self_ids = _self_ids(snapshot, [records[i].path for i in good], options.exclude_self)
            extra = 1 if options.exclude_self else 0
            k = min(options.k + extra, snapshot.count)
            distances, ids = querying.search(
                snapshot.index,
                features,
                k,
                nprobe=options.nprobe,
                ef_search=options.ef_search,
                device=options.extract.device,
            )
            rows = snapshot.rows_by_id(ids.ravel())
            for slot, i in enumerate(good):
                results[i].neighbors = _neighbors(
                    distances[slot], ids[slot], rows, self_ids[slot], options.k
                )
        return results
    finally:
        snapshot.close()


def _check_k(k: int, count: int) -> None:
    if k < 1:
        raise RetrieveError(f"k must be at least 1, not {k}")
    if k > count:
        raise RetrieveError(
            f"k={k} is larger than the index, which holds {count} images; use -k {count} or less"
        )


def _self_ids(snapshot: store.Snapshot, paths: list[str], exclude: bool) -> list[int]:
    if not exclude:
        return [-1] * len(paths)
    rows = [snapshot.row_for_path(os.path.abspath(p)) for p in paths]
    return [row.id if row else -1 for row in rows]


def _neighbors(
    distances: np.ndarray, ids: np.ndarray, rows: dict[int, Row], skip_id: int, k: int
) -> list[Neighbor]:
    neighbors = []
    for distance, row_id in zip(distances, ids):
        if row_id < 0 or row_id == skip_id or len(neighbors) == k:
            continue
        row = rows[int(row_id)]
        neighbors.append(
            Neighbor(
                len(neighbors) + 1, display_path(row.path), float(distance), row.label, int(row_id)
            )
        )
    return neighbors
