"""precision@k and mAP of an index by folder labels; recall of an approximate index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval import Index
from retrieval.build.options import IndexOptions
from retrieval.build.run import index_folder
from retrieval.evaluation.retrieval_quality import evaluate_recall, evaluate_retrieval
from retrieval.indexes import store
from retrieval.indexes.kinds import IndexSpec
from retrieval.metrics import mean_average_precision, precision_at_k
from tests.corpus import make_labelled_folder


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    make_labelled_folder(tmp_path / "db", classes=3, per_class=5, size=48)
    return tmp_path / "db"


def test_retrieval_quality_matches_a_hand_ranking(labelled, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    index_folder(labelled, index_dir, IndexOptions(weights=str(small_model)))
    with Index.open(index_dir) as index:
        quality = evaluate_retrieval(index, labelled, k=3)
    assert quality.queries == 15 and quality.map_depth == 15

    # The same numbers by brute force over the stored vectors, each query left out of its ranking.
    snapshot = store.open_snapshot(index_dir)
    rows = list(snapshot.iter_rows(status="indexed"))
    vectors = np.stack([snapshot.index.reconstruct(r.id) for r in rows])
    labels = np.array([r.label for r in rows])
    ranked = []
    for i in range(len(rows)):
        distances = ((vectors - vectors[i]) ** 2).sum(axis=1)
        order = [j for j in np.argsort(distances, kind="stable") if j != i]
        ranked.append(labels[order])
    ranked = np.array(ranked)
    assert quality.precision_at_k == pytest.approx(precision_at_k(ranked, labels, 3), abs=1e-6)
    assert quality.mean_average_precision == pytest.approx(
        mean_average_precision(ranked, labels), abs=1e-6
    )
    assert quality.to_dict()["precision@3"] == quality.precision_at_k


def test_recall_of_an_approximate_index_against_the_exact_one(labelled, tmp_path, small_model):
    exact, approx = tmp_path / "exact", tmp_path / "hnsw"
    index_folder(labelled, exact, IndexOptions(weights=str(small_model)))
    index_folder(
        labelled, approx, IndexOptions(weights=str(small_model), spec=IndexSpec(kind="HNSW32"))
    )
    with Index.open(approx) as approximate, Index.open(exact) as exact_index:
        report = evaluate_recall(approximate, exact_index, k=5, queries=15)
    assert report.queries == 15 and report.recall_at_k >= 0.9
    assert report.exact_bytes > 0 and report.approximate_bytes > 0
