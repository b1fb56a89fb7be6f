"""Where a snapshot's searches run (``Searcher._place``, ``_cuda_ordinal``, ``choose_scan``), and
that opening one reads no vectors.

On the CPU every branch is reached: real ones for ``cpu`` / ``auto`` and the Flat, IVF and HNSW
kinds, and the GPU branches with the GPU parts replaced (a CPU torch searcher plays the CUDA
copy, the CPU faiss index plays the faiss-gpu one), so the decisions are pinned here. The
``cuda`` tests run the same placements on a real GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from retrieval.errors import RetrieveError
from retrieval.indexes import flat_file, generation, gpu, kinds, searcher, store
from retrieval.indexes.kinds import IndexSpec
from retrieval.indexes.rows import RowUpdate
from retrieval.indexes.searcher import Searcher

DIM, N, K = 32, 400, 10
FLAT = IndexSpec()


def _clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """ReLU rows around 12 centres, as fc7 is: clear nearest neighbours, few ties."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)) * 2
    rows = centres[rng.integers(0, 12, n)] + rng.standard_normal((n, dim)) * 0.7
    return np.maximum(rows, 0).astype(np.float32)


def _write(directory: Path, vectors: np.ndarray, spec: IndexSpec = FLAT) -> store.Snapshot:
    """A committed generation holding ``vectors`` (row ids 1..n), written as the indexer does."""
    dim = vectors.shape[1]
    with generation.write_lock(directory):
        writer = generation.GenerationWriter(directory, None)
        updates = [
            RowUpdate(f"/photos/{i:05d}.png", 1, 0, f"{i:064x}", "photos", "indexed")
            for i in range(len(vectors))
        ]
        ids = np.asarray(writer.upsert_rows(updates), np.int64)
        if spec.factory_string(dim) == flat_file.FLAT_FACTORY:
            index = writer.stream_flat_index(dim)
        else:
            sample = vectors if kinds.needs_training(spec, dim) else None
            index = kinds.build_index(spec, dim, sample)
        index.add_with_ids(vectors, ids)
        return writer.commit(index, {"index": spec.to_dict()})


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    d2 = ((queries[:, None, :].astype(np.float64) - vectors[None]) ** 2).sum(-1)
    return np.argsort(d2, axis=1, kind="stable")[:, :k] + 1  # row ids start at 1


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _clustered(N)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _clustered(20, seed=5)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, vectors):
    """One snapshot per kind: the default Flat, IVF, HNSW, a normalised Flat, a reduced one, and
    an empty Flat."""
    root = tmp_path_factory.mktemp("placement")
    made = {
        "Flat": _write(root / "flat", vectors),
        "IVF": _write(root / "ivf", vectors, IndexSpec("IVF8,Flat")),
        "HNSW": _write(root / "hnsw", vectors, IndexSpec("HNSW16")),
        "normalized": _write(root / "norm", vectors, IndexSpec("Flat", normalize=True)),
        "reduced": _write(root / "pca", vectors, IndexSpec("Flat", reduce="PCA16", normalize=True)),
        "empty": _write(root / "empty", vectors[:0]),
    }
    yield made
    for snapshot in made.values():
        snapshot.close()


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without GPUs, whatever it has."""
    monkeypatch.setattr(gpu, "torch_cuda_count", lambda: 0)
    monkeypatch.setattr(gpu, "faiss_gpu_count", lambda: 0)


class _CpuTorchSearcher(gpu.TorchExactSearcher):
    """The resident CUDA searcher's code, run on the CPU: records the device it was asked for."""

    asked: ClassVar[list[str]] = []

    def __init__(self, database, *, device: str = "cuda", **options) -> None:
        _CpuTorchSearcher.asked.append(device)
        super().__init__(database, device="cpu", **options)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices as far as placement can tell; torch runs its searcher on the CPU and
    faiss has no GPU build."""
    _CpuTorchSearcher.asked = []
    monkeypatch.setattr(gpu, "torch_cuda_count", lambda: 2)
    monkeypatch.setattr(gpu, "faiss_gpu_count", lambda: 0)
    monkeypatch.setattr(gpu, "TorchExactSearcher", _CpuTorchSearcher)
    return _CpuTorchSearcher.asked


# --- the CPU ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_flat_index_is_scanned_in_its_mapping_on_the_cpu(
    snapshots, vectors, queries, device, no_gpu
) -> None:
    found = Searcher(snapshots["Flat"], device)
    assert found.backend == "exact-mapped-cpu" and found.scan == "fp32"
    dist, ids = found.search(queries, K)
    np.testing.assert_array_equal(ids, _brute_force(vectors, queries, K))
    want = np.sqrt(((queries[:, None] - vectors[ids - 1]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, want, rtol=1e-5, atol=1e-5)


def test_the_scan_precision_of_the_mapped_search(snapshots, monkeypatch, no_gpu) -> None:
    flat = snapshots["Flat"]
    assert Searcher(flat, "cpu", scan="fp32").backend == "exact-mapped-cpu"
    assert Searcher(flat, "cpu", scan="bf16").backend == "exact-mapped-cpu-bf16-scan"
    monkeypatch.setattr(searcher, "fast_bf16", lambda device: True)
    assert Searcher(flat, "cpu", scan="auto").scan == "bf16"
    monkeypatch.setattr(searcher, "fast_bf16", lambda device: False)
    assert Searcher(flat, "cpu", scan="auto").backend == "exact-mapped-cpu"
    with pytest.raises(RetrieveError, match="search precision"):
        Searcher(flat, "cpu", scan="fp16")


def test_an_empty_flat_index_answers_nothing(snapshots, queries, no_gpu) -> None:
    found = Searcher(snapshots["empty"], "auto", scan="auto")
    assert found.backend == "exact-mapped-cpu" and found.scan == "fp32"
    dist, ids = found.search(queries, 3)
    assert (ids == -1).all() and np.isinf(dist).all()


@pytest.mark.parametrize("kind", ["IVF", "HNSW", "normalized", "reduced"])
@pytest.mark.parametrize("scan", ["fp32", "bf16", "auto"])
def test_other_kinds_search_their_mapped_faiss_index_on_the_cpu(
    snapshots, queries, kind, scan, no_gpu
) -> None:
    snapshot = snapshots[kind]
    found = Searcher(snapshot, "auto", scan=scan)
    assert found.backend == "faiss-cpu" and found.scan == "fp32"  # no scan to choose
    dist, ids = found.search(queries, K)
    want_dist, want_ids = searcher.search_faiss(snapshot.search_index(), queries, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)


def test_knobs_apply_to_one_search_of_an_ivf_index(snapshots, vectors, queries, no_gpu) -> None:
    found = Searcher(snapshots["IVF"], "cpu")
    _, every_list = found.search(queries, K, nprobe=8)  # all 8 lists: exact
    np.testing.assert_array_equal(every_list, _brute_force(vectors, queries, K))
    assert searcher.search_params(found._faiss)["nprobe"] == 1  # put back (8 lists / 32)


@pytest.mark.parametrize("device", ["tpu", "gpu", "cpu:0", "cuda:x", "cuda:-1", "", "CUDA"])
def test_device_strings_that_name_no_device_are_refused(snapshots, device) -> None:
    with pytest.raises(RetrieveError, match="unknown device"):
        Searcher(snapshots["Flat"], device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
@pytest.mark.parametrize("kind", ["Flat", "IVF"])
def test_cuda_without_a_gpu_is_refused(snapshots, device, kind, no_gpu) -> None:
    with pytest.raises(RetrieveError, match="no CUDA device is visible"):
        Searcher(snapshots[kind], device)


def test_auto_with_an_ordinal_and_no_gpu_searches_on_the_cpu(snapshots, no_gpu) -> None:
    assert Searcher(snapshots["Flat"], "auto:1").backend == "exact-mapped-cpu"


# --- the GPU branches, with the GPU parts played on the CPU ------------------------------------


@pytest.mark.parametrize(("device", "ordinal"), [("auto", 0), ("cuda", 0), ("cuda:1", 1)])
def test_a_flat_index_goes_to_the_resident_torch_searcher_on_cuda(
    snapshots, vectors, queries, fake_gpus, device, ordinal
) -> None:
    found = Searcher(snapshots["Flat"], device, scan="bf16")
    assert fake_gpus == [f"cuda:{ordinal}"]
    assert found.backend == f"torch-cuda:{ordinal}-float32"
    assert found.scan == "fp32"  # the bf16 scan is the mapped CPU search's
    dist, ids = found.search(queries, K)
    np.testing.assert_array_equal(ids, _brute_force(vectors, queries, K))
    want = np.sqrt(((queries[:, None] - vectors[ids - 1]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, want, rtol=1e-4, atol=1e-4)
    _, padded = found.search(queries[:1], N + 5)
    assert (padded[0, N:] == -1).all() and sorted(padded[0, :N]) == list(range(1, N + 1))


def test_an_ordinal_past_the_gpus_is_refused(snapshots, fake_gpus) -> None:
    for kind in ("Flat", "IVF"):
        with pytest.raises(RetrieveError, match="there are 2 GPUs"):
            Searcher(snapshots[kind], "cuda:2")
    assert fake_gpus == []


def test_a_flat_index_that_does_not_fit_the_gpu_is_searched_on_the_cpu(
    snapshots, monkeypatch, caplog, fake_gpus
) -> None:
    def too_big(database, **options):
        raise RetrieveError("6.4 GB of fp16 vectors do not fit in 2.0 GB of free GPU memory")

    monkeypatch.setattr(gpu, "TorchExactSearcher", too_big)
    with caplog.at_level(logging.WARNING, logger=searcher.__name__):
        found = Searcher(snapshots["Flat"], "cuda")
    assert found.backend == "exact-mapped-cpu"
    assert "exact GPU search unavailable (6.4 GB of fp16 vectors do not fit" in caplog.text


def test_an_empty_flat_index_stays_on_the_cpu(snapshots, fake_gpus) -> None:
    assert Searcher(snapshots["empty"], "cuda").backend == "exact-mapped-cpu"
    assert fake_gpus == []


@pytest.mark.parametrize("kind", ["IVF", "HNSW", "normalized", "reduced"])
def test_other_kinds_without_faiss_gpu_warn_and_search_on_the_cpu(
    snapshots, kind, caplog, fake_gpus
) -> None:
    with caplog.at_level(logging.WARNING, logger=searcher.__name__):
        found = Searcher(snapshots[kind], "cuda:1")
    assert found.backend == "faiss-cpu" and fake_gpus == []
    assert "no GPU search for this index kind here" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=searcher.__name__):
        assert Searcher(snapshots[kind], "auto").backend == "faiss-cpu"
    assert caplog.text == ""  # auto asked for no GPU in particular


class _OnFaissGpu:
    """Plays a faiss GPU index: the CPU index underneath, with faiss-gpu's limit on k."""

    def __init__(self, index, ordinal: int) -> None:
        self.index, self.ordinal = index, ordinal
        self.d, self.ntotal = index.d, index.ntotal

    def search(self, queries: np.ndarray, k: int):
        assert k <= gpu.FAISS_GPU_MAX_K, "faiss-gpu answers at most 2048 neighbours"
        return self.index.search(queries, k)


