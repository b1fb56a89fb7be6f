"""Pairs of vectors closer than a threshold, by FAISS range search, never an all-pairs matrix.

Three ways, one answer format (``a < b`` positions and their exact Euclidean distance):

- ``exact``: full vectors, block against block (``IndexFlatL2`` over one block at a time); the
  baseline, O(N^2 D) work but only two blocks in memory.
- ``pca``: a reduced copy (PCA to ``dim`` components, N x dim in memory). Projecting onto an
  orthonormal subspace never lengthens a distance, so a range search there with the same
  threshold finds every true pair (and some false ones); each candidate is then checked with
  the full vectors. Same pairs as ``exact``, far less work.
- ``ivf``: the reduced copy in an inverted file (``IndexIVFFlat``), ``nprobe`` lists per query,
  each vector's ``k`` nearest there (those within the threshold) checked with the full vectors:
  approximate (a pair split across lists, or a partner beyond the k nearest of both sides, is
  missed; components still join larger groups through their nearest), and at most N x k
  candidates however loose the reduced distances are, which is what makes millions fast.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from retrieval.collection.vectors import BLOCK, VectorSource, blocks, sample_positions
from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

METHODS = ("auto", "exact", "pca", "ivf")
# Above this many vectors `auto` uses the inverted file (bounded candidates); below, the reduced
# flat copy (the exact pairs, but as many candidates as the PCA bound lets through).
IVF_FROM = 100_000


@dataclass(frozen=True)
class NearOptions:
    """How the near pass searches (``auto``: exact under 20,000 images, then pca, then ivf)."""

    method: str = "auto"
    dim: int = 128
    nprobe: int = 16
    k: int = 16  # ivf: nearest neighbours per vector taken as candidates
    train_sample: int = 20_000
    seed: int = 0
    block: int = BLOCK
    # Stop with TooManyPairs past this many candidate pairs (None: no limit). A threshold far
    # above any duplicate's distance pairs every image with every other, N^2 / 2 of them; the
    # server sets it (with small blocks) so that such a request is refused, not run out of memory.
    max_pairs: int | None = None

    def chosen(self, count: int, dim: int) -> str:
        if self.method != "auto":
            return self.method
        if count <= 20_000 or dim <= self.dim:
            return "exact"
        return "pca" if count < IVF_FROM else "ivf"


class TooManyPairs(RetrieveError):
    """The threshold joins more pairs than ``NearOptions.max_pairs``."""


def _count(found: list[np.ndarray], threshold: float, max_pairs: int | None) -> None:
    if max_pairs is not None and sum(len(f) for f in found) > max_pairs:
        raise TooManyPairs(
            f"threshold {threshold:g} joins more than {max_pairs:,} pairs of images: "
            "far more than duplicates; give a smaller threshold"
        )


@dataclass
class Pairs:
    """Pairs ``a[i] < b[i]`` (positions) at exact Euclidean distance ``distance[i]``."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray
    candidates: int = 0  # pairs the reduced search proposed before the exact check
    method: str = "exact"

    def __len__(self) -> int:
        return len(self.a)


