"""`retrieve index --from-embeddings`: shards written elsewhere become an index that answers as
the original does; a bad shard is one clear error and nothing is committed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval import Index
from retrieval.cli.main import cli
from retrieval.indexes import shards

pytest.importorskip("pyarrow")


def run(*args: object, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


def write_shards_of(index_dir: Path, out: Path, rows_per_shard: int = 5) -> None:
    """The index's rows and vectors as shards, in the layout `retrieve export` writes."""
    with Index.open(index_dir) as ix:
        model = {"model": ix.manifest["model"], "identity": ix.manifest["identity"]}
        if ix.manifest.get("fp32_agreement"):
            model["fp32_agreement"] = ix.manifest["fp32_agreement"]
        rows = ix.rows(limit=None)
        skipped = ix.rows(status="skipped", limit=None)
        with shards.ShardWriter(out, model, ix.dim, rows_per_shard=rows_per_shard) as writer:
            meta = shards.ShardRows(
                [r.id for r in rows],
                [r.path for r in rows],
                [r.label for r in rows],
                [r.sha256 for r in rows],
                [r.size for r in rows],
                [r.mtime_ns for r in rows],
            )
            bad = shards.SkippedRows(
                [r.id for r in skipped],
                [r.path for r in skipped],
                [r.reason for r in skipped],
                [r.detail or "" for r in skipped],
            )
            writer.add(ix.vectors([r.id for r in rows]), meta, bad)


@pytest.fixture
def original(photos: Path, tmp_path: Path, small_model: Path) -> Path:
    (photos / "junk.jpg").write_text("not an image")
    index_dir = tmp_path / "original"
    run("index", photos, "--index", index_dir, "--weights", small_model)
    return index_dir


def test_an_index_from_exported_shards_answers_as_the_original(original, photos, tmp_path):
    out = tmp_path / "shards"
    write_shards_of(original, out)
    assert len(shards.open_shards(out)) == 3  # 12 rows, 5 a shard
    rebuilt = tmp_path / "rebuilt"
    summary = run("index", "--from-embeddings", out, "--index", rebuilt).stdout
    assert "12 added" in summary and "1 skipped" in summary
    for query in sorted(photos.rglob("*.png"))[:4]:
        args = ("query", query, "-k", "5", "--json")
        a = json.loads(run(*args, "--index", original).stdout)["neighbors"]
        b = json.loads(run(*args, "--index", rebuilt).stdout)["neighbors"]
        assert [(n["path"], n["label"]) for n in a] == [(n["path"], n["label"]) for n in b]
        np.testing.assert_allclose([n["distance"] for n in a], [n["distance"] for n in b])
    with Index.open(rebuilt) as ix, Index.open(original) as before:
        assert ix.identity == before.identity


def test_a_shard_with_a_non_finite_vector_is_refused_and_nothing_is_written(original, tmp_path):
    out = tmp_path / "shards"
    write_shards_of(original, out)
    path = out / "fc7-00001.npy"
    vectors = np.load(path)
    vectors[2, 7] = np.nan
    np.save(path, vectors)
    result = run("index", "--from-embeddings", out, "--index", tmp_path / "new", code=1)
    assert "not finite" in result.stderr or "finite" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "new" / "manifest.json").exists()


def test_from_embeddings_will_not_overwrite_an_index_without_rebuild(original, tmp_path):
    out = tmp_path / "shards"
    write_shards_of(original, out)
    result = run("index", "--from-embeddings", out, "--index", original, code=1)
    assert "already holds an index" in result.stderr
    run("index", "--from-embeddings", out, "--index", original, "--rebuild")


def test_index_needs_a_folder_or_embeddings_not_both(photos, tmp_path):
    result = run("index", "--index", tmp_path / "x", code=2)
    assert "IMAGES_DIR or --from-embeddings" in result.stderr
