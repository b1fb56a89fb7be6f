"""The streamed Flat index file: byte-identical to faiss's, read back in place through faiss's
memory map, and used by index/update/remove."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval import Index
from retrieval.build.options import IndexOptions
from retrieval.build.run import index_folder
from retrieval.errors import IndexCorruptError
from retrieval.indexes import exact, flat_file, kinds, store
from tests.corpus import make_image


def _vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _reference(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(vectors.shape[1]))
    index.add_with_ids(vectors, ids)
    return index


def test_layout_matches_the_installed_faiss() -> None:
    # If faiss ever changes its Flat file layout this turns False and indexing falls back to
    # building the index in RAM; this test makes that change visible instead of silent.
    assert flat_file.layout_matches_faiss()


@pytest.mark.parametrize("n", [0, 1, 2500])
def test_streamed_file_is_what_faiss_writes_and_reads(tmp_path: Path, n: int) -> None:
    vectors = _vectors(n, 16)
    ids = np.random.default_rng(1).permutation(10 * n + 1)[:n].astype(np.int64)
    path = tmp_path / "streamed.faiss"
    with open(path, "wb") as handle:
        writer = flat_file.FlatIndexWriter(handle, 16)
        for start in range(0, n, 999):  # uneven blocks
            writer.add_with_ids(vectors[start : start + 999], ids[start : start + 999])
        writer.finish()
    reference = _reference(vectors, ids)
    assert path.read_bytes() == faiss.serialize_index(reference).tobytes()
    loaded = faiss.read_index(str(path))
    assert loaded.ntotal == n
    if n:
        queries = _vectors(5, 16, seed=2)
        np.testing.assert_array_equal(loaded.search(queries, 3)[1], reference.search(queries, 3)[1])


def test_a_block_with_every_row_removed_writes_nothing(tmp_path: Path) -> None:
    # An update copies the base block by block less the removed rows: removing a whole block
    # (a folder indexed together) hands the writer an empty one.
    vectors, ids = _vectors(6, 4), np.arange(6, dtype=np.int64)
    path = tmp_path / "streamed.faiss"
    with open(path, "wb") as handle:
        writer = flat_file.FlatIndexWriter(handle, 4)
        writer.add_with_ids(vectors[:3], ids[:3])
        writer.add_with_ids(vectors[3:3], ids[3:3])
        writer.add_with_ids(vectors[3:], ids[3:])
        writer.finish()
    assert path.read_bytes() == faiss.serialize_index(_reference(vectors, ids)).tobytes()


def _mapped(path: Path) -> faiss.Index:
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)


def test_blocks_read_back_a_file_faiss_wrote_in_place(tmp_path: Path) -> None:
    vectors, ids = _vectors(300, 8), np.arange(300, dtype=np.int64)[::-1].copy()
    path = tmp_path / "faiss.faiss"
    faiss.write_index(_reference(vectors, ids), str(path))
    flat = exact.flat_view(_mapped(path))  # the faiss index object is dropped here...
    blocks = list(flat.blocks(rows=128))
    assert [len(v) for v, _ in blocks] == [128, 128, 44]
    np.testing.assert_array_equal(np.concatenate([v for v, _ in blocks]), vectors)
    np.testing.assert_array_equal(np.concatenate([i for _, i in blocks]), ids)
    del flat
    np.testing.assert_array_equal(blocks[1][0], vectors[128:256])  # ...the views keep it alive
    with pytest.raises(ValueError, match="read-only"):
        blocks[0][0][0, 0] = 1.0  # numpy refuses; a write would fault on the read-only mapping


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_vectors_are_viewed_in_the_file_mapping_not_copied(tmp_path: Path) -> None:
    path = tmp_path / "faiss.faiss"
    faiss.write_index(_reference(_vectors(64, 8), np.arange(64, dtype=np.int64)), str(path))
    flat = exact.flat_view(_mapped(path))
    address = flat.vectors.__array_interface__["data"][0]
    with open("/proc/self/maps", encoding="ascii") as maps:
        regions = [line.split() for line in maps]
    holder = [
        r for r in regions if int(r[0].split("-")[0], 16) <= address < int(r[0].split("-")[1], 16)
    ]
    assert holder and holder[0][-1] == str(path) and holder[0][1].startswith("r--")


def test_other_kinds_are_not_taken_for_flat(tmp_path: Path) -> None:
    for name, index in {
        "hnsw": kinds.build_index(kinds.IndexSpec("HNSW8"), 8, None),
        "normalized": kinds.build_index(kinds.IndexSpec("Flat", normalize=True), 8, None),
        "idmap": faiss.IndexIDMap(faiss.IndexFlatL2(8)),
        "inner_product": faiss.IndexIDMap2(faiss.IndexFlatIP(8)),
    }.items():
        faiss.write_index(index, str(tmp_path / name))
        assert exact.flat_view(_mapped(tmp_path / name)) is None, name
    empty = tmp_path / "empty"
    faiss.write_index(_reference(_vectors(0, 8), np.zeros(0, np.int64)), str(empty))
    flat = exact.flat_view(_mapped(empty))
    assert flat is not None and flat.vectors.shape == (0, 8) and len(list(flat.blocks())) == 0


def test_a_snapshot_reads_blocks_and_the_whole_index_from_one_open_file(
    tmp_path: Path, small_model: Path
) -> None:
    folder = _folder(tmp_path / "photos", 6)
    index_dir = tmp_path / "idx"
    index_folder(folder, index_dir, IndexOptions(weights=str(small_model)))
    snapshot = store.open_snapshot(index_dir)
    try:
        blocks = list(snapshot.flat_vector_blocks())
        assert snapshot.mapped_flat() is snapshot.mapped_flat()  # mapped once
        (index_dir / snapshot.manifest["files"]["vectors"]).unlink()  # a writer retires it
        whole = snapshot.index  # still readable: the snapshot's own file, at its own offsets
        vectors = np.concatenate([v for v, _ in blocks])
        ids = np.concatenate([i for _, i in blocks])
        np.testing.assert_array_equal(whole.reconstruct_batch(ids), vectors)
        assert len(ids) == whole.ntotal == snapshot.count == 6
    finally:
        snapshot.close()


def _never(*args, **kwargs):
    raise AssertionError("the Flat index was held in RAM")


def _folder(root: Path, count: int) -> Path:
    for i in range(count):
        make_image(root / f"c{i % 3}" / f"{i:02d}.png", seed=i, size=(48, 48))
    return root


def test_index_update_and_remove_never_hold_a_flat_index_in_ram(
    tmp_path: Path, small_model: Path, monkeypatch
) -> None:
    folder = _folder(tmp_path / "photos", 12)
    index_dir = tmp_path / "idx"
    monkeypatch.setattr(kinds, "build_index", _never)
    monkeypatch.setattr(kinds, "remove_ids", _never)
    options = IndexOptions(weights=str(small_model))
    index_folder(folder, index_dir, options)
    (folder / "c0" / "00.png").unlink()
    make_image(folder / "c1" / "new.png", seed=77, size=(48, 48))
    index_folder(folder, index_dir, IndexOptions())
    with Index.open(index_dir) as index:
        index.remove([folder / "c2"])
    monkeypatch.undo()

    snapshot = store.open_snapshot(index_dir)
    rows = {row.id: row.path for row in snapshot.iter_rows(status="indexed")}
    assert sorted(rows.values()) == sorted(
        str(p) for p in folder.rglob("*.png") if p.parent.name != "c2"
    )
    # Every stored vector is the one the in-RAM build (the path taken when the layout check
    # fails) stores.
    rebuilt = tmp_path / "rebuilt"
    with monkeypatch.context() as patch:
        patch.setattr(flat_file, "layout_matches_faiss", lambda: False)
        index_folder(folder, rebuilt, IndexOptions(weights=str(small_model)))
    reference = store.open_snapshot(rebuilt)
    expected = {r.path: reference.index.reconstruct(r.id) for r in reference.iter_rows("indexed")}
    for row_id, path in rows.items():
        np.testing.assert_allclose(snapshot.index.reconstruct(row_id), expected[path], atol=1e-4)
    assert snapshot.index.ntotal == len(rows)
    snapshot.close()
    reference.close()


def test_damaged_flat_file_fails_an_update_and_keeps_the_index(
    tmp_path: Path, small_model: Path
) -> None:
    folder = _folder(tmp_path / "photos", 6)
    index_dir = tmp_path / "idx"
    index_folder(folder, index_dir, IndexOptions(weights=str(small_model)))
    manifest = json.loads((index_dir / "manifest.json").read_text())
    vectors = index_dir / manifest["files"]["vectors"]
    vectors.write_bytes(vectors.read_bytes()[:-100])  # header intact, ids cut off
    make_image(folder / "c0" / "new.png", seed=50, size=(48, 48))
    with pytest.raises(IndexCorruptError, match="rebuild"):
        index_folder(folder, index_dir, IndexOptions())
    assert json.loads((index_dir / "manifest.json").read_text()) == manifest
    assert not [p for p in index_dir.iterdir() if p.name.endswith(".tmp")]
