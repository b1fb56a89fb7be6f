"""Metrics against examples worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.metrics import (
    average_precision,
    informative_ks,
    mean_average_precision,
    precision_at_k,
    recall_at_k,
    topk_accuracy,
    topk_correct,
)


def test_topk_counts_targets_among_the_largest_logits() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # target 1: top-1
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # target 4: 5th largest -> top-5 only
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # target 5: 6th largest -> neither
        ]
    )
    targets = torch.tensor([1, 4, 5])
    assert topk_correct(logits, targets, (1, 5)) == {1: 1, 5: 2}
    assert topk_accuracy(logits, targets, (1, 5)) == {
        1: pytest.approx(1 / 3),
        5: pytest.approx(2 / 3),
    }


def test_topk_with_k_beyond_the_classes_counts_every_row() -> None:
    logits = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert topk_correct(logits, torch.tensor([0, 1]), (1, 5)) == {1: 0, 5: 2}


def test_precision_at_k_is_the_share_of_same_label_neighbours() -> None:
    neighbours = np.array([["a", "a", "b", "a"], ["b", "c", "c", "b"]])
    assert precision_at_k(neighbours, ["a", "b"], 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert precision_at_k(neighbours, ["a", "b"], 1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        precision_at_k(neighbours, ["a", "b"], 5)


def test_average_precision_of_one_ranking() -> None:
    # Relevant at ranks 1, 3 and 6: AP = (1/1 + 2/3 + 3/6) / 3.
    ranking = [1, 0, 1, 0, 0, 1]
    assert average_precision(ranking) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    # A truncated ranking that saw only 3 of 4 relevant items: the missing one scores 0.
    assert average_precision(ranking, n_relevant=4) == pytest.approx((1 + 2 / 3 + 3 / 6) / 4)
    assert average_precision([0, 0, 0]) == 0.0


def test_mean_average_precision_over_full_rankings() -> None:
    ranked = np.array([[0, 1, 0, 1], [1, 1, 0, 0]])
    queries = np.array([0, 0])
    ap0 = (1 + 2 / 3) / 2  # relevant at 1 and 3
    ap1 = (1 / 3 + 2 / 4) / 2  # relevant at 3 and 4
    assert mean_average_precision(ranked, queries) == pytest.approx((ap0 + ap1) / 2)
    assert mean_average_precision(ranked, queries) == pytest.approx(
        np.mean([average_precision(r == q) for r, q in zip(ranked, queries, strict=True)])
    )


def test_mean_average_precision_of_truncated_rankings_counts_missing_items() -> None:
    ranked = np.array([["x", "y"]])
    assert mean_average_precision(ranked, ["x"], n_relevant=[2]) == pytest.approx(0.5)


def test_recall_at_k_counts_true_neighbours_found_in_any_order() -> None:
    true_ids = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 9, 1, 2], [6, -1, -1, -1]])  # faiss pads with -1
    # k=3: query 0 found {3, 1} of {1, 2, 3} within its first 3 -> 2; query 1 found {6} -> 1.
    assert recall_at_k(found, true_ids, 3) == pytest.approx(3 / 6)
    assert recall_at_k(found, true_ids, 1) == 0.0  # nearest 1 is not found[0, :1] = [3]
    assert recall_at_k(np.array([[1, 7], [5, 4]]), true_ids, 1) == pytest.approx(0.5)
    assert recall_at_k(true_ids, true_ids, 3) == 1.0


def test_recall_at_k_ignores_padding_in_the_true_ids() -> None:
    assert recall_at_k(np.array([[-1, -1]]), np.array([[-1, -1]]), 2) == 0.0


def test_recall_at_k_refuses_a_k_beyond_the_true_neighbours() -> None:
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 5), int), np.zeros((2, 3), int), 4)


def test_top_k_is_reported_only_where_it_can_be_wrong() -> None:
    assert informative_ks(2) == informative_ks(5) == (1,)  # every row is in its top 5
    assert informative_ks(6) == informative_ks(1000) == (1, 5)
