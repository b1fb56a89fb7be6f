"""--index-type CAGRA: cuVS's GPU graph index, offered where faiss's cuVS build sees a GPU.

Stored as faiss's IndexHNSWCagra (built on the CPU by insertion, base layer kept full), so its
bookkeeping is tested here on faiss-cpu with the GPU check bypassed; the GPU search itself runs
under the ``cuda`` marker, and only with faiss's cuVS build.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.errors import RetrieveError
from retrieval.indexes import gpu, kinds
from tests.corpus import make_image


def _vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, dim), dtype=np.float32)


def _recall_at_10(index, database: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> float:
    _, found = index.search(queries, 10)
    exact = ((queries[:, None, :] - database[None, :, :]) ** 2).sum(-1).argsort(1)[:, :10]
    return float(np.mean([len(set(f) & set(ids[e])) / 10 for f, e in zip(found, exact)]))


def test_cagra_is_refused_in_one_line_where_faiss_cannot_run_it(tmp_path: Path) -> None:
    if gpu.cagra_ready() is None:
        pytest.skip("faiss's cuVS build sees a GPU here")
    from retrieval.cli.main import cli

    make_image(tmp_path / "images" / "a.jpg")
    result = CliRunner().invoke(
        cli, ["index", str(tmp_path / "images"), "--index", str(tmp_path / "ix"),
              "--index-type", "CAGRA", "--weights", "random"],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "index type CAGRA needs a GPU and faiss's cuVS build" in lines[0]
    assert not (tmp_path / "ix" / "manifest.json").exists()


def test_cagra_takes_no_reduction_and_an_even_degree() -> None:
    with pytest.raises(RetrieveError, match="neither --reduce nor --normalize"):
        kinds.IndexSpec("CAGRA", normalize=True)
    with pytest.raises(RetrieveError, match="graph degree"):
        kinds.new_index(kinds.IndexSpec("CAGRA7"), 16)


def test_a_cagra_index_adds_in_chunks_removes_and_reloads(tmp_path: Path, monkeypatch) -> None:
    """The stored form, on faiss-cpu: what the GPU will search is a full-degree graph."""
    monkeypatch.setattr(kinds, "cagra_ready", lambda: None)
    dim = 32
    database = _vectors(3000, dim)
    ids = np.arange(3000, dtype=np.int64) + 100
    index = kinds.build_index(kinds.IndexSpec("CAGRA16"), dim, None)
    for start in range(0, 3000, 1000):  # chunk by chunk, as a commit adds them
        index.add_with_ids(database[start : start + 1000], ids[start : start + 1000])
    core = faiss.downcast_index(index.index)
    assert isinstance(core, faiss.IndexHNSWCagra) and core.hnsw.nb_neighbors(0) == 16
    assert core.hnsw.efSearch == kinds.DEFAULT_EF_SEARCH
    queries = database[:50] + 0.01
    assert _recall_at_10(index, database, ids, queries) >= 0.9
    index = kinds.remove_ids(index, ids[:100])
    assert index.ntotal == 2900
    faiss.write_index(index, str(tmp_path / "v.faiss"))
    again = faiss.read_index(str(tmp_path / "v.faiss"))
    assert again.ntotal == 2900 and _recall_at_10(again, database[100:], ids[100:], queries) >= 0.9


@pytest.mark.cuda
def test_on_a_gpu_a_cagra_index_is_searched_by_cuvs_with_recall(monkeypatch) -> None:
    why = gpu.cagra_ready()
    if why is not None:
        pytest.skip(why)
    dim = 64
    database = _vectors(20_000, dim, seed=1)
    ids = np.arange(20_000, dtype=np.int64)
    index = kinds.build_index(kinds.IndexSpec("CAGRA"), dim, None)
    index.add_with_ids(database, ids)
    on_gpu = gpu.faiss_index_to_gpu(index)
    inner = faiss.downcast_index(getattr(on_gpu, "index", on_gpu))
    assert not isinstance(inner, faiss.IndexHNSWCagra)  # moved: a GpuIndexCagra now
    assert _recall_at_10(on_gpu, database, ids, database[:200] + 0.01) >= 0.9
