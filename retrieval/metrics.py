"""Classification and retrieval metrics: one implementation each, pure NumPy / torch.

- ``topk_correct`` / ``topk_accuracy``: the paper's top-1 and top-5 (section 4, Table 1).
- ``precision_at_k``: the share of the k nearest database images with the query's label; the
  paper's Figure 4 shows k = 6 and calls it a retrieval by class (section 6.1).
- ``average_precision`` / ``mean_average_precision``: over the full ranking of the database
  (same label = relevant), the usual figure for retrieval.
- ``recall_at_k``: how many of the exact k nearest neighbours an approximate search found, as
  faiss reports for its approximate indexes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Number of rows whose target is among the ``k`` largest logits, for each ``k``.

    A ``k`` at least the number of classes counts every row as correct (k is clipped)."""
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # ties broken by torch, as torchvision's references do
    hits = top.eq(targets.view(-1, 1))
    return {k: int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def informative_ks(n_classes: int, ks: Sequence[int] = (1, 5)) -> tuple[int, ...]:
    """The ``ks`` a top-k score says something at: with ``n_classes`` at most k, every row is
    right (a 3-class model's top-5 is always 100%), so that k is not reported."""
    return tuple(k for k in ks if k == 1 or k < n_classes)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy in [0, 1] for each ``k``."""
    n = max(int(targets.shape[0]), 1)
    return {k: c / n for k, c in topk_correct(logits, targets, ks).items()}


def _as_labels(array: Sequence | np.ndarray) -> np.ndarray:
    return np.asarray(array)


def precision_at_k(
    neighbor_labels: np.ndarray | Sequence, query_labels: np.ndarray | Sequence, k: int
) -> float:
    """Mean over queries of the share of the first ``k`` neighbours with the query's label.

    ``neighbor_labels`` is ``(n_queries, >= k)``: the labels of each query's ranked neighbours.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, not {k}")
    neighbors = _as_labels(neighbor_labels)
    queries = _as_labels(query_labels).reshape(-1, 1)
    if neighbors.ndim != 2 or neighbors.shape[0] != queries.shape[0]:
        raise ValueError("neighbor_labels must be (n_queries, k) with one row per query label")
    if neighbors.shape[1] < k:
        raise ValueError(f"only {neighbors.shape[1]} neighbours per query for precision@{k}")
    if neighbors.shape[0] == 0:
        return 0.0
    return float((neighbors[:, :k] == queries).mean())


def average_precision(relevant: np.ndarray | Sequence, n_relevant: int | None = None) -> float:
    """AP of one ranking: the mean of precision@i over the ranks i of the relevant items.

    ``relevant`` is a boolean vector over the ranked database (nearest first). ``n_relevant`` is
    the number of relevant items in the whole database, when ``relevant`` is a truncated ranking;
    by default the ranking is taken to be complete.
    """
    hits = np.asarray(relevant, dtype=bool).ravel()
    total = int(hits.sum()) if n_relevant is None else int(n_relevant)
    if total == 0:
        return 0.0
    ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the relevant items
    precisions = np.arange(1, len(ranks) + 1) / ranks
    return float(precisions.sum() / total)


def mean_average_precision(
    ranked_labels: np.ndarray | Sequence,
    query_labels: np.ndarray | Sequence,
    n_relevant: np.ndarray | Sequence | None = None,
) -> float:
    """mAP over queries; ``ranked_labels`` is ``(n_queries, n_ranked)``, nearest first.

    For mAP over the full database ranking pass every database label per query (n_ranked = the
    database size). For a truncated ranking pass ``n_relevant`` (per query: how many database
    items share its label), so missing relevant items count as not found.
    """
    ranked = _as_labels(ranked_labels)
    queries = _as_labels(query_labels).reshape(-1, 1)
    if ranked.ndim != 2 or ranked.shape[0] != queries.shape[0]:
        raise ValueError("ranked_labels must be (n_queries, n_ranked) with one row per query")
    if ranked.shape[0] == 0:
        return 0.0
    relevant = ranked == queries
    totals = relevant.sum(axis=1) if n_relevant is None else np.asarray(n_relevant).ravel()
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, ranked.shape[1] + 1)
    precision_sums = np.where(relevant, hits / ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(totals > 0, precision_sums / np.maximum(totals, 1), 0.0)
    return float(ap.mean())


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int) -> float:
    """Share of the exact ``k`` nearest neighbours that an approximate search returned.

    ``found_ids`` is ``(n, k')``: the ids an index returned (``-1`` pads missing results, as
    faiss does); ``true_ids`` is ``(n, >= k)``: the exact neighbours, nearest first. Recall counts,
    per query, how many of ``true_ids[:, :k]`` appear anywhere in ``found_ids[:, :k]`` (order
    ignored), divided by ``n * k``. With ``k' > k`` only the first ``k`` found ids count.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, not {k}")
    found = np.asarray(found_ids)
    true = np.asarray(true_ids)
    if found.ndim != 2 or true.ndim != 2 or found.shape[0] != true.shape[0]:
        raise ValueError(f"found_ids {found.shape} and true_ids {true.shape} must be (n, k) each")
    if true.shape[1] < k:
        raise ValueError(f"true_ids has {true.shape[1]} columns, fewer than k={k}")
    if found.shape[0] == 0:
        return 0.0
    found_k = found[:, :k]
    true_k = true[:, :k]
    # (n, k, 1) against (n, 1, k'): small k keeps this cheap and exact.
    matched = (true_k[:, :, None] == found_k[:, None, :]) & (true_k[:, :, None] >= 0)
    return float(matched.any(axis=2).sum() / (true_k.shape[0] * k))
