"""The benchmarks' own faiss helpers (bench/faiss_helpers.py): shared IVF centroids, sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.errors import RetrieveError
from retrieval.indexes.kinds import IndexSpec, build_index

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from faiss_helpers import (
    build_seeded,
    index_memory_bytes,
    index_ram_bytes,
    ivf_centroids,
)

DIM, N = 64, 3000


@pytest.fixture(scope="module")
def xb() -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    return np.maximum(x, 0)


def filled(spec: IndexSpec, xb: np.ndarray):
    index = build_index(spec, DIM, xb)
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    return index


def test_ivf_centroids_can_be_reused_to_skip_the_coarse_k_means(xb) -> None:
    centroids = ivf_centroids(build_index(IndexSpec("IVF64,Flat"), DIM, xb))
    assert centroids.shape == (64, DIM)
    index = build_seeded(IndexSpec("IVF64,SQ8"), DIM, xb[:2000], centroids)
    np.testing.assert_array_equal(ivf_centroids(index), centroids)
    assert ivf_centroids(build_index(IndexSpec("HNSW32"), DIM, None)) is None
    with pytest.raises(RetrieveError, match="64 x 64"):
        build_seeded(IndexSpec("IVF64,Flat"), DIM, xb, centroids[:10])


def test_memory_bytes_is_the_serialized_size(xb) -> None:
    faiss.omp_set_num_threads(1)
    index = filled(IndexSpec("IVF64,PQ8"), xb)
    assert index_memory_bytes(index) == len(faiss.serialize_index(index))
    flat = filled(IndexSpec("Flat"), xb)
    assert index_memory_bytes(flat) > N * DIM * 4
    assert index_ram_bytes(flat) > index_memory_bytes(flat)  # IDMap2's hash map
    assert index_memory_bytes(index) < index_memory_bytes(flat) / 4
