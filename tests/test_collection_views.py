"""retrieve cluster and retrieve map: every image once, seeded, scored, drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval import Index
from retrieval.build.options import IndexOptions
from retrieval.collection.clusters import default_cluster_count, kmeans, label_scores, purity
from retrieval.collection.layout import snap_to_grid
from retrieval.collection.vectors import ArrayVectors


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, small_model):
    from tests.corpus import make_labelled_folder

    root = tmp_path_factory.mktemp("views")
    make_labelled_folder(root / "photos", classes=3, per_class=5, size=48)
    ix = Index.create(root / "idx", root / "photos", IndexOptions(weights=str(small_model)))
    yield ix
    ix.close()


def cli():
    import click

    from retrieval.cli import collection_cmds

    group = click.Group()
    collection_cmds.register(group)
    return group


def test_cluster_assigns_every_image_exactly_once(indexed, tmp_path) -> None:
    args = ["cluster", "-n", "3", "--index", str(indexed.directory), "--json"]
    result = CliRunner().invoke(cli(), [*args, "-o", str(tmp_path / "sheets")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(r.id for r in indexed.rows(limit=None))
    assert {r["cluster"] for r in lines} <= {0, 1, 2}
    assert all(r["distance"] >= 0 for r in lines)
    assert "purity" in result.stderr and "NMI" in result.stderr
    sheets = sorted(p.name for p in (tmp_path / "sheets").glob("*.png"))
    assert "outliers.png" in sheets and len(sheets) == 1 + len({r["cluster"] for r in lines})
    again = CliRunner().invoke(cli(), args)
    assert again.stdout == result.stdout  # seeded


def test_a_small_collection_clusters_without_faiss_asking_for_more_points(indexed, capfd):
    result = CliRunner().invoke(cli(), ["cluster", "-n", "3", "--index", str(indexed.directory)])
    assert result.exit_code == 0, result.output
    assert "15 images in 3 clusters" in result.stdout
    assert "please provide" not in capfd.readouterr().err  # faiss's own warning, on fd 2


def test_cluster_without_n_uses_the_default_count_the_page_uses(indexed) -> None:
    result = CliRunner().invoke(cli(), ["cluster", "--index", str(indexed.directory), "--json"])
    assert result.exit_code == 0, result.output
    clusters = {json.loads(line)["cluster"] for line in result.stdout.splitlines()}
    assert clusters == set(range(default_cluster_count(15))) == set(range(10))
    assert default_cluster_count(3) == 3 and default_cluster_count(10_000) == 10


def test_kmeans_separates_well_apart_blobs_in_full_and_pca_space() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(4, 64))
    truth = np.repeat(np.arange(4), 50)
    data = (centres[truth] + rng.normal(size=(200, 64))).astype(np.float32)
    for pca in (None, 8):
        found = kmeans(ArrayVectors(data), 4, pca_dim=pca)
        assert purity(truth, found.assignment) == 1.0
        assert found.sizes().sum() == 200
        assert set(found.outliers(5)) <= set(range(200))


def test_purity_and_nmi_against_labels() -> None:
    labels = ["a", "a", "b", "b"]
    assert label_scores(labels, np.array([0, 0, 1, 1])) == {"purity": 1.0, "nmi": 1.0}
    assert purity(labels, np.array([0, 0, 0, 0])) == 0.5
    assert label_scores(["a", "a"], np.array([0, 1])) is None


def test_snap_to_grid_gives_each_point_its_own_cell_keeping_order() -> None:
    points = np.array([[0.0, 0.0], [0.01, 0.0], [10.0, 10.0], [0.0, 10.0], [10.0, 0.0]])
    cells, side = snap_to_grid(points)
    assert len({tuple(c) for c in cells}) == 5 and side * side >= 5
    assert (cells >= 0).all() and (cells < side).all()
    assert tuple(cells[2]) == (side - 1, side - 1) and tuple(cells[3]) == (0, side - 1)


@pytest.mark.parametrize("color", ["label", "cluster"])
def test_map_draws_sampled_thumbnails(indexed, tmp_path, color) -> None:
    out = tmp_path / "map.png"
    args = ["map", "--index", str(indexed.directory), "-o", str(out), "--color", color]
    result = CliRunner().invoke(cli(), [*args, "--max", "12", "--tile", "24"])
    assert result.exit_code == 0, result.output
    assert "12 of 15 images" in result.stdout
    width, height = Image.open(out).size
    assert width > 4 * 24 and height > 4 * 24
