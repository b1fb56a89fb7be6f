"""The embedding-shard layout: streaming writer, checked reader, atomic shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from retrieval.indexes.shards import (
    ShardError,
    ShardRows,
    ShardWriter,
    SkippedRows,
    open_shards,
    shard_name,
    write_shard,
)

DIM = 16
MODEL = {"source": "random:0", "sha256": "ab" * 32, "layer": "fc7"}


def _rows(ids: range) -> ShardRows:
    return ShardRows(
        id=list(ids),
        path=[f"/photos/{i}.jpg" for i in ids],
        label=[None if i % 2 else "cat" for i in ids],
        sha256=[f"{i:064x}" for i in ids],
        size=[100 + i for i in ids],
        mtime=[10**18 + i for i in ids],
    )


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _read_all(folder: Path) -> tuple[np.ndarray, list[int], list[int]]:
    shards = open_shards(folder)
    vectors, ids, skipped = [], [], []
    for shard in shards:
        vectors.append(np.array(shard.vectors))
        ids.extend(shard.metadata.column("id").to_pylist())
        skipped.extend(shard.skipped.column("id").to_pylist())
    return np.concatenate(vectors), ids, skipped


def test_writer_rotates_shards_and_reader_gives_back_rows_in_order(tmp_path: Path) -> None:
    vectors = _vectors(25)
    with ShardWriter(tmp_path, MODEL, DIM, rows_per_shard=10) as writer:
        for start in range(0, 25, 7):  # blocks that straddle shard boundaries
            stop = min(start + 7, 25)
            writer.add(vectors[start:stop], _rows(range(start, stop)))
    assert writer.written == [0, 1, 2]
    shards = open_shards(tmp_path)
    assert shards.dim == DIM and shards.model == MODEL and len(shards) == 3
    got, ids, _ = _read_all(tmp_path)
    np.testing.assert_array_equal(got, vectors)
    assert ids == list(range(25))
    first = next(iter(shards))
    assert first.metadata.column_names == ["id", "path", "label", "sha256", "size", "mtime"]
    assert first.metadata.column("label").to_pylist()[:2] == ["cat", None]
    assert np.load(tmp_path / "fc7-00002.npy").shape == (5, DIM)  # plain numpy reads it


def test_skipped_files_are_kept_with_their_reason(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, MODEL, DIM) as writer:
        writer.add(
            _vectors(3),
            _rows(range(3)),
            SkippedRows(id=[3], path=["/photos/3.jpg"], reason=["truncated"], detail=["cut"]),
        )
    shard = next(iter(open_shards(tmp_path)))
    assert shard.skipped.to_pylist() == [
        {"id": 3, "path": "/photos/3.jpg", "reason": "truncated", "detail": "cut"}
    ]


def test_no_half_written_shard_is_visible_after_a_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, MODEL, DIM, rows_per_shard=4) as w:
        w.add(_vectors(6), _rows(range(6)))  # shard 0 committed, shard 1 half full
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fc7-00000.npy",
        "identity.json",
        "metadata-00000.parquet",
        "skipped-00000.parquet",
    ]
    assert open_shards(tmp_path).numbers == [0]


def test_metadata_without_vectors_is_reported_as_an_unfinished_shard(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "x", MODEL, DIM) as writer:
        writer.add(_vectors(2), _rows(range(2)))
    (tmp_path / "x" / "fc7-00000.npy").unlink()
    with pytest.raises(ShardError, match=r"shard 0 has metadata but no fc7-00000.npy"):
        open_shards(tmp_path / "x")


def test_a_planned_shard_that_is_missing_is_refused(tmp_path: Path) -> None:
    from retrieval.indexes.shards import write_identity

    write_identity(tmp_path, MODEL, DIM)
    write_shard(tmp_path, 1, _vectors(2), _rows(range(2)))
    with pytest.raises(ShardError, match=r"1 planned shard.*fc7-00000.npy"):
        open_shards(tmp_path, expect=[0, 1])


def test_non_finite_vector_is_refused_naming_its_row(tmp_path: Path) -> None:
    vectors = _vectors(5)
    vectors[3, 7] = np.nan
    with ShardWriter(tmp_path, MODEL, DIM) as writer:
        writer.add(vectors, _rows(range(5)))
    with pytest.raises(ShardError, match=r"fc7-00000.npy: row 3 is not finite"):
        _read_all(tmp_path)


def test_vectors_of_another_width_are_refused(tmp_path: Path) -> None:
    from retrieval.indexes.shards import write_identity

    write_identity(tmp_path, MODEL, DIM)
    write_shard(tmp_path, 0, _vectors(2), _rows(range(2)))
    np.save(tmp_path / shard_name("fc7", 0), np.zeros((2, DIM + 1), np.float32))
    with pytest.raises(ShardError, match=r"expected float32 N x 16"):
        _read_all(tmp_path)


def test_metadata_row_count_must_match_vectors(tmp_path: Path) -> None:
    from retrieval.indexes.shards import write_identity

    write_identity(tmp_path, MODEL, DIM)
    write_shard(tmp_path, 0, _vectors(3), _rows(range(3)))
    np.save(tmp_path / shard_name("fc7", 0), _vectors(4))
    with pytest.raises(ShardError, match=r"4 vectors but 3 metadata rows"):
        _read_all(tmp_path)


def test_a_folder_of_another_model_is_not_appended_to(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, MODEL, DIM) as writer:
        writer.add(_vectors(1), _rows(range(1)))
    with pytest.raises(ShardError, match=r"another model or width"):
        ShardWriter(tmp_path, {**MODEL, "sha256": "cd" * 32}, DIM)


def test_folder_without_identity_is_not_a_shard_folder(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"no identity.json"):
        open_shards(tmp_path)


def test_shard_files_get_a_plain_files_permissions_and_the_umask_is_never_touched(
    tmp_path: Path, monkeypatch
) -> None:
    import os

    def no_umask(mask: int) -> int:
        raise AssertionError("os.umask sets the process umask (not thread-safe): never call it")

    monkeypatch.setattr(os, "umask", no_umask)
    folder = tmp_path / "x"
    with ShardWriter(folder, MODEL, DIM, rows_per_shard=2) as writer:
        writer.add(_vectors(3), _rows(range(3)))
    plain = folder / "plain"
    plain.write_bytes(b"")  # what the process's umask gives an ordinary new file
    want = plain.stat().st_mode & 0o777
    plain.unlink()
    written = sorted(p.name for p in folder.iterdir())
    assert written == [
        "fc7-00000.npy",
        "fc7-00001.npy",
        "identity.json",
        "metadata-00000.parquet",
        "metadata-00001.parquet",
        "skipped-00000.parquet",
        "skipped-00001.parquet",
    ]  # no temporary file left behind
    assert {name: (folder / name).stat().st_mode & 0o777 for name in written} == dict.fromkeys(
        written, want
    )


def test_an_aborted_shard_leaves_no_file(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        ShardWriter(tmp_path, MODEL, DIM, rows_per_shard=10) as writer,
    ):
        writer.add(_vectors(3), _rows(range(3)))
        raise RuntimeError("the extraction failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]