def near_pairs(
    source: VectorSource,
    threshold: float,
    options: NearOptions = NearOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> Pairs:
    """Every pair of distinct positions within ``threshold`` (Euclidean) of each other."""
    import faiss

    method = options.chosen(source.count, source.dim)
    if method not in METHODS[1:]:
        raise ValueError(f"method must be one of {METHODS}, not {options.method!r}")
    radius = float(threshold) ** 2  # faiss L2 indexes compare squared distances
    if method == "exact":
        a, b, sq = _flat_blocks(source, radius, options.block, progress, options.max_pairs)
        return Pairs(a, b, np.sqrt(np.maximum(sq, 0)), len(a), method)
    _pca, reduced = reduce(source, options, progress)
    if method == "pca":
        index = faiss.IndexFlatL2(reduced.shape[1])
    else:
        nlist = max(1, min(int(4 * math.sqrt(len(reduced))), len(reduced) // 39))
        quantizer = faiss.IndexFlatL2(reduced.shape[1])
        index = faiss.IndexIVFFlat(quantizer, reduced.shape[1], nlist)
        train = reduced[sample_positions(len(reduced), 64 * nlist, options.seed)]
        index.train(train)
        index.nprobe = min(options.nprobe, nlist)
    index.add(reduced)
    found_a, found_b = [], []
    for positions in blocks(len(reduced), options.block):
        if method == "pca":
            lims, _, labels = index.range_search(reduced[positions], radius)
            own = np.repeat(positions, np.diff(lims).astype(np.int64))
        else:  # the k nearest in the reduced copy that are also within its radius
            sq, labels = index.search(reduced[positions], min(options.k, len(reduced)))
            own = np.repeat(positions, labels.shape[1])
            labels, sq = labels.ravel(), sq.ravel()
            near = (labels >= 0) & (sq <= radius)
            own, labels = own[near], labels[near]
        keep = labels != own
        found_a.append(np.minimum(own[keep], labels[keep]))
        found_b.append(np.maximum(own[keep], labels[keep]))
        _count(found_a, threshold, options.max_pairs)
    a = np.concatenate(found_a) if found_a else np.zeros(0, np.int64)
    b = np.concatenate(found_b) if found_b else np.zeros(0, np.int64)
    if len(a):
        a, b = np.unique(np.stack([a, b], axis=1), axis=0).T
    distance = exact_distances(source, a, b, options.block)
    keep = distance <= threshold
    log.info("near pass (%s): %d candidates, %d within %.3f", method, len(a), keep.sum(), threshold)
    return Pairs(a[keep], b[keep], distance[keep], len(a), method)


@dataclass
class Projection:
    """``(x - mean) @ components.T``: orthonormal rows, so projected distances never exceed
    the true ones."""

    mean: np.ndarray
    components: np.ndarray  # dim x D, orthonormal rows

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x - self.mean) @ self.components.T, dtype=np.float32)


def fit_pca(sample: np.ndarray, dim: int, seed: int = 0, power: int = 3) -> Projection:
    """Top ``dim`` principal directions by randomized SVD (Halko et al. 2011): seconds on
    20,000 x 4096, where a full 4096 x 4096 eigendecomposition takes minutes on 2 cores."""
    mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = sample - mean
    rng = np.random.default_rng(seed)
    width = min(dim + 16, *centred.shape)
    basis = centred @ rng.standard_normal((centred.shape[1], width)).astype(np.float32)
    for _ in range(power):
        basis, _ = np.linalg.qr(basis)
        basis, _ = np.linalg.qr(centred.T @ basis)
        basis = centred @ basis
    basis, _ = np.linalg.qr(basis)
    _, _, vt = np.linalg.svd(basis.T @ centred, full_matrices=False)
    return Projection(mean, np.ascontiguousarray(vt[:dim], dtype=np.float32))


def reduce(
    source: VectorSource,
    options: NearOptions,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Projection, np.ndarray]:
    """(PCA fitted on a seeded sample, the N x dim reduced copy)."""
    dim = min(options.dim, source.dim)
    sample = source.take(sample_positions(source.count, options.train_sample, options.seed))
    pca = fit_pca(sample, dim, options.seed)
    reduced = np.empty((source.count, pca.components.shape[0]), np.float32)
    for positions in blocks(source.count, options.block):
        reduced[positions] = pca.apply(source.take(positions))
        if progress:
            progress(int(positions[-1]) + 1, source.count)
    return pca, reduced


DIFF_ROWS = 128  # pairs differenced at once: 2 x 128 x 4096 float32 stay in the caches


def exact_distances(source: VectorSource, a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """Full-vector Euclidean distance of each pair, reading the vectors a block of pairs at a
    time (pairs come sorted by ``a``, so each block reads a run of positions) and subtracting
    them DIFF_ROWS pairs at a time (a whole block's differences at once outgrow the caches and
    took twice as long, for the same numbers)."""
    out = np.empty(len(a), np.float32)
    step = max(1, block // 2)
    for start in range(0, len(a), step):
        pa, pb = a[start : start + step], b[start : start + step]
        wanted, where = np.unique(np.concatenate([pa, pb]), return_inverse=True)
        vectors = source.take(wanted)
        first, second = where[: len(pa)], where[len(pa) :]
        for row in range(0, len(pa), DIFF_ROWS):
            diff = vectors[first[row : row + DIFF_ROWS]] - vectors[second[row : row + DIFF_ROWS]]
            done = start + row
            out[done : done + len(diff)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _flat_blocks(
    source: VectorSource,
    radius: float,
    block: int,
    progress: Callable[[int, int], None] | None,
    max_pairs: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import faiss

    found_a, found_b, found_d = [], [], []
    spans = list(blocks(source.count, block))
    total, done = len(spans) * (len(spans) + 1) // 2, 0
    for j, right in enumerate(spans):
        index = faiss.IndexFlatL2(source.dim)
        index.add(source.take(right))
        for left in spans[: j + 1]:
            queries = source.take(left)
            lims, sq, labels = index.range_search(queries, radius)
            own = np.repeat(left, np.diff(lims).astype(np.int64))
            other = right[labels]
            keep = other > own
            found_a.append(own[keep])
            found_b.append(other[keep])
            found_d.append(sq[keep])
            _count(found_a, math.sqrt(radius), max_pairs)
            done += 1
            if progress:
                progress(done, total)
    if not found_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, d = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_d)
    order = np.lexsort((b, a))
    return a[order], b[order], d[order]
