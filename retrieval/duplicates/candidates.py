"""Candidate pairs from three cheap signals, none of them all-pairs; verification decides.

- **fc7**: each image's ``k`` nearest neighbours, kept when close *for that image*: the pair's
  distance over the image's own background (the mean distance to its farther neighbours, ranks
  k/2..k). A global threshold fails both ways: an edit moves a weak model's fc7 far, and a dense
  region of the collection (many photos of one thing) sits close everywhere; the ratio is the
  score normalisation of SSCD (Pizzi et al. 2022) in distance form.
- **hash**: pairs whose pHash, under any of the 8 flips and quarter turns, is within ``radius``
  bits (a faiss binary range search), so a mirrored or rotated copy meets its original whatever
  fc7 makes of it.
- **window**: each image's pHash against the pHashes of every image's 70% windows, its
  ``k`` nearest images kept: an off-centre crop meets the picture it was cut from.

Exact neighbours up to ``NearOptions`` ``auto``'s limit; above it, a PCA copy in an inverted file
(the near pass's machinery), each candidate's distance then computed on the full vectors. The
two Hamming searches likewise: exact up to EXACT_UP_TO images, then a binary inverted file
(:func:`hamming_index`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from retrieval.collection.near import NearOptions, exact_distances, reduce
from retrieval.collection.vectors import VectorSource, blocks
from retrieval.devices import faiss_threads, usable_cores

log = logging.getLogger(__name__)
T = TypeVar("T")

FROM_FC7 = 1
FROM_HASH = 2
FROM_WINDOW = 4
SIGNALS = {FROM_FC7: "fc7", FROM_HASH: "hash", FROM_WINDOW: "window"}
EXACT_UP_TO = 20_000  # vectors searched exactly (all in memory: 20,000 x 4096 x 4 = 328 MB)
# Inverted lists probed per query above EXACT_UP_TO images (see hamming_index). Hashes: 8
# queries an image, and a copy's hash is a few bits from its original's; windows: one query an
# image, a crop up to 14 bits from its window, so more.
HASH_NPROBE = 32
WINDOW_NPROBE = 256


@dataclass(frozen=True)
class CandidateOptions:
    """How wide the candidate net is cast (verification keeps it honest)."""

    k: int = 10  # fc7 and window neighbours per image
    # fc7: distance / the image's background distance, at most. Untrained fc7 puts a bordered or
    # captioned copy among the 10 nearest but hardly nearer than the rest (ratios up to 1.0 on
    # Imagenette), so the bar only drops the neighbours clearly farther than the background.
    ratio: float = 1.1
    radius: int = 12  # hash: bits apart under the best isometry, at most
    window_bits: int = 18  # window: bits apart, at most (crops: <= 14; other images: >= 16)
    near: NearOptions = field(default_factory=NearOptions)


@dataclass
class Candidates:
    """Pairs ``a < b`` (positions), the signals that proposed each, their fc7 distance and
    ratio (the smaller of the two directions)."""

    a: np.ndarray
    b: np.ndarray
    source: np.ndarray  # bit set of FROM_FC7 / FROM_HASH
    distance: np.ndarray
    ratio: np.ndarray
    background: np.ndarray  # per position: the mean distance to its farther neighbours
    # seconds each step took: fc7, hash and window searches, then the pairs' distances
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.a)


def _a_core_each(work: Callable[[int], T], starts: range) -> list[T]:
    """``work(start)`` for each of ``starts``, a core at a time, each on one OpenMP thread; the
    results in the starts' order. faiss's own threads wait for each other at every parallel
    region and collapse when another process wants a core. A binary inverted file of 2 million
    codes on this 2-core machine beside one busy process: built in 86 s with 2 OpenMP threads
    (2.1 s quiet), 3.6 s with 1; its searches 24 s (5.7 s quiet), 11.7 s with 1. A thread of
    ours a core, one OpenMP thread apiece, keeps both speeds."""

    def one(start: int) -> T:
        with faiss_threads(1):
            return work(start)

    with ThreadPoolExecutor(max(1, usable_cores())) as pool:
        return list(pool.map(one, starts))


def fc7_neighbours(
    source: VectorSource,
    k: int,
    options: NearOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, distances), each N x k: every vector's k nearest others, nearest first
    (-1 / inf where the collection has fewer)."""
    import faiss

    options = options or NearOptions()
    k = max(1, min(k, source.count - 1))
    if source.count <= EXACT_UP_TO:
        index = faiss.IndexFlatL2(source.dim)
        for positions in blocks(source.count):
            index.add(source.take(positions))
        searched, full = index, None
    else:
        _pca, full = reduce(source, options, progress)
        nlist = max(1, min(int(4 * np.sqrt(len(full))), len(full) // 39))
        quantizer = faiss.IndexFlatL2(full.shape[1])
        searched = faiss.IndexIVFFlat(quantizer, full.shape[1], nlist)
        searched.train(full[:: max(1, len(full) // (64 * nlist))])
        searched.add(full)
        searched.nprobe = min(options.nprobe, nlist)
    found = np.full((source.count, k), -1, np.int64)
    step = 2048
    for start in range(0, source.count, step):
        positions = np.arange(start, min(source.count, start + step))
        queries = source.take(positions) if full is None else full[positions]
        _, labels = searched.search(queries, k + 1)
        for row, (own, got) in enumerate(zip(positions, labels)):
            others = got[(got != own) & (got >= 0)][:k]
            found[start + row, : len(others)] = others
        if progress:
            progress(int(positions[-1]) + 1, source.count)
    own = np.repeat(np.arange(source.count), k)
    flat = found.ravel()
    valid = flat >= 0
    distances = np.full(flat.shape, np.inf, np.float32)
    distances[valid] = exact_distances(source, own[valid], flat[valid], options.block)
    distances = distances.reshape(found.shape)
    order = np.argsort(distances, axis=1, kind="stable")  # the reduced copy's order is not exact
    return np.take_along_axis(found, order, 1), np.take_along_axis(distances, order, 1)


def backgrounds(distances: np.ndarray) -> np.ndarray:
    """Each image's background distance: the mean over its farther half of neighbours."""
    far = distances[:, distances.shape[1] // 2 :]
    far = np.where(np.isfinite(far), far, np.nan)
    with np.errstate(all="ignore"):
        mean = np.nanmean(far, axis=1) if far.shape[1] else np.full(len(far), np.nan)
    fallback = np.nanmedian(mean) if np.isfinite(mean).any() else 1.0
    return np.where(np.isfinite(mean) & (mean > 0), mean, fallback).astype(np.float32)


def hamming_index(codes: np.ndarray, exact: bool, nprobe: int, queries: int | None = None):
    """A faiss binary index of 64-bit ``codes`` (M x 8 uint8): exact (all pairs) when asked,
    else an inverted file, ``nprobe`` lists probed per query. Building it compares every code
    with every list's centroid (M L), and ``queries`` searches (Q, default M) each compare with
    every centroid and scan nprobe lists of M / L codes: L = sqrt(Q nprobe M / (M + Q)) lists
    make the whole cost least, about sqrt(M) a search when Q is near M. (The window index holds
    49 codes an image against one query: sized for the queries alone it had 7 times the lists
    and its building cost most of the window stage.) Its centroids are codes drawn from
    ``codes`` (binary k-means would cost minutes at a million images and buys little for codes
    this near: a copy's hash sits a few bits from its original, so both usually fall to one
    centroid). A near code in a list left unprobed is missed: bench/duplicates_scale.py
    measures that as the planted copies found. The inverted file is built a part a core
    (:func:`_a_core_each`) and the parts joined in order, as if added at once."""
    import faiss

    if exact:
        index = faiss.IndexBinaryFlat(64)
        index.add(codes)
        return index
    count, asked = len(codes), queries or len(codes)
    lists = max(1, min(count, int(np.sqrt(asked * nprobe * count / (count + asked)))))
    centroids = np.random.default_rng(0).choice(count, lists, replace=False)
    quantizer = faiss.IndexBinaryFlat(64)
    quantizer.add(codes[np.sort(centroids)])
    step = -(-count // max(1, usable_cores()))

    def part(start: int):
        built = faiss.IndexBinaryIVF(quantizer, 64, lists)
        built.is_trained = True
        built.add(codes[start : start + step])
        return built

    parts = _a_core_each(part, range(0, count, step))  # a part a core, then joined in order
    index = parts[0]
    for start, other in zip(range(step, count, step), parts[1:]):
        index.merge_from(other, start)  # its lists appended: as if added at once
    index.nprobe = min(nprobe, lists)
    index.keep = quantizer  # faiss holds a pointer only: keep its quantizer alive with it
    return index


def _codes(values: np.ndarray) -> np.ndarray:
    """uint64 hashes (any shape) as faiss binary codes: rows of 8 bytes."""
    return np.ascontiguousarray(values).view(np.uint8).reshape(-1, 8)


def hash_pairs(hashes: np.ndarray, has: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b) whose hashes are within ``radius`` bits under some isometry.

    ``hashes`` is N x 8 uint64 (ISOMETRIES order), ``has`` marks the rows that have one."""
    positions = np.flatnonzero(has)
    if len(positions) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    exact = len(positions) <= EXACT_UP_TO
    index = hamming_index(_codes(hashes[positions, 0]), exact, HASH_NPROBE, 8 * len(positions))

    def search(start: int) -> np.ndarray:
        chunk = positions[start : start + 4096]
        lims, _, labels = index.range_search(_codes(hashes[chunk]), radius + 1)  # distance <
        own = np.repeat(np.repeat(chunk, 8), np.diff(lims).astype(np.int64))
        other = positions[labels]
        keep = own != other
        return np.stack([np.minimum(own[keep], other[keep]), np.maximum(own[keep], other[keep])], 1)

    pairs = np.unique(np.concatenate(_a_core_each(search, range(0, len(positions), 4096))), axis=0)
    return pairs[:, 0], pairs[:, 1]


def window_pairs(
    hashes: np.ndarray, windows: np.ndarray, has: np.ndarray, k: int, max_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b): b among the ``k`` images whose windows come nearest a's pHash."""
    positions = np.flatnonzero(has)
    if len(positions) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    per = windows.shape[1]
    exact = len(positions) <= EXACT_UP_TO
    index = hamming_index(_codes(windows[positions]), exact, WINDOW_NPROBE, len(positions))
    wanted = min(index.ntotal, 4 * k * 2)  # windows of one image crowd the nearest: ask more

    def search(start: int) -> tuple[np.ndarray, np.ndarray]:
        chunk = positions[start : start + 4096]
        bits, labels = index.search(_codes(hashes[chunk, 0]), wanted)
        own, other = _first_images(chunk, labels, bits, positions, per, k, max_bits)
        return np.minimum(own, other), np.maximum(own, other)

    found = _a_core_each(search, range(0, len(positions), 4096))
    return np.concatenate([a for a, _ in found]), np.concatenate([b for _, b in found])


def _first_images(
    chunk: np.ndarray,
    labels: np.ndarray,
    bits: np.ndarray,
    positions: np.ndarray,
    per: int,
    k: int,
    max_bits: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(query, image) for each query's first ``k`` distinct other images among its window
    hits (nearest first, within ``max_bits``): row by row, in the hits' order."""
    rows = np.repeat(np.arange(len(chunk)), labels.shape[1])
    hit = (labels.ravel() >= 0) & (bits.ravel() <= max_bits)
    image = np.where(hit, positions[np.maximum(labels.ravel(), 0) // per], -1)
    hit &= image != chunk[rows]
    where = np.flatnonzero(hit)  # in row order, and in each row nearest first
    _, first = np.unique(rows[where] * (positions[-1] + 1) + image[where], return_index=True)
    where = np.sort(where[first])  # each (row, image) at its first hit
    rank = np.arange(len(where)) - np.searchsorted(rows[where], rows[where])
    where = where[rank < k]
    return chunk[rows[where]].astype(np.int64), image[where].astype(np.int64)


def candidate_pairs(
    source: VectorSource,
    hashes: np.ndarray,
    windows: np.ndarray,
    has: np.ndarray,
    options: CandidateOptions = CandidateOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> Candidates:
    """Every pair either signal proposes, each with its full-vector fc7 distance and ratio."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    neighbours, distances = fc7_neighbours(source, options.k, options.near, progress)
    background = backgrounds(distances)
    own = np.repeat(np.arange(source.count), neighbours.shape[1])
    other, gap = neighbours.ravel(), distances.ravel()
    close = (other >= 0) & (gap <= options.ratio * background[own])
    fa, fb = np.minimum(own[close], other[close]), np.maximum(own[close], other[close])
    fc7_gap = gap[close]
    seconds["fc7"] = time.perf_counter() - started
    started = time.perf_counter()
    ha, hb = hash_pairs(hashes, has, options.radius)
    seconds["hash"] = time.perf_counter() - started
    started = time.perf_counter()
    wa, wb = window_pairs(hashes, windows, has, options.k, options.window_bits)
    seconds["window"] = time.perf_counter() - started
    started = time.perf_counter()
    a = np.concatenate([fa, ha, wa])
    b = np.concatenate([fb, hb, wb])
    tags = np.concatenate(
        [np.full(len(fa), FROM_FC7), np.full(len(ha), FROM_HASH), np.full(len(wa), FROM_WINDOW)]
    )
    if not len(a):
        empty = np.zeros(0, np.int64)
        none = np.zeros(0, np.float32)
        return Candidates(empty, empty, empty, none, none, background, seconds)
    keys = a * source.count + b
    unique, inverse = np.unique(keys, return_inverse=True)
    source_bits = np.zeros(len(unique), np.int64)
    np.bitwise_or.at(source_bits, inverse, tags)
    a, b = unique // source.count, unique % source.count
    # fc7's pairs have their full-vector distance already; the others are read for theirs
    distance = np.empty(len(unique), np.float32)
    distance[inverse[: len(fa)]] = fc7_gap
    rest = np.flatnonzero((source_bits & FROM_FC7) == 0)
    distance[rest] = exact_distances(source, a[rest], b[rest], options.near.block)
    ratio = distance / np.maximum(np.maximum(background[a], background[b]), 1e-12)
    seconds["distances"] = time.perf_counter() - started
    log.info(
        "candidates: %d pairs (%s)",
        len(a),
        ", ".join(
            f"{int((source_bits & bit).astype(bool).sum())} from {name}"
            for bit, name in SIGNALS.items()
        ),
    )
    return Candidates(a, b, source_bits, distance, ratio.astype(np.float32), background, seconds)