def test_other_kinds_move_to_faiss_gpu_on_the_device_asked(snapshots, queries, monkeypatch) -> None:
    monkeypatch.setattr(gpu, "torch_cuda_count", lambda: 0)
    monkeypatch.setattr(gpu, "faiss_gpu_count", lambda: 2)
    monkeypatch.setattr(gpu, "faiss_index_to_gpu", _OnFaissGpu)
    snapshot = snapshots["HNSW"]
    found = Searcher(snapshot, "cuda:1")
    assert found.backend == "faiss-gpu:1" and found._faiss.ordinal == 1
    assert Searcher(snapshot, "auto").backend == "faiss-gpu:0"
    want = searcher.search_faiss(snapshot.search_index(), queries, K)
    np.testing.assert_array_equal(found.search(queries, K)[1], want[1])
    # more neighbours than faiss-gpu answers: from the mapped index on the CPU
    many = gpu.FAISS_GPU_MAX_K + 1
    on_cpu = searcher.search_faiss(snapshot.search_index(), queries[:2], many)[1]
    np.testing.assert_array_equal(found.search(queries[:2], many)[1], on_cpu)
    # a Flat index is still scanned by the exact search (faiss-gpu's Flat is not used)
    assert Searcher(snapshots["Flat"], "cuda").backend == "exact-mapped-cpu"


