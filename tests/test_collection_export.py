"""retrieve export: shards that read back exactly and rebuild an index that answers the same."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval import Index
from retrieval.build.options import IndexOptions
from retrieval.collection.export import export
from retrieval.errors import RetrieveError
from retrieval.indexes.shards import open_shards


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, small_model):
    from tests.corpus import make_labelled_folder

    root = tmp_path_factory.mktemp("export")
    make_labelled_folder(root / "photos", classes=3, per_class=4, size=48)
    ix = Index.create(root / "idx", root / "photos", IndexOptions(weights=str(small_model)))
    yield ix, root
    ix.close()


def test_export_shards_read_back_exactly_in_id_order(indexed, tmp_path) -> None:
    ix, _ = indexed
    report = export(ix, tmp_path / "out", rows_per_shard=5)
    assert (report.rows, report.shards) == (12, 3)
    shard_set = open_shards(tmp_path / "out")
    rows = ix.rows(limit=None)
    ids, vectors, paths = [], [], []
    for shard in shard_set:
        meta = shard.metadata.to_pydict()
        ids += meta["id"]
        paths += meta["path"]
        vectors.append(np.asarray(shard.vectors))
        assert set(meta) >= {"id", "path", "label", "sha256", "size", "mtime"}
    assert ids == [r.id for r in rows] and paths == [r.path for r in rows]
    np.testing.assert_array_equal(np.concatenate(vectors), ix.vectors(ids))
    assert shard_set.model["identity"] == ix.manifest["identity"]


def test_export_then_from_embeddings_answers_queries_as_the_original(indexed, tmp_path) -> None:
    ix, root = indexed
    result = CliRunner().invoke(
        cli(),
        [
            "export",
            "--index",
            str(ix.directory),
            "-o",
            str(tmp_path / "out"),
            "--rows-per-shard",
            "7",
        ],
    )
    assert result.exit_code == 0, result.output
    Index.create(tmp_path / "copy", tmp_path / "out", embeddings=True).close()
    queries = sorted((root / "photos").rglob("*.png"))[::4]
    with Index.open(tmp_path / "copy") as copy:
        assert copy.count == ix.count and copy.identity == ix.identity
        for mine, theirs in zip(ix.search(queries, k=5), copy.search(queries, k=5)):
            assert [n.path for n in mine.neighbors] == [n.path for n in theirs.neighbors]
            np.testing.assert_allclose(
                [n.distance for n in mine.neighbors],
                [n.distance for n in theirs.neighbors],
                rtol=1e-5,
                atol=1e-6,
            )


def test_float16_and_parquet_exports_hold_the_same_vectors(indexed, tmp_path) -> None:
    import pyarrow.parquet as pq

    ix, _ = indexed
    export(ix, tmp_path / "half", float16=True, rows_per_shard=8)
    half = np.concatenate([np.load(p) for p in sorted((tmp_path / "half").glob("fc7-*.npy"))])
    full = ix.vectors([r.id for r in ix.rows(limit=None)])
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=2e-3, atol=1e-4)
    export(ix, tmp_path / "pq", fmt="parquet")
    table = pq.read_table(tmp_path / "pq" / "embeddings-00000.parquet")
    stored = np.asarray(table.column("embedding").to_pylist(), np.float32)
    np.testing.assert_array_equal(stored, full)


def test_export_refuses_a_folder_that_is_not_empty(indexed, tmp_path) -> None:
    ix, _ = indexed
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(RetrieveError, match="not empty"):
        export(ix, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def cli():
    import click

    from retrieval.cli import collection_cmds

    group = click.Group()
    collection_cmds.register(group)
    return group
