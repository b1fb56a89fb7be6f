"""The benchmarks' own faiss helpers (bench/faiss_helpers.py): shared IVF centroids, sizes."""

from __future__ import annotations

import importlib.util
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


# -- bench/duplicates.py: its own edits, the hashes over 8 isometries, the pair scoring ----------

from duplicates import (  # noqa: E402
    KINDS,
    Collection,
    Item,
    components_from_groups,
    edit_image,
    hamming,
    hash_isometries,
    score,
)
from PIL import Image, ImageFilter  # noqa: E402


def photo(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Smooth random colours: enough structure for a perceptual hash to see."""
    noise = np.random.default_rng(seed).integers(0, 256, (size[1] // 4, size[0] // 4, 3))
    small = Image.fromarray(noise.astype(np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))


def test_each_edit_kind_makes_its_own_change() -> None:
    image, rng = photo(), np.random.default_rng(0)
    out = {kind: edit_image(image, kind, rng) for kind in KINDS}
    assert out["jpeg"][2] <= 30 and out["jpeg"][0].size == image.size
    assert 0.29 * 64 <= out["shrink"][0].width <= 0.38 * 64
    assert out["crop"][0].width < 0.8 * 64 and out["crop"][0].height < 0.8 * 48
    assert out["rotate"][0].size in {(48, 64), (64, 48)} and out["rotate"][1].startswith("rotate")
    assert out["border"][0].width * out["border"][0].height > 64 * 48
    assert out["grey"][0].mode == "L"
    for kind in ("mirror", "caption", "tone"):
        diff = np.abs(np.asarray(out[kind][0], float) - np.asarray(image, float)).mean()
        assert diff > 1, kind


def test_hashes_over_isometries_pair_a_rotated_copy_that_plain_hashes_miss() -> None:
    image = photo(1, (64, 64))
    turned = image.transpose(Image.Transpose.ROTATE_90)
    methods = ["phash"] + (["pdq"] if importlib.util.find_spec("pdqhash") else [])
    for method in methods:
        a = hash_isometries(image, method)[None]
        b = hash_isometries(turned, method)[None]
        assert hamming(a, b, isometries=True)[0, 0] <= 4, method
        assert hamming(a, b)[0, 0] > 10, method


def test_score_counts_pairs_inside_groups_and_pairs_of_two_originals_apart() -> None:
    items = [
        Item("o0", "original", 0),
        Item("o1", "original", 1),
        Item("c0m", "copy", 0, "mirror"),
        Item("c0c", "copy", 0, "crop"),
        Item("s0a", "second", 0),
        Item("s0b", "second", 0),
    ]
    collection = Collection("", items, [0])
    # one group {o0, o1, c0m} and the two second shots together; c0c alone
    label = components_from_groups(len(items), [[0, 1], [1, 2], [4, 5]])
    s = score(collection, label)
    assert (s["pairs"], s["true_pairs"], s["truth"], s["original_pairs"]) == (3, 1, 3, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["without_original_pairs"]["precision"] == pytest.approx(1 / 2)
    assert s["recall_by_kind"] == {"mirror": 1.0, "crop": 0.0}
    assert (s["second_shots_joined"], s["second_shots"]) == (1, 1)
