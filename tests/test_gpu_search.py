"""GPU search: fast-scan kinds made movable, cloner options, fp32 accumulation, resident search.

The rewrite of fast-scan IVF-PQ into plain IVF-PQ and the fp16 path's arithmetic run on the CPU
(faiss-cpu has both index classes; torch runs the searcher anywhere); moving to a GPU and the
CUDA matmul with an fp32 result are the ``cuda`` tests. Where a snapshot's search is placed is
``test_searcher_placement.py``.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from retrieval.indexes import exact, gpu


def _data(n: int = 4000, d: int = 64, queries: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d)).astype(np.float32) * 3
    xb = centres[rng.integers(0, 20, n)] + rng.standard_normal((n, d)).astype(np.float32)
    xq = xb[rng.choice(n, queries, replace=False)] + 0.1 * rng.standard_normal((queries, d))
    return xb.astype(np.float32), xq.astype(np.float32)


def _pretransform(node, x: np.ndarray) -> np.ndarray:
    """Vectors through an IndexPreTransform's chain (L2norm, PCA...), as the index stores them."""
    for i in range(node.chain.size()):
        x = faiss.downcast_VectorTransform(node.chain.at(i)).apply(np.ascontiguousarray(x))
    return x


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


@pytest.mark.parametrize("factory", ["IVF16,PQ16x4fs", "PCA32,IVF16,PQ8x4fs"])
def test_fast_scan_ivfpq_is_rewritten_as_plain_ivfpq_over_the_same_codes(factory: str) -> None:
    xb, xq = _data(n=2000)
    ids = np.arange(len(xb), dtype=np.int64) * 3 + 7
    index = faiss.index_factory(xb.shape[1], factory)
    index.train(xb)
    index.add_with_ids(xb, ids)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 4)
    plain = gpu.without_fast_scan(index)
    core = faiss.downcast_index(faiss.extract_index_ivf(plain))
    assert type(core) is faiss.IndexIVFPQ and core.ntotal == len(xb) and core.nprobe == 4
    assert plain.d == index.d
    # The reference: a plain IVF-PQ with the same quantizers that encodes the vectors itself.
    fast = faiss.downcast_index(faiss.extract_index_ivf(index))
    fresh = faiss.IndexIVFPQ(fast.quantizer, fast.d, fast.nlist, fast.pq.M, fast.pq.nbits)
    fresh.pq, fresh.by_residual, fresh.is_trained, fresh.nprobe = fast.pq, fast.by_residual, True, 4
    inner = xb
    node = faiss.downcast_index(index)
    if isinstance(node, faiss.IndexPreTransform):
        inner = _pretransform(node, xb)
    fresh.add_with_ids(inner, ids)
    query = _pretransform(node, xq) if isinstance(node, faiss.IndexPreTransform) else xq
    want_d, want_i = fresh.search(query, 10)
    got_d, got_i = plain.search(xq, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5)
    # and the fast-scan ranks alike, up to its 8-bit quantised lookup tables (and ties)
    assert _overlap(got_i, index.search(xq, 10)[1]) >= 0.7


def test_other_kinds_are_left_as_they_are() -> None:
    for factory in ("Flat", "IVF8,Flat", "IVF8,PQ8", "PCA16,IVF8,PQ8"):
        index = faiss.index_factory(64, factory)  # untrained: the rewrite only looks at kinds
        assert gpu.without_fast_scan(index) is index


def test_ivfpq_with_codes_over_48_bytes_moves_with_float16_lookup_tables() -> None:
    if not hasattr(faiss, "GpuClonerOptions"):
        pytest.skip("this faiss build has no GPU cloner options (faiss-cpu)")
    wide = faiss.index_factory(128, "IVF8,PQ64")
    narrow = faiss.index_factory(128, "IVF8,PQ32")
    assert gpu.gpu_cloner_options(wide).useFloat16
    assert not gpu.gpu_cloner_options(narrow).useFloat16


def test_fp16_products_come_back_as_fp32_accumulated_in_fp32() -> None:
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.standard_normal((8, 2048)).astype(np.float32) / 50).half()
    x = torch.from_numpy(rng.standard_normal((16, 2048)).astype(np.float32) / 50).half()
    got = exact.inner_products(q, x)
    reference = q.double() @ x.double().T
    assert got.dtype == torch.float32
    # fp16 results keep ~3 significant digits; fp32 accumulation of fp16 operands is exact here
    assert torch.allclose(got.double(), reference, rtol=1e-5, atol=1e-7)


def test_resident_fp16_searcher_ranks_as_the_fp32_one() -> None:
    xb, xq = _data(n=3000, d=256)
    fp32 = gpu.TorchExactSearcher(xb, device="cpu", precision="float32")
    fp16 = gpu.TorchExactSearcher(xb, device="cpu", precision="float16", chunk_rows=512)
    (d32, r32), (d16, r16) = fp32.search(xq, 10), fp16.search(xq, 10)
    assert _overlap(r16, r32) >= 0.95
    # fp16 stored vectors: the error of ||q||^2 + ||x||^2 - 2 q.x is a small part of ||x||^2
    scale = float((xb**2).sum(1).mean())
    assert np.abs(d16 - d32).max() <= 1e-3 * scale
    assert fp16.search(xq, 10)[1].tolist() == r16.tolist()  # resident: same answer again


# --- on a GPU -------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_fp16_products_use_an_fp32_result() -> None:
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.standard_normal((64, 4096)).astype(np.float32) / 64)
    x = torch.from_numpy(rng.standard_normal((4096, 4096)).astype(np.float32) / 64)
    qh, xh = q.half().cuda(), x.half().cuda()
    got = exact.inner_products(qh, xh)
    reference = qh.double() @ xh.double().T
    rounded = (qh @ xh.T).double()  # fp16 out: what the searcher used to do
    assert got.dtype == torch.float32
    assert (got.double() - reference).abs().max() < (rounded - reference).abs().max() / 4


@pytest.mark.cuda
def test_cuda_fp16_exact_search_matches_numpy_brute_force() -> None:
    xb, xq = _data(n=20000, d=512, queries=100)
    searcher = gpu.TorchExactSearcher(xb, device="cuda", precision="float16")
    _, rows = searcher.search(xq, 10)
    d2 = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
    want = np.argsort(d2, axis=1)[:, :10]
    assert _overlap(rows, want) >= 0.98


@pytest.mark.cuda
def test_fast_scan_and_wide_ivfpq_move_to_a_faiss_gpu() -> None:
    if gpu.faiss_gpu_count() == 0:
        pytest.skip("faiss without GPUs (faiss-cpu): the torch exact path serves the GPU")
    xb, xq = _data(n=20000, d=128)
    for factory in ("IVF64,PQ32x4fs", "IVF64,PQ64"):
        index = faiss.index_factory(128, factory)
        index.train(xb)
        index.add(xb)
        on_gpu = gpu.faiss_index_to_gpu(index)
        _, want = index.search(xq, 10)
        _, got = on_gpu.search(xq, 10)
        assert _overlap(got, want) >= 0.9, factory
