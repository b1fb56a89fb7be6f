"""How good an index is: precision@k and mAP by labels, and recall of an approximate index.

Labels are folder names (``index`` records each row's parent folder): a neighbour is relevant when
it shares the query's label, the paper's reading of Figure 4. Queries stream through the model in
batches and are searched in batches, so memory stays flat for any number of queries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.images.walk import label_of
from retrieval.indexes.rows import Row
from retrieval.metrics import mean_average_precision, precision_at_k, recall_at_k
from retrieval.results import expand_queries

SEARCH_BATCH = 256


@dataclass
class RetrievalQuality:
    queries: int
    k: int
    precision_at_k: float
    mean_average_precision: float
    map_depth: int  # mAP ranks this many neighbours; equal to the index size means the full ranking
    skipped_queries: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            f"precision@{self.k}" if key == "precision_at_k" else key: value
            for key, value in asdict(self).items()
        }


class Searchable(Protocol):
    """What the measures need of an open index (``retrieval.Index`` is one)."""

    count: int
    identity: Any
    vectors_bytes: int

    def embed_files(self, paths: Sequence[Path]) -> Iterator[Any]: ...
    def search_vectors(self, vectors: np.ndarray, k: int, **knobs: Any) -> tuple: ...
    def vectors(self, ids: Sequence[int]) -> np.ndarray: ...
    def rows(self, ids: Sequence[int] | None = None, **where: Any) -> list[Row]: ...
    def id_of(self, path: str | Path) -> int | None: ...


def evaluate_retrieval(
    index: Searchable,
    queries: Path | list[Path],
    *,
    k: int = 6,
    map_depth: int | None = None,
) -> RetrievalQuality:
    """precision@k and mAP of labelled query images (label = parent folder) against an index.

    A query that is itself in the index is left out of its own ranking. mAP ranks the
    ``map_depth`` nearest rows (default: all of them, the full ranking); precision@k always
    looks at ``k``, whichever is smaller.
    """
    started = time.perf_counter()
    paths = expand_queries(queries if isinstance(queries, list) else [queries])
    count = index.count
    if k > count:
        raise RetrieveError(f"k={k} is larger than the index ({count} images)")
    codes, database_labels = _label_codes(index.rows(limit=None))
    per_label = np.bincount(database_labels[database_labels >= 0], minlength=len(codes))
    depth = min(map_depth or count, count)
    ranked_depth = max(depth, k)
    precisions, aps, skipped = [], [], 0
    for batch in index.embed_files(paths):
        skipped += len(batch.records) - len(batch.features)
        good = [r for r in batch.records if r.ok]
        if not good:
            continue
        query_labels = np.array([codes.get(label_of(r.path), -2) for r in good])
        self_ids = [_own_id(index, r.path) for r in good]
        for start in range(0, len(good), SEARCH_BATCH):
            part = slice(start, start + SEARCH_BATCH)
            ranked = _ranked_labels(
                index, batch.features[part], self_ids[part], ranked_depth, database_labels
            )
            labels = query_labels[part]
            relevant = np.where(labels >= 0, per_label[np.maximum(labels, 0)], 0)
            relevant -= np.array([1 if i >= 0 else 0 for i in self_ids[part]])
            precisions.append(precision_at_k(ranked[:, :k], labels, k) * len(labels))
            aps.append(mean_average_precision(ranked[:, :depth], labels, relevant) * len(labels))
    n = len(paths) - skipped
    if n == 0:
        raise RetrieveError("no query image could be used")
    return RetrievalQuality(
        n, k, sum(precisions) / n, sum(aps) / n, depth, skipped, time.perf_counter() - started
    )


def _label_codes(rows: list[Row]) -> tuple[dict[str, int], np.ndarray]:
    """Label name -> code, and an array mapping row id -> label code (-1 where no row)."""
    codes: dict[str, int] = {}
    by_id = np.full(max((r.id for r in rows), default=0) + 1, -1, dtype=np.int64)
    for row in rows:
        by_id[row.id] = codes.setdefault(row.label, len(codes))
    return codes, by_id


def _own_id(index: Searchable, path: str) -> int:
    found = index.id_of(path)
    return -1 if found is None else found


def _ranked_labels(
    index: Searchable,
    features: np.ndarray,
    self_ids: list[int],
    depth: int,
    database_labels: np.ndarray,
) -> np.ndarray:
    """Label codes of each query's ``depth`` nearest rows, its own row left out (-1 pads)."""
    extra = 1 if any(i >= 0 for i in self_ids) else 0
    _, ids = index.search_vectors(features, min(depth + extra, index.count))
    ranked = np.full((len(ids), depth), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(ids, self_ids)):
        found = found[(found >= 0) & (found != own)][:depth]
        ranked[row, : len(found)] = database_labels[found]
    return ranked


@dataclass
class RecallReport:
    queries: int
    k: int
    recall_at_k: float
    exact_queries_per_second: float
    approximate_queries_per_second: float
    exact_bytes: int
    approximate_bytes: int


def evaluate_recall(
    approximate: Searchable,
    exact: Searchable,
    *,
    k: int = 10,
    queries: int = 1000,
    seed: int = 0,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> RecallReport:
    """recall@k of an approximate index against an exact one over the same files.

    The queries are stored vectors of the exact index (a seeded sample), matched across the two
    indexes by path, since each index numbers its rows itself.
    """
    if approximate.identity.weights_sha256 != exact.identity.weights_sha256:
        raise RetrieveError("the two indexes were built with different models")
    exact_rows = {r.id: r.path for r in exact.rows(limit=None)}
    approx_ids = {r.path: r.id for r in approximate.rows(limit=None)}
    rng = np.random.default_rng(seed)
    sample = rng.choice(sorted(exact_rows), min(queries, len(exact_rows)), replace=False)
    vectors = exact.vectors([int(i) for i in sample])
    k = min(k, exact.count, approximate.count)
    start = time.perf_counter()
    _, true_ids = exact.search_vectors(vectors, k)
    exact_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, found = approximate.search_vectors(vectors, k, nprobe=nprobe, ef_search=ef_search)
    approx_seconds = time.perf_counter() - start
    translate = np.vectorize(lambda i: approx_ids.get(exact_rows.get(int(i), ""), -2))
    recall = recall_at_k(found, translate(true_ids), k)
    return RecallReport(
        len(vectors),
        k,
        recall,
        len(vectors) / exact_seconds,
        len(vectors) / approx_seconds,
        exact.vectors_bytes,
        approximate.vectors_bytes,
    )
