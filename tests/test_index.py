"""Indexing and searching through the library: exact answers, incremental updates, consistency."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval import Index, IndexReport
from retrieval.build.options import IndexOptions
from retrieval.build.run import index_folder
from retrieval.errors import (
    IndexCorruptError,
    IndexLockedError,
    IndexMismatchError,
    IndexNotFoundError,
    RetrieveError,
)
from retrieval.extraction import extract_images
from retrieval.extraction.types import ExtractOptions
from retrieval.indexes import generation, store
from retrieval.model.weights import load_model
from tests.corpus import make_image
from tests.stored import search, stored_vectors


def _index(folder: Path, index_dir: Path, weights: Path | str | None, **kw) -> IndexReport:
    """fp32 unless told otherwise: these tests compare stored vectors with fp32 references (the
    default, auto, is bf16 where it is native; tests/test_precision.py covers that)."""
    kw.setdefault("extract", ExtractOptions(precision="fp32"))
    options = IndexOptions(weights=str(weights) if weights else None, **kw)
    return index_folder(folder, index_dir, options)


def test_query_equals_numpy_brute_force(photos: Path, tmp_path: Path, small_model: Path) -> None:
    index_dir = tmp_path / "idx"
    report = _index(photos, index_dir, small_model)
    assert report.added == 12 and report.count == 12
    stored = stored_vectors(index_dir)
    paths = sorted(stored)
    database = np.stack([stored[p] for p in paths])

    queries = [Path(paths[0]), Path(paths[5]), Path(paths[11])]
    results = search(index_dir, queries, 6)
    query_features, _ = extract_images(
        queries, load_model(small_model), ExtractOptions(device="cpu")
    )
    for result, feature in zip(results, query_features):
        distances = np.sqrt(((database - feature) ** 2).sum(axis=1))
        order = np.argsort(distances, kind="stable")[:6]
        got = [os.path.abspath(n.path) for n in result.neighbors]
        assert got == [paths[i] for i in order]
        np.testing.assert_allclose(
            [n.distance for n in result.neighbors], distances[order], rtol=1e-4, atol=1e-3
        )


def test_indexed_image_finds_itself_first(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    query = sorted(photos.rglob("*.png"))[3]
    (result,) = search(index_dir, [query], 3)
    assert os.path.samefile(result.neighbors[0].path, query)
    assert result.neighbors[0].distance < 1e-3
    assert result.neighbors[0].label == query.parent.name
    assert [n.rank for n in result.neighbors] == [1, 2, 3]


def test_rows_record_path_size_mtime_and_label(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    snapshot = store.open_snapshot(index_dir)
    for row in snapshot.iter_rows():
        stat = os.stat(row.path)
        assert (row.size, row.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        assert row.label == Path(row.path).parent.name and row.status == "indexed"
    assert snapshot.manifest["model"]["layer"] == "fc7"
    assert snapshot.manifest["dim"] == 4096 and snapshot.manifest["metric"] == "l2"
    snapshot.close()


def test_incremental_update_extracts_only_changed_files_and_equals_a_rebuild(
    tmp_path: Path, small_model: Path
) -> None:
    folder = tmp_path / "photos"
    for i in range(40):
        make_image(folder / f"c{i % 4}" / f"{i:03d}.png", seed=i)
    index_dir = tmp_path / "idx"
    _index(folder, index_dir, small_model)

    make_image(folder / "c0" / "000.png", seed=1000)  # edited
    (folder / "c1" / "001.png").unlink()  # deleted
    make_image(folder / "c2" / "new.png", seed=2000)  # added
    os.utime(folder / "c3" / "003.png", ns=(1, 1))  # touched, same content
    report = _index(folder, index_dir, None)
    assert (report.added, report.updated, report.removed) == (1, 1, 1)
    assert report.extracted == 2 and report.touched == 1

    rebuilt = tmp_path / "rebuilt"
    _index(folder, rebuilt, small_model)
    incremental, full = stored_vectors(index_dir), stored_vectors(rebuilt)
    assert sorted(incremental) == sorted(full)
    for path in full:
        np.testing.assert_allclose(incremental[path], full[path], atol=1e-4)


def test_ids_stay_stable_across_updates(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    before = {r.path: r.id for r in store.open_snapshot(index_dir).iter_rows()}
    victim = sorted(photos.rglob("*.png"))[0]
    victim.unlink()
    make_image(photos / "new" / "x.png", seed=99)
    _index(photos, index_dir, None)
    after = {r.path: r.id for r in store.open_snapshot(index_dir).iter_rows()}
    for path, row_id in after.items():
        if path in before:
            assert before[path] == row_id
    assert after[str(photos / "new" / "x.png")] > max(before.values())


def test_random_add_change_delete_sequences_keep_rows_and_vectors_in_agreement(
    tmp_path: Path, small_model: Path
) -> None:
    rng = random.Random(3)
    folder = tmp_path / "photos"
    names = [folder / f"c{i % 3}" / f"{i}.png" for i in range(20)]
    for i, path in enumerate(names[:10]):
        make_image(path, seed=i)
    index_dir = tmp_path / "idx"
    _index(folder, index_dir, small_model)
    for step in range(4):
        for path in rng.sample(names, 5):
            if path.exists() and rng.random() < 0.5:
                path.unlink()
            else:
                make_image(path, seed=100 * step + names.index(path))
        _index(folder, index_dir, None)
        stored = stored_vectors(index_dir)  # asserts ntotal == indexed rows
        on_disk = {str(p) for p in names if p.exists()}
        assert set(stored) == on_disk
        features, _ = extract_images(
            sorted(map(Path, on_disk)), load_model(small_model), ExtractOptions(device="cpu")
        )
        for path, feature in zip(sorted(on_disk), features):
            np.testing.assert_allclose(stored[path], feature, atol=1e-4)


def test_remove_drops_rows_and_vectors(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    first_class = sorted(p for p in photos.iterdir())[0]
    with Index.open(index_dir) as index:
        result = index.remove([first_class, tmp_path / "not-there.png"])
    assert len(result["removed"]) == 4 and len(result["not_in_index"]) == 1
    stored = stored_vectors(index_dir)
    assert len(stored) == 8 and not any(p.startswith(str(first_class)) for p in stored)


def test_query_with_other_weights_is_refused(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    with pytest.raises(IndexMismatchError, match=r"does not fit the index .*weights: the index"):
        search(index_dir, [next(photos.rglob("*.png"))], 2, weights="random:9")
    with pytest.raises(IndexMismatchError, match="leave out --weights to use the index's own"):
        search(index_dir, [next(photos.rglob("*.png"))], 2, weights="random:9")


def test_reindex_with_other_weights_needs_rebuild(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    with pytest.raises(IndexMismatchError, match="--rebuild"):
        _index(photos, index_dir, "random:1")


def test_k_larger_than_the_index_gives_every_image(photos, tmp_path, small_model) -> None:
    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    (result,) = search(index_dir, [next(photos.rglob("*.png"))], 13)
    assert len(result.neighbors) == 12 and len({n.id for n in result.neighbors}) == 12
    with pytest.raises(RetrieveError, match="between 1 and 1000"):
        search(index_dir, [next(photos.rglob("*.png"))], 1001)


def test_missing_index_is_reported(tmp_path) -> None:
    with pytest.raises(IndexNotFoundError, match="retrieve index"):
        Index.open(tmp_path / "nothing")


@pytest.mark.parametrize(
    "damage",
    ["truncate-vectors", "delete-rows", "edit-manifest", "old-version", "garbage-manifest"],
)
def test_damaged_index_is_one_clear_error(photos, tmp_path, small_model, damage) -> None:
    import json

    index_dir = tmp_path / "idx"
    _index(photos, index_dir, small_model)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    vectors = index_dir / manifest["files"]["vectors"]
    if damage == "truncate-vectors":
        vectors.write_bytes(vectors.read_bytes()[:1000])
    elif damage == "delete-rows":
        (index_dir / manifest["files"]["rows"]).unlink()
    elif damage == "edit-manifest":
        manifest["count"] = 99
        (index_dir / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "old-version":
        manifest["version"] = 0
        (index_dir / "manifest.json").write_text(json.dumps(manifest))
    else:
        (index_dir / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match=r"rebuild|missing") as info:
        search(index_dir, [next(photos.rglob("*.png"))], 2)
    assert "\n" not in str(info.value)


def test_second_writer_is_refused_while_one_holds_the_lock(tmp_path) -> None:
    with generation.write_lock(tmp_path / "idx"), pytest.raises(IndexLockedError):  # noqa: SIM117
        with generation.write_lock(tmp_path / "idx"):
            pass


def test_bad_file_in_collection_is_a_skipped_row(photos, tmp_path, small_model) -> None:
    first_class = sorted(photos.iterdir())[0]
    (first_class / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    index_dir = tmp_path / "idx"
    report = _index(photos, index_dir, small_model)
    assert report.added == 12 and report.skipped == 1
    snapshot = store.open_snapshot(index_dir)
    (skipped,) = list(snapshot.iter_rows(status="skipped"))
    assert skipped.path.endswith("broken.jpg") and skipped.reason
    snapshot.close()
    with pytest.raises(RetrieveError, match="--strict"):
        _index(photos, tmp_path / "strict", small_model, strict=True)


def test_the_index_kind_says_whether_it_is_the_default_or_was_asked_for(
    photos, tmp_path, small_model
) -> None:
    from retrieval.indexes.kinds import IndexSpec

    default = _index(photos, tmp_path / "default", small_model)
    assert default.index_kind == "Flat"
    assert default.index_kind_reason.startswith("Flat: the default")
    asked = _index(photos, tmp_path / "asked", small_model, spec=IndexSpec(kind="Flat"))
    assert asked.index_kind_reason == "Flat: chosen explicitly"
    (photos / "extra.png").write_bytes((sorted(photos.rglob("*.png"))[0]).read_bytes())
    updated = _index(photos, tmp_path / "default", small_model)  # an update keeps the reason
    assert updated.added == 1 and updated.index_kind_reason == default.index_kind_reason


def test_default_index_lives_in_dot_retrieve(photos, in_tmp, small_model) -> None:
    shutil.copytree(photos, in_tmp / "images")
    _index(Path("images"), None, small_model)
    assert (in_tmp / ".retrieve" / "manifest.json").exists()
    query = sorted(Path("images").rglob("*.png"))[0]
    (result,) = search(None, [query], 1)
    assert result.neighbors[0].path == str(query.resolve())  # the library's paths are absolute


@pytest.mark.slow
def test_changing_one_percent_of_5000_images_reads_only_those_files(
    tmp_path: Path, small_model: Path, monkeypatch
) -> None:
    """Issue 6: 50 of 5,000 files changed -> only those 50 are read and extracted again."""
    import retrieval.extraction.reader as extract_module  # the CPU path reads through it

    folder = tmp_path / "photos"
    for i in range(5000):
        make_image(folder / f"c{i % 10}" / f"{i:04d}.png", size=(16, 16), seed=i)
    index_dir = tmp_path / "idx"
    _index(folder, index_dir, small_model)

    changed = sorted(folder.rglob("*.png"))[::100]
    assert len(changed) == 50
    for n, path in enumerate(changed):
        make_image(path, size=(16, 16), seed=10_000 + n)
    read: list[str] = []
    real_read_file = extract_module.read_file

    def counting_read_file(position: int, path: str):
        read.append(path)
        return real_read_file(position, path)

    monkeypatch.setattr(extract_module, "read_file", counting_read_file)
    report = _index(folder, index_dir, None, extract=ExtractOptions(workers=0))
    assert sorted(read) == sorted(str(p) for p in changed)
    assert report.extracted == 50 and report.updated == 50 and report.unchanged == 4950

    monkeypatch.undo()
    rebuilt = tmp_path / "rebuilt"
    _index(folder, rebuilt, small_model)
    incremental, full = stored_vectors(index_dir), stored_vectors(rebuilt)
    assert sorted(incremental) == sorted(full)
    for path in (str(p) for p in changed):
        np.testing.assert_allclose(incremental[path], full[path], atol=1e-4)