def test_a_failed_move_to_faiss_gpu_is_a_warning_naming_why(
    snapshots, queries, monkeypatch, caplog
) -> None:
    def refuse(index, device=0):
        raise RuntimeError("Error in f at GpuCloner.cpp:1: not implemented on the GPU")

    monkeypatch.setattr(gpu, "torch_cuda_count", lambda: 0)
    monkeypatch.setattr(gpu, "faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(gpu, "faiss_index_to_gpu", refuse)
    with caplog.at_level(logging.WARNING, logger=searcher.__name__):
        found = Searcher(snapshots["IVF"], "auto")
    assert found.backend == "faiss-cpu"
    assert "faiss cannot hold this index on the GPU (not implemented on the GPU)" in caplog.text
    assert found.search(queries, 5)[1].shape == (len(queries), 5)


# --- opening reads no vectors ------------------------------------------------------------------


def _resident_kib(path: Path) -> int:
    """KiB of ``path`` mapped into this process and present in its page tables (smaps ``Rss``)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            first = line.split()
            if first and "-" in first[0] and ":" not in first[0]:  # a mapping's header line
                inside = len(first) >= 6 and first[5] == str(path)
            elif inside and first[0] == "Rss:":
                total += int(first[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_opening_a_searcher_reads_no_vectors_until_it_searches(tmp_path: Path, no_gpu) -> None:
    rows = _clustered(2048, 1024)  # 8 MiB of vectors
    snapshot = _write(tmp_path / "big", rows)
    try:
        path = (snapshot.vectors_path).resolve()
        found = Searcher(snapshot, "cpu")
        assert found.backend == "exact-mapped-cpu"
        opened = _resident_kib(path)
        assert opened < rows.nbytes / 1024 / 20, f"{opened} KiB of the file read at open"
        found.search(rows[:1], 3)  # the norms pass and one scan touch every vector
        assert _resident_kib(path) > rows.nbytes / 1024 * 0.9  # the measure sees reads
    finally:
        snapshot.close()


# --- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_a_flat_index_on_each_gpu_answers_as_the_cpu_search(snapshots, queries) -> None:
    import torch

    cpu = Searcher(snapshots["Flat"], "cpu")
    want_dist, want_ids = cpu.search(queries, K)
    for ordinal in sorted({0, torch.cuda.device_count() - 1}):
        found = Searcher(snapshots["Flat"], f"cuda:{ordinal}")
        assert found.backend == f"torch-cuda:{ordinal}-float32"  # 50 KB fit in fp32
        dist, ids = found.search(queries, K)
        # the expanded form on the GPU against exact distances: only near ties may swap
        overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, want_ids, strict=True)])
        assert overlap >= 0.99 and (ids[:, 0] == want_ids[:, 0]).all()
        np.testing.assert_allclose(dist, want_dist, rtol=1e-3, atol=1e-3)
    assert Searcher(snapshots["Flat"], "auto").backend == "torch-cuda:0-float32"


@pytest.mark.cuda
def test_an_ordinal_past_the_gpus_is_refused_on_a_gpu_machine(snapshots) -> None:
    import torch

    past = max(torch.cuda.device_count(), gpu.faiss_gpu_count())
    with pytest.raises(RetrieveError, match=f"there are {past} GPUs"):
        Searcher(snapshots["Flat"], f"cuda:{past}")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["IVF", "HNSW", "normalized", "reduced"])
def test_other_kinds_on_a_gpu_use_faiss_gpu_where_it_is_installed(snapshots, queries, kind) -> None:
    found = Searcher(snapshots[kind], "cuda")
    cpu_ids = Searcher(snapshots[kind], "cpu").search(queries, K)[1]
    if gpu.faiss_gpu_count() == 0:
        assert found.backend == "faiss-cpu"  # the faiss-cpu wheel: the kind stays on the CPU
        np.testing.assert_array_equal(found.search(queries, K)[1], cpu_ids)
        return
    if found.backend == "faiss-cpu":
        pytest.skip(f"faiss-gpu cannot hold {kind} (warned)")  # e.g. HNSW: no GPU version
    assert found.backend == "faiss-gpu:0"
    ids = found.search(queries, K)[1]
    overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, cpu_ids, strict=True)])
    assert overlap >= 0.95
