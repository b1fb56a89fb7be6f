"""Bugs found by reading the code, each pinned; old indexes still read; exact quality numbers."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval import Index, IndexSpec
from retrieval.build.options import IndexOptions
from retrieval.build.run import index_folder
from retrieval.cli.main import cli
from retrieval.errors import IndexMismatchError
from retrieval.evaluation.retrieval_quality import evaluate_retrieval
from retrieval.indexes import store
from tests.corpus import make_image


def run(*args: object, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


@pytest.fixture
def twins(tmp_path: Path) -> Path:
    """Two classes, each three identical copies of one image: every query's same-class
    neighbours are at distance 0, so precision and mAP are known exactly."""
    root = tmp_path / "twins"
    for label, seed in (("a", 1), ("b", 2)):
        first = make_image(root / label / "0.png", size=(48, 48), seed=seed)
        for copy in (1, 2):
            shutil.copy(first, root / label / f"{copy}.png")
    return root


def test_evaluate_retrieval_gives_the_exact_numbers_of_a_hand_built_case(
    twins: Path, tmp_path: Path, small_model: Path
) -> None:
    index_dir = tmp_path / "idx"
    index_folder(twins, index_dir, IndexOptions(weights=str(small_model)))
    # Each query (its own row left out) has 2 relevant rows, ranked first: p@2 = 1, p@4 = 2/4.
    with Index.open(index_dir) as index:
        assert evaluate_retrieval(index, twins, k=2).precision_at_k == 1.0
        quality = evaluate_retrieval(index, twins, k=4)
    assert quality.precision_at_k == 0.5 and quality.mean_average_precision == 1.0


def test_map_depth_smaller_than_k_ranks_k_for_precision_and_depth_for_map(
    twins: Path, tmp_path: Path, small_model: Path
) -> None:
    index_dir = tmp_path / "idx"
    index_folder(twins, index_dir, IndexOptions(weights=str(small_model)))
    data = json.loads(
        run(
            "evaluate", twins, "--retrieval", "--index", index_dir, "-k", "4",
            "--map-depth", "1", "--json",
        ).stdout
    )  # fmt: skip
    # depth 1: one of the two relevant rows is seen, at rank 1 -> AP = (1/1) / 2.
    assert data["precision@4"] == 0.5 and data["mean_average_precision"] == 0.5
    assert data["map_depth"] == 1


def test_grid_has_one_row_per_query_and_leaves_each_query_out_of_its_row(
    twins: Path, tmp_path: Path, small_model: Path
) -> None:
    index_dir = tmp_path / "idx"
    index_folder(twins, index_dir, IndexOptions(weights=str(small_model)))
    queries = sorted(twins.rglob("*.png"))[:3]
    with Index.open(index_dir) as index:
        out, results = index.grid(queries, tmp_path / "grid.png", k=3, tile=32)
    assert [r.query for r in results] == [str(q.resolve()) for q in queries]
    for result in results:
        assert len(result.neighbors) == 3
        assert result.query not in [n.path for n in result.neighbors]
    with Image.open(out) as image:
        rgb = image.convert("RGB")
        # Each row starts with the query in a red frame: count the frames down the left edge.
        column = [rgb.getpixel((2, y)) == (200, 30, 30) for y in range(rgb.height)]
        frames = sum(1 for y in range(1, len(column)) if column[y] and not column[y - 1])
        assert frames == 3 and rgb.width > 4 * 32


def _downgrade_to_format_1(index_dir: Path) -> None:
    path = index_dir / store.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["identity"]
    manifest["version"] = 1
    path.write_text(json.dumps(manifest))


def test_an_index_of_format_1_is_read_queried_and_upgraded_on_update(
    photos: Path, tmp_path: Path, small_model: Path
) -> None:
    index_dir = tmp_path / "idx"
    index_folder(photos, index_dir, IndexOptions(weights=str(small_model)))
    _downgrade_to_format_1(index_dir)
    text = run("info", "--index", index_dir).stdout
    assert "fp32 (precision assumed" in text
    query = sorted(photos.rglob("*.png"))[0]
    with Index.open(index_dir) as ix:
        assert ix.search([query], k=1)[0].neighbors[0].path == str(query)
    make_image(photos / "new" / "x.png", size=(40, 40), seed=9)
    index_folder(photos, index_dir)
    manifest = json.loads((index_dir / store.MANIFEST).read_text())
    assert manifest["version"] == store.FORMAT_VERSION and manifest["identity"]["precision"]


def test_a_newer_format_is_refused_with_one_line(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    index_folder(photos, index_dir, IndexOptions(weights=str(small_model)))
    path = index_dir / store.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["version"] = store.FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    result = run("info", "--index", index_dir, code=1)
    assert "newer retrieve" in result.stderr and result.stderr.count("\n") == 1


def test_rows_file_retired_between_the_two_opens_is_retried_not_called_damaged(
    photos, tmp_path, small_model, monkeypatch
) -> None:
    """A writer may delete generation g's rows file after a reader read the manifest naming
    it: the reader must retry with the new manifest, not report a healthy index as damaged."""
    index_dir = tmp_path / "idx"
    index_folder(photos, index_dir, IndexOptions(weights=str(small_model)))
    real_connect = store._connect_read_only
    calls = []

    def racing_connect(path: Path) -> sqlite3.Connection:
        calls.append(path)
        if len(calls) == 1:  # the writer retires the file just now, then commits g+1
            shutil.copy(path, path.with_name("rows.99.sqlite"))
            shutil.copy(index_dir / "vectors.1.faiss", index_dir / "vectors.99.faiss")
            path.unlink()
            manifest = json.loads((index_dir / store.MANIFEST).read_text())
            manifest["generation"] = 99
            manifest["files"] = {"vectors": "vectors.99.faiss", "rows": "rows.99.sqlite"}
            (index_dir / store.MANIFEST).write_text(json.dumps(manifest))
        return real_connect(path)

    monkeypatch.setattr(store, "_connect_read_only", racing_connect)
    snapshot = store.open_snapshot(index_dir)
    assert snapshot.manifest["generation"] == 99 and snapshot.count == 12
    snapshot.close()


def _open_files_under(directory: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_a_refused_update_leaves_no_file_of_the_index_open(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    index_folder(photos, index_dir, IndexOptions(weights=str(small_model)))
    assert _open_files_under(index_dir) == []
    with pytest.raises(IndexMismatchError):
        index_folder(photos, index_dir, IndexOptions(weights="random:5"))
    with pytest.raises(IndexMismatchError):
        index_folder(photos, index_dir, IndexOptions(spec=IndexSpec("HNSW32")))
    assert _open_files_under(index_dir) == []
