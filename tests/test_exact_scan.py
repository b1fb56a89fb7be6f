"""The mapped exact search's bf16 scan: candidates from a bf16 copy, ranked by exact fp32
distances, so it answers as the fp32 scan does (ids and distances) on clustered data."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval import Index
from retrieval.errors import RetrieveError
from retrieval.indexes import exact, searcher
from retrieval.indexes.exact import MappedFlat


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """ReLU features around 40 centres: near neighbours much closer than the rest, as fc7 is."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)) * 2
    rows = centres[rng.integers(0, 40, n)] + rng.standard_normal((n, dim)) * 0.7
    return np.maximum(rows, 0).astype(np.float32)


def _flat_file(tmp_path: Path, vectors: np.ndarray) -> Path:
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64) * 3 + 7)
    path = tmp_path / "flat.faiss"
    faiss.write_index(index, str(path))
    return path


def _mapped(path: Path) -> MappedFlat:
    """The file as the snapshot reads it: mapped by faiss, its vectors viewed in place."""
    flat = exact.flat_view(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC))
    assert flat is not None
    return flat


def test_bf16_scan_answers_as_the_fp32_scan_and_as_faiss(tmp_path: Path) -> None:
    vectors = _clustered(3000, 256)
    path = _flat_file(tmp_path, vectors)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(3000, 60, replace=False)] + rng.random((60, 256), np.float32)
    flat = _mapped(path)
    d32, i32 = flat.search(queries, 10)
    d16, i16 = flat.search(queries, 10, scan="bf16")
    reference = faiss.read_index(str(path))
    _, i_faiss = reference.search(queries, 10)
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_array_equal(d16, d32)  # both exact fp32 distances of the same rows
    np.testing.assert_array_equal(i16, i_faiss)


def test_bf16_copy_is_centred_and_its_norms_are_exact(tmp_path: Path) -> None:
    vectors = _clustered(500, 64)
    copy = _mapped(_flat_file(tmp_path, vectors)).bf16_copy()
    centre = vectors.mean(0)
    np.testing.assert_allclose(copy.centre.numpy(), centre, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(copy.rows.float().numpy(), vectors - centre, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(copy.norms.numpy(), ((vectors - centre) ** 2).sum(1), rtol=1e-5)


def test_an_unknown_scan_is_refused(tmp_path: Path) -> None:
    flat = _mapped(_flat_file(tmp_path, _clustered(10, 8)))
    with pytest.raises(ValueError, match="scan must be"):
        flat.search(np.zeros((1, 8), np.float32), 1, scan="fp16")


def test_auto_scans_bf16_only_where_it_is_native_and_fits(tmp_path: Path, monkeypatch) -> None:
    flat = _mapped(_flat_file(tmp_path, _clustered(100, 16)))
    monkeypatch.setattr(searcher, "fast_bf16", lambda device: True)
    assert searcher.choose_scan("auto", flat) == "bf16"
    assert searcher.choose_scan("fp32", flat) == "fp32"
    monkeypatch.setattr(flat, "bf16_bytes", lambda: 1 << 60)  # larger than any machine
    assert searcher.choose_scan("auto", flat) == "fp32"
    monkeypatch.setattr(searcher, "fast_bf16", lambda device: False)
    assert searcher.choose_scan("auto", flat) == "fp32"
    assert searcher.choose_scan("bf16", flat) == "bf16"  # asked for: slow, still right
    with pytest.raises(RetrieveError, match="search precision"):
        searcher.choose_scan("int8", flat)


def test_an_index_opened_for_bf16_scans_answers_as_fp32_and_after_a_reload(
    photos, tmp_path, small_model
) -> None:
    index_dir = tmp_path / "index"
    Index.create(index_dir, photos, _options(small_model)).close()
    with (
        Index.open(index_dir, search_precision="fp32") as fp32,
        Index.open(index_dir, search_precision="bf16") as bf16,
    ):
        assert bf16.backend == "exact-mapped-cpu-bf16-scan" and fp32.backend == "exact-mapped-cpu"
        ids = [row.id for row in fp32.rows()][:4]
        assert _answers(bf16.neighbors(ids, 5)) == _answers(fp32.neighbors(ids, 5))
        bf16.warm()
        first = sorted(photos.rglob("*.png"))[0]
        (first.parent / "copy.png").write_bytes(first.read_bytes())
        bf16.update(photos)  # commits a generation, then reloads (readying the new searcher)
        assert fp32.reload() and bf16.count == fp32.count == 13
        assert bf16.backend == "exact-mapped-cpu-bf16-scan"
        assert _answers(bf16.neighbors(ids, 5)) == _answers(fp32.neighbors(ids, 5))


def _options(weights: Path):
    from retrieval import ExtractOptions, IndexOptions

    return IndexOptions(weights=str(weights), extract=ExtractOptions(device="cpu"))


def _answers(results) -> list:
    return [[(n.id, round(n.distance, 5)) for n in r.neighbors] for r in results]


def test_margin_is_larger_than_the_fp32_rerank_margin() -> None:
    assert exact.BF16_MARGIN > exact.RERANK_MARGIN


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_one_blockwise_top_k_equals_brute_force_whatever_the_block_size(block_rows: int) -> None:
    torch = pytest.importorskip("torch")
    rows = torch.from_numpy(_clustered(300, 32))
    queries = torch.from_numpy(_clustered(9, 32, seed=2))
    d2 = torch.cdist(queries.double(), rows.double()) ** 2
    want = torch.sort(d2, dim=1, stable=True)
    norms = (rows * rows).sum(1)
    q_norms = (queries * queries).sum(1, keepdim=True)
    values, found = exact.nearest(
        queries, lambda s, e: rows[s:e], norms, 10, block_rows=block_rows, query_norms=q_norms
    )
    assert found.shape == (9, 10)
    # the same rows, nearest first, and the values are squared distances
    np.testing.assert_array_equal(found.numpy(), want.indices[:, :10].numpy())
    np.testing.assert_allclose(values.numpy(), want.values[:, :10].numpy(), rtol=1e-4, atol=1e-3)
    # without query norms: |x|^2 - 2 q.x, the same order (the exact scan's candidates)
    _, candidates = exact.nearest(queries, lambda s, e: rows[s:e], norms, 10, block_rows=block_rows)
    np.testing.assert_array_equal(candidates.numpy(), found.numpy())


def test_one_blockwise_top_k_keeps_every_row_when_k_is_larger() -> None:
    torch = pytest.importorskip("torch")
    rows = torch.eye(3, 4)
    values, found = exact.nearest(rows[:1], lambda s, e: rows[s:e], rows.sum(1), 5, block_rows=2)
    assert found.tolist() == [[0, 1, 2]] and values.shape == (1, 3)


def test_bf16_rows_are_multiplied_natively_and_come_back_as_fp32() -> None:
    torch = pytest.importorskip("torch")
    rows = torch.from_numpy(_clustered(50, 64)).to(torch.bfloat16)
    queries = torch.from_numpy(_clustered(3, 64, seed=3)).to(torch.bfloat16)
    got = exact.inner_products(queries, rows)
    assert got.dtype == torch.float32 and got.shape == (3, 50)
    torch.testing.assert_close(got, (rows @ queries.T).float().T)  # the scan's arithmetic
