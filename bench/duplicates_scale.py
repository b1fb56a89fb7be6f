"""The whole duplicates pass at scale: candidates from several signals, then verification.

    python bench/duplicates_scale.py [--n 100000] [--steps 25000,50000] [--verify-pairs 200] \
        [--real BENCH_WORK] [--pythonpath /work/lead] [--out FILE.md] [--json FILE.json]

Issue 21's pipeline has two stages, measured apart and added up:

1. **Candidates**, at ``--steps`` and ``--n`` images, on synthetic data: fc7-like vectors (a
   low-rank latent around classes and instances, ReLU'd; memory-mapped) and 64-bit hashes of
   each image under its 8 flips/rotations and of its 49 70%-windows (each instance its own
   random codes, an image ~10% of their bits flipped, a copy ~4% of its source's: the pairs
   within 6-10 bits per image come out near Imagenette val's real pHash over 8 isometries, which
   the report prints beside them). ``--copies`` of the rows are edited copies of the row before,
   and ``--crops`` of them crops of it: a crop's pHash sits near one of its source's window
   hashes, as many bits from it as bench/duplicates.py's off-centre crops sit from their
   original's nearest window (CROP_BITS), its fc7 and its own hashes unrelated, so the window
   signal alone can find it. The report gives the share it finds at each N: with more images,
   more windows sit by chance as near as a crop's. Uniform random codes understate that: the
   report prints how many other pictures have a window within 10/12/14 bits of an image's pHash
   on these codes and on bench/duplicates.py's real collection (``--real``) at the same N.
   The signals are the library's (``retrieval.duplicates.candidates``: fc7 neighbours under
   each image's own background, hashes over the isometries, window hashes) when the tool's code
   has them: its ``candidate_pairs`` itself where that times its own steps (the union's
   full-vector distances, which the screen needs, then count as a stage of their own), else
   the three signals called one by one. A tree without them gets today's near pass
   (``retrieval.collection.near``, ivf) and a stand-in hash search written here (faiss
   ``IndexBinaryIVF``), no crop-robust signal. Their union goes to the screen (below).
2. **Verification**, timed per pair on real images (Imagenette val: an original against an
   edited copy made by bench/duplicates.py's own edits, and against its nearest other image by
   pHash over 8 isometries, half each; copies and others timed apart, since most candidates at
   scale are not copies), then multiplied by the pairs that reach it. The library's
   ``verify_pair`` when it has one (signatures made beforehand, as the index does), else a
   stand-in (ORB + RANSAC similarity + NCC of the aligned overlap, OpenCV).

Between the two, the **screen** (``retrieval.duplicates.screen``: signatures alone decide which
pairs are worth opening) is timed on real candidate pairs, those the library proposes on
bench/duplicates.py's collection (``--real``: that bench's work folder), with the share of
non-copy pairs it lets through; the synthetic pairs have no pictures to screen, so the pairs
that reach verification are the planted copies plus the others times that measured share.

Times grow by the power of N fitted over the steps and are projected to 1,000,000; peak memory
is the process's max RSS. ``--pythonpath`` puts the tool's code first on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _paths(argv: list[str]) -> None:
    """The tool's code first on sys.path (``--pythonpath``), before anything imports it."""
    for i, a in enumerate(argv):
        if a == "--pythonpath" and i + 1 < len(argv):
            sys.path.insert(0, argv[i + 1])
        elif a.startswith("--pythonpath="):
            sys.path.insert(0, a.split("=", 1)[1])
    sys.path.insert(1, str(ROOT))
    sys.path.insert(1, str(ROOT / "bench"))


_paths(sys.argv)

from duplicates import edit_image, hamming, hash_isometries, val_images  # noqa: E402
from search import machine  # noqa: E402

BITS = 64
HASH_FLIP, COPY_FLIP = 0.10, 0.04
WINDOWS = 49  # hashes of 70% windows per image (the lead's crop-robust signal: a 7 x 7 grid)
# Bits from an off-centre crop's pHash to its original's nearest window hash, and how many of
# bench/duplicates.py's 133 crops (Imagenette val, 70% crops) sat at each (measured on e953d0c)
CROP_BITS = {2: 4, 4: 14, 6: 22, 8: 43, 10: 32, 12: 11, 14: 7}
WINDOW_RADII = (10, 12, 14)


def flips(rng: np.random.Generator, shape: tuple, p: float) -> np.ndarray:
    """uint64 masks of ``shape``, each of the 64 bits set with probability ``p``."""
    out = np.empty(shape, np.uint64)
    flat = out.reshape(-1)
    for s in range(0, len(flat), 1 << 18):  # in chunks: 64 random floats per word
        bits = rng.random((min(1 << 18, len(flat) - s), BITS)) < p
        flat[s : s + len(bits)] = np.packbits(bits, axis=-1).view(">u8")[:, 0]
    return out


def synthetic_density(codes: np.ndarray, truth: np.ndarray, radii: tuple[int, ...]) -> list[float]:
    """Pairs within each radius per image over the 8 isometries, planted copies left out."""
    n = len(codes)
    d = hamming(codes[:, :, None], codes[:, :, None], isometries=True)
    i, j = np.nonzero(np.triu(d <= max(radii), 1))
    planted = truth[truth[:, 1] < n]
    keep = ~np.isin(i * n + j, planted[:, 0] * n + planted[:, 1])
    return [float(((d[i, j] <= r) & keep).sum()) / n for r in radii]


def real_density(images: Path, radii: tuple[int, ...], n: int) -> list[float]:
    """Pairs within each radius per image, pHash over 8 isometries, on ``n`` real images."""
    from PIL import Image

    paths = val_images(images)[:n]
    codes = np.stack([hash_isometries(Image.open(p).convert("RGB"), "phash") for p in paths])
    d = hamming(codes, codes, isometries=True)[np.triu_indices(len(paths), 1)]
    return [float((d <= r).sum()) / len(paths) for r in radii]


# -- synthetic collection ------------------------------------------------------------------------


def window_density(
    hashes: np.ndarray, windows: np.ndarray, picture: np.ndarray, queries: int = 400
) -> list[float]:
    """Per image (``queries`` of them): other pictures with a window within each of
    WINDOW_RADII bits of its pHash. ``picture`` labels each row's picture (copies and crops
    their source's), so an image's own, its copies' and its crops' windows are left out."""
    picked = np.random.default_rng(3).choice(len(hashes), min(len(hashes), queries), False)
    counts = np.zeros(len(WINDOW_RADII))
    for q in picked.tolist():
        nearest = np.bitwise_count(windows ^ hashes[q, 0]).min(axis=1)
        other = picture != picture[q]
        counts += [int((other & (nearest <= radius)).sum()) for radius in WINDOW_RADII]
    return (counts / len(picked)).tolist()


def exact_flips(rng: np.random.Generator, bits: int) -> np.uint64:
    """A uint64 mask with exactly ``bits`` of its 64 bits set, at random."""
    mask = 0
    for bit in rng.choice(BITS, bits, replace=False):
        mask |= 1 << int(bit)
    return np.uint64(mask)


def synthetic(path: Path, n: int, dim: int, copies: float, crops: float = 0.0, seed: int = 0):
    """(memory-mapped n x dim fc7-like vectors, (n, 8) uint64 hashes over the isometries,
    (n, WINDOWS) uint64 hashes of 70% windows, true copy pairs, true crop pairs)."""
    rank, classes, per_class = 256, 1000, 20
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
    bias = (0.25 * rng.standard_normal(dim)).astype(np.float32)
    decay = (1 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
    centres = 0.65 * decay * rng.standard_normal((classes, rank), dtype=np.float32)
    instances = np.repeat(centres, per_class, axis=0)
    instances += 0.8 * decay * rng.standard_normal(instances.shape, dtype=np.float32)
    # hashes: each instance its own random 64-bit code per isometry; an image flips each bit of
    # its instance's with probability HASH_FLIP (two shots of one instance: ~13 bits apart), a
    # copy flips COPY_FLIP of its source's (tuned so the pairs within 6-12 bits per image match
    # Imagenette val's pHash over 8 isometries at the same N: see `real_density`)
    words = rng.integers(0, 2**32, (len(instances), 8, 2), dtype=np.uint64)
    instance_codes = (words[..., 0] << np.uint64(32)) | words[..., 1]
    words = rng.integers(0, 2**32, (len(instances), WINDOWS, 2), dtype=np.uint64)
    instance_windows = (words[..., 0] << np.uint64(32)) | words[..., 1]
    windows = np.empty((n, WINDOWS), np.uint64)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    codes = np.empty((n, 8), np.uint64)
    data = np.random.default_rng(seed + 1)
    is_copy = data.random(n) < copies
    is_copy[0] = False
    is_crop = ~is_copy & (data.random(n) < crops / (1 - copies)) if crops else np.zeros(n, bool)
    is_crop[0] = False
    crop_bits = np.repeat(list(CROP_BITS), list(CROP_BITS.values()))
    pairs, crop_pairs, last, last_codes, last_windows = [], [], None, None, None
    step = 20_000
    for s in range(0, n, step):
        m = min(step, n - s)
        which = data.integers(0, len(instances), m)
        z = instances[which]
        block_codes = instance_codes[which] ^ flips(data, (m, 8), HASH_FLIP)
        block_windows = instance_windows[which] ^ flips(data, (m, WINDOWS), HASH_FLIP)
        z += 0.4 * decay * data.standard_normal((m, rank), dtype=np.float32)
        for i in np.flatnonzero(is_copy[s : s + m] | is_crop[s : s + m]):  # in row order
            source_codes = block_codes[i - 1] if i > 0 else last_codes
            source_windows = block_windows[i - 1] if i > 0 else last_windows
            if is_crop[s + i]:
                # a crop of the row before: its pHash near one of that row's windows; its fc7,
                # its other isometries' hashes and its own windows stay its own draw
                window = source_windows[data.integers(WINDOWS)]
                block_codes[i, 0] = window ^ exact_flips(data, int(data.choice(crop_bits)))
                crop_pairs.append((s + i - 1, s + i))
                continue
            z[i] = z[i - 1] if i > 0 else last
            block_codes[i] = source_codes ^ flips(data, (8,), COPY_FLIP)
            block_windows[i] = source_windows ^ flips(data, (WINDOWS,), COPY_FLIP)
            z[i] += 0.04 * decay * data.standard_normal(rank, dtype=np.float32)
            pairs.append((s + i - 1, s + i))
        last, last_codes, last_windows = z[-1].copy(), block_codes[-1].copy(), block_windows[-1]
        x = z @ w
        x += bias
        x += 0.1 * data.standard_normal((m, dim), dtype=np.float32)
        np.maximum(x, 0.0, out=out[s : s + m])
        codes[s : s + m] = block_codes
        windows[s : s + m] = block_windows
    out.flush()
    crop_pairs = np.asarray(crop_pairs, np.int64).reshape(-1, 2)
    return out, codes, windows, np.asarray(pairs, np.int64), crop_pairs


def crop_distance(codes: np.ndarray, windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Per planted crop: bits from its pHash to its source's nearest window hash."""
    if not len(crops):
        return np.zeros(0, np.int64)
    return np.bitwise_count(windows[crops[:, 0]] ^ codes[crops[:, 1], :1]).min(axis=1)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- the stages: the library's where it has them, else a stand-in (named in the report) ---------


def lead_modules():
    """The new pipeline's candidate and verification modules, when the tool's code has them."""
    try:
        from retrieval.duplicates import candidates, signatures, verify
    except ImportError:
        return None
    return candidates, signatures, verify


def candidate_stage(
    array: np.ndarray, codes: np.ndarray, windows: np.ndarray, threshold: float, radius: int
) -> dict:
    """Each signal's pairs (a < b) and seconds, and their union. The library's signals
    (``retrieval.duplicates.candidates``: fc7 neighbours under each image's own background,
    hashes over the isometries, window hashes) where it has them; else today's near pass and
    the stand-in hash search, and no crop-robust signal."""
    from retrieval.collection.vectors import ArrayVectors

    n = len(array)
    lead = lead_modules()
    signals: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    if lead is not None and "seconds" in getattr(lead[0].Candidates, "__dataclass_fields__", {}):
        # the library's own pass, timed step by step (its pairs' distances included)
        candidates = lead[0]
        options = candidates.CandidateOptions()
        found = candidates.candidate_pairs(ArrayVectors(array), codes, windows, np.ones(n, bool))
        for bit, name in candidates.SIGNALS.items():
            mine = (found.source & bit) > 0
            signals[name] = (found.a[mine], found.b[mine], found.seconds[name])
        signals["distances"] = (found.a, found.b, found.seconds["distances"])
        where = (
            f"retrieval.duplicates.candidates.candidate_pairs (k {options.k}, ratio "
            f"{options.ratio}, radius {options.radius}, window bits {options.window_bits}); "
            "distances: each pair's full-vector fc7 distance"
        )
    elif lead is not None:  # a tree whose candidate_pairs does not time its steps
        candidates = lead[0]
        options = candidates.CandidateOptions()
        has = np.ones(n, bool)
        t0 = time.perf_counter()
        neighbours, distances = candidates.fc7_neighbours(
            ArrayVectors(array), options.k, options.near
        )
        background = candidates.backgrounds(distances)
        own = np.repeat(np.arange(n), neighbours.shape[1])
        other, gap = neighbours.ravel(), distances.ravel()
        close = (other >= 0) & (gap <= options.ratio * background[own])
        fa, fb = np.minimum(own[close], other[close]), np.maximum(own[close], other[close])
        signals["fc7"] = (fa, fb, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ha, hb = candidates.hash_pairs(codes, has, options.radius)
        signals["hash"] = (ha, hb, time.perf_counter() - t0)
        t0 = time.perf_counter()
        wa, wb = candidates.window_pairs(codes, windows, has, options.k, options.window_bits)
        signals["window"] = (wa, wb, time.perf_counter() - t0)
        where = (
            f"retrieval.duplicates.candidates (k {options.k}, ratio {options.ratio}, radius "
            f"{options.radius}, window bits {options.window_bits})"
        )
    else:
        from retrieval.collection.near import NearOptions, near_pairs

        t0 = time.perf_counter()
        pairs = near_pairs(ArrayVectors(array), threshold, NearOptions(method="ivf"))
        signals["fc7"] = (pairs.a, pairs.b, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ha, hb = stand_in_hash_pairs(codes, radius)
        signals["hash"] = (ha, hb, time.perf_counter() - t0)
        where = (
            "fc7: retrieval.collection.near (ivf), today's near pass; hash: stand-in faiss "
            "IndexBinaryIVF (k 8 per isometry, nprobe 16); no crop-robust signal"
        )
    keys = np.unique(np.concatenate([a * n + b for a, b, _ in signals.values()]))
    return {"signals": signals, "union": keys, "where": where}


def stand_in_hash_pairs(
    codes: np.ndarray, radius: int, k: int = 8, nprobe: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b) whose hashes are within ``radius`` bits under one of the 8 isometries:
    faiss IndexBinaryIVF of the images' own codes, the k nearest of each isometry's code."""
    import faiss

    n = len(codes)
    base = np.ascontiguousarray(codes[:, 0]).view(np.uint8).reshape(n, 8)
    nlist = max(1, int(4 * np.sqrt(n)))
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(BITS), BITS, nlist)
    sample = np.random.default_rng(0).choice(n, min(n, 50 * nlist), replace=False)
    index.train(base[np.sort(sample)])
    index.add(base)
    index.nprobe = nprobe
    a_all, b_all = [], []
    for t in range(8):
        queries = np.ascontiguousarray(codes[:, t]).view(np.uint8).reshape(n, 8)
        d, j = index.search(queries, k)
        i = np.repeat(np.arange(n), k)
        keep = (d.ravel() <= radius) & (j.ravel() >= 0) & (j.ravel() != i)
        a_all.append(i[keep])
        b_all.append(j.ravel()[keep])
    a, b = np.concatenate(a_all), np.concatenate(b_all)
    key = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return key // n, key % n


def verifier() -> tuple[Callable[[str, str], bool], str]:
    """(verify(path_a, path_b) -> a copy?, which code it is). The library's verify_pair with
    each file's signature made first (in the pipeline the first duplicates pass makes them once
    per file and keeps them by content, so that cost is timed apart by ``signature_seconds``)."""
    lead = lead_modules()
    if lead is None:
        return stand_in_verify, "stand-in: ORB 500 + RANSAC similarity + NCC >= 0.6 (OpenCV)"
    _, signatures, verify = lead
    cache = verify.ImageCache()
    memo: dict[str, object] = {}

    def run(path_a: str, path_b: str) -> bool:
        sig_a, sig_b = memo[path_a], memo[path_b]
        return bool(verify.verify_pair((path_a, sig_a), (path_b, sig_b), cache).copy)

    try:
        from retrieval.images.signing import signature_of_file
    except ImportError:  # a tree from before signing moved below the build (--pythonpath)
        signature_of_file = signatures.signature_of_file

    def prepare(paths: list[str]) -> float:
        started = time.perf_counter()
        for p in paths:
            memo[p] = signature_of_file(p)
        return time.perf_counter() - started

    run.prepare = prepare  # type: ignore[attr-defined]
    return run, "retrieval.duplicates.verify.verify_pair (signatures made beforehand)"


def stand_in_verify(path_a: str, path_b: str) -> bool:
    """The issue's sketch: ORB keypoints, ratio-tested matches, a RANSAC similarity fit (the
    mirror of b tried too), and the normalised cross-correlation of the aligned overlap."""
    import cv2

    a = cv2.imread(path_a, cv2.IMREAD_GRAYSCALE)
    b = cv2.imread(path_b, cv2.IMREAD_GRAYSCALE)
    orb = cv2.ORB_create(500)
    ka, da = orb.detectAndCompute(a, None)
    if da is None:
        return False
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    for candidate in (b, cv2.flip(b, 1)):
        kb, db = orb.detectAndCompute(candidate, None)
        if db is None or len(db) < 2:
            continue
        good = [
            m
            for m, m2 in (p for p in matcher.knnMatch(da, db, k=2) if len(p) == 2)
            if m.distance < 0.8 * m2.distance
        ]
        if len(good) < 8:
            continue
        src = np.float32([ka[m.queryIdx].pt for m in good])
        dst = np.float32([kb[m.trainIdx].pt for m in good])
        fit, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC)
        if fit is None or inliers.sum() < 8:
            continue
        warped = cv2.warpAffine(a, fit, (candidate.shape[1], candidate.shape[0]))
        mask = cv2.warpAffine(np.ones_like(a), fit, (candidate.shape[1], candidate.shape[0])) > 0
        if mask.sum() < 0.1 * mask.size:
            continue
        x, y = warped[mask].astype(np.float32), candidate[mask].astype(np.float32)
        x, y = x - x.mean(), y - y.mean()
        ncc = float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-9))
        if ncc >= 0.6:
            return True
    return False


# -- verification on real images ----------------------------------------------------------------


def verification_pairs(images: Path, n: int, work: Path, seed: int = 0) -> list[tuple]:
    """``n`` real candidate pairs: (original, edited copy) and (original, its nearest other
    image by pHash over 8 isometries), half each; (path_a, path_b, is_copy, kind)."""
    from duplicates import KINDS
    from PIL import Image

    paths = val_images(images)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), min(len(paths), max(n // 2, 1) + 400), replace=False)
    pool = [paths[i] for i in chosen[: max(n // 2, 1)]]
    others = [paths[i] for i in chosen[max(n // 2, 1) :]]
    pool_codes = np.stack([hash_isometries(Image.open(p).convert("RGB"), "phash") for p in pool])
    other_codes = np.stack([hash_isometries(Image.open(p).convert("RGB"), "phash") for p in others])
    nearest = hamming(pool_codes, other_codes, isometries=True).argmin(axis=1)
    out = []
    work.mkdir(parents=True, exist_ok=True)
    for n_, (p, j) in enumerate(zip(pool, nearest)):
        kind = KINDS[n_ % len(KINDS)]
        edited, _, quality = edit_image(Image.open(p).convert("RGB"), kind, rng)
        target = work / f"{p.stem}-{kind}.jpg"
        edited.save(target, quality=quality)
        out.append((str(p), str(target), True, kind))
        out.append((str(p), str(others[j]), False, "nearest other"))
    return out[:n]


def time_verification(pairs: list[tuple], verify: Callable, threads: int = 1) -> dict:
    """Milliseconds a pair, copies and other pairs apart (most candidates at scale are not
    copies, and a verifier spends differently on the two), and what it accepted. With
    ``threads`` > 1 the pairs go through a pool of that many threads, as the tool verifies
    (decoding, ORB and matching release the GIL): wall time over pairs, a throughput."""
    from concurrent.futures import ThreadPoolExecutor

    prepare = getattr(verify, "prepare", None)
    files = sorted({p for a, b, _, _ in pairs for p in (a, b)})
    signature_s = prepare(files) if prepare else 0.0
    per_pair = {True: 0.0, False: 0.0}  # seconds of wall time a pair, copies and others
    verdicts: list[bool] = [False] * len(pairs)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for is_copy in (True, False):
            chosen = [i for i, p in enumerate(pairs) if p[2] == is_copy]
            t0 = time.perf_counter()
            found = list(pool.map(lambda i: bool(verify(pairs[i][0], pairs[i][1])), chosen))
            per_pair[is_copy] = (time.perf_counter() - t0) / max(1, len(chosen))
            for i, verdict in zip(chosen, found):
                verdicts[i] = verdict
    by_kind: dict[str, list[bool]] = {}
    for v, p in zip(verdicts, pairs):
        if p[2]:
            by_kind.setdefault(p[3], []).append(v)
    return {
        "pairs": len(pairs),
        "ms_copy": 1000 * per_pair[True],
        "ms_other": 1000 * per_pair[False],
        "ms_signature": 1000 * signature_s / max(1, len(files)),
        "copies_accepted": float(np.mean([v for v, p in zip(verdicts, pairs) if p[2]])),
        "others_accepted": float(np.mean([v for v, p in zip(verdicts, pairs) if not p[2]])),
        "by_kind": {k: float(np.mean(v)) for k, v in by_kind.items()},
    }


def screen_stage(real: Path) -> dict | None:
    """The screen (``retrieval.duplicates.screen``) timed on real candidate pairs: those the
    library proposes on bench/duplicates.py's collection (its work folder: collection.json and
    index-untrained, signatures already kept), each pair labelled copy or not from the
    collection's truth. None when the tool has no screen or the folder is missing."""
    try:
        from retrieval.duplicates import screen
        from retrieval.duplicates.groups import _signature_arrays
    except ImportError:
        return None
    if not (real / "collection.json").exists() or not (real / "index-untrained").exists():
        return None
    from retrieval import Index
    from retrieval.collection.vectors import IndexVectors
    from retrieval.duplicates.candidates import candidate_pairs
    from retrieval.duplicates.memory import DuplicatesMemory
    from retrieval.duplicates.signatures import signatures_for

    items = {i["path"]: i for i in json.loads((real / "collection.json").read_text())["items"]}
    with Index.open(real / "index-untrained") as index:
        rows = index.rows(limit=None)
        memory = DuplicatesMemory(index.directory)
        try:
            signatures = signatures_for(rows, memory)
        finally:
            memory.close()
        hashes, windows, thumbs, has = _signature_arrays(rows, signatures)
        found = candidate_pairs(IndexVectors(index, rows), hashes, windows, has)
    started = time.perf_counter()
    kept = screen.screen_pairs(found.a, found.b, found.ratio, thumbs, hashes, windows, has)
    seconds = time.perf_counter() - started

    # each row's picture: a source's original and copies share its number; a second shot, or a
    # file the collection does not list, is a picture of its own
    picture = np.arange(len(rows)) + len(items)
    for row, r in enumerate(rows):
        item = items.get(r.path)
        if item and item["role"] != "second":
            picture[row] = item["source"]
    copy = picture[found.a] == picture[found.b]
    signed = np.flatnonzero(has)
    return {
        "images": len(rows),
        "pairs": len(found),
        "us_per_pair": 1e6 * seconds / max(1, len(found)),
        "copies": int(copy.sum()),
        "copies_kept": float(kept[copy].mean()) if copy.any() else 0.0,
        "others_kept": float(kept[~copy].mean()) if (~copy).any() else 0.0,
        "window_density": window_density(hashes[signed], windows[signed], picture[signed]),
    }


# -- the run -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--n", type=int, default=100_000)
    add("--steps", default="25000,50000", help="smaller N to fit the growth")
    add("--dim", type=int, default=4096)
    add("--copies", type=float, default=0.01)
    add("--crops", type=float, default=0.002, help="share of rows that are crops of the row before")
    add("--radius", type=int, default=10, help="stand-in hash candidates: bits, 8 isometries")
    add("--verify-pairs", type=int, default=200)
    add("--images", type=Path, default=Path("/work/shared/datasets/imagenette2-224/val"))
    add("--workdir", type=Path, default=None)
    add(
        "--real",
        type=Path,
        default=None,
        help="bench/duplicates.py's work folder: the screen is timed on its real candidate pairs",
    )
    add("--pythonpath", default=None, help="the tool's code, first on sys.path")
    add(
        "--threads",
        type=int,
        default=1,
        help="threads for faiss, torch (the screen) and verification (1 on a shared machine)",
    )
    add("--out", type=Path, default=None)
    add("--json", type=Path, default=None)
    args = parser.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    if hasattr(os, "sched_setaffinity") and args.threads < len(os.sched_getaffinity(0)):
        # the tool sizes its thread pools by the cores it may use (retrieval.devices)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dupscale-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ["# The duplicates pass at scale (bench/duplicates_scale.py)", "", *machine()]
    commit = os.popen(f"git -C {args.pythonpath or ROOT} log -1 --format='%h %s'").read()[:80]
    lines.append(
        f"- threads (faiss, torch, verification): {args.threads}; the tool's code: "
        f"{args.pythonpath or ROOT} "
        f"({commit.strip()}{', with uncommitted changes' if dirty(args.pythonpath) else ''})"
    )

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    print("\n".join(lines), flush=True)
    started = time.perf_counter()
    array, codes, windows, truth, crops = synthetic(
        work / "fc7.npy", args.n, args.dim, args.copies, args.crops
    )
    made = time.perf_counter() - started
    gaps = np.linalg.norm(array[truth[:2000, 0]] - array[truth[:2000, 1]], axis=1)
    threshold = float(np.percentile(gaps, 99))
    copy_bits = np.bitwise_count(codes[truth[:2000, 0], 0] ^ codes[truth[:2000, 1], 0])
    rand = np.random.default_rng(2).choice(args.n, 2000, replace=False)
    rand_bits = np.bitwise_count(codes[rand[:1000], 0] ^ codes[rand[1000:], 0])
    say(
        f"- {args.n:,} synthetic images: fc7-like {args.dim}-d float32 (memory-mapped, "
        f"{args.n * args.dim * 4 / 2**30:.1f} GiB), 64-bit hashes x 8 isometries and x "
        f"{WINDOWS} windows, written in {made:.0f} s; {len(truth):,} planted copies (fc7: the "
        f"copies' 99th-percentile distance {threshold:.3f}; hash bits from a copy to its "
        f"source: median {np.median(copy_bits):.0f}, between random images "
        f"{np.median(rand_bits):.0f}) and {len(crops):,} planted crops (their pHash "
        f"{', '.join(str(bits) for bits in CROP_BITS)} bits from a window of their source, in "
        "bench/duplicates.py's proportions)"
    )
    radii, n0 = (6, 8, 10, 12), min(args.n, 3925)
    synth = synthetic_density(codes[:n0], truth, radii)
    real = real_density(args.images, radii, n0)
    say(
        f"- hash pairs within 6/8/10/12 bits per image at N = {n0:,} (over 8 isometries; planted "
        f"copies left out): synthetic {' / '.join(f'{v:.3f}' for v in synth)}, Imagenette val's "
        f"pHash {' / '.join(f'{v:.3f}' for v in real)}. Pairs within a radius grow like N^2 "
        "if a collection's density stays the same, which is what this bench assumes"
    )
    steps = sorted({int(v) for v in args.steps.split(",") if v} | {args.n})
    measured: dict[int, dict] = {}
    header_done = False
    for n in steps:
        stage = candidate_stage(array[:n], codes[:n], windows[:n], threshold, args.radius)
        union = stage["union"]
        a, b = union // n, union % n
        wanted = truth[truth[:, 1] < n]
        found = float(np.isin(wanted[:, 0] * n + wanted[:, 1], union).mean()) if len(wanted) else 0
        cropped = crops[crops[:, 1] < n]
        window_a, window_b, _ = stage["signals"].get("window", (np.zeros(0, np.int64),) * 2 + (0,))
        by_window = np.isin(cropped[:, 0] * n + cropped[:, 1], window_a * n + window_b)
        crop_near = crop_distance(codes, windows, cropped)
        measured[n] = {
            **{f"{k}": len(v[0]) for k, v in stage["signals"].items()},
            **{f"{k}_s": v[2] for k, v in stage["signals"].items()},
            "union": len(union),
            "copies": len(wanted) + len(cropped),
            "crops_found_by_window": float(by_window.mean()) if len(cropped) else None,
            "crops_found_by_bits": {
                bits: float(by_window[crop_near == bits].mean())
                for bits in np.unique(crop_near).tolist()
            },
            "images_in_pairs": len(np.unique(np.concatenate([a, b]))),
            "planted_found": found,
            "peak_gib": peak_gib(),
        }
        names = list(stage["signals"])
        if not header_done:
            say("")
            say(
                "| N | "
                + " | ".join(f"{k} pairs | {k} s" for k in names)
                + " | union (to verification) | per image | planted copies among them | "
                "planted crops the window signal finds | peak RSS GiB |"
            )
            say("|---:|" + "---:|" * (2 * len(names) + 5))
            header_done = True
        m = measured[n]
        cells = " | ".join(f"{m[k]:,} | {m[k + '_s']:.1f}" for k in names)
        crops_found = m["crops_found_by_window"]
        say(
            f"| {n:,} | {cells} | {m['union']:,} | {m['union'] / n:.2f} | {found:.4f} | "
            f"{'n/a' if crops_found is None else f'{crops_found:.3f}'} | {m['peak_gib']:.1f} |"
        )
    say("")
    if measured[args.n]["crops_found_by_bits"]:
        say(
            f"- planted crops the window signal finds at {args.n:,}, by their bits from the "
            "window: "
            + ", ".join(
                f"{b} bits {v:.2f}" for b, v in measured[args.n]["crops_found_by_bits"].items()
            )
            + ". A crop is found when its source is among the k images whose windows come "
            "nearest its pHash; the more images, the more windows of other images sit as near "
            "by chance"
        )
    say(f"- candidates: {stage['where']}")
    verify, verify_name = verifier()
    pairs = verification_pairs(args.images, args.verify_pairs, work / "verify")
    timing = time_verification(pairs, verify, args.threads)
    say(
        f"- verification ({verify_name}), {args.threads} thread(s), on {timing['pairs']} real "
        "pairs "
        f"(Imagenette val: half an original and its edited copy, half an original and its "
        f"nearest other image by pHash-8), both files decoded per pair: {timing['ms_copy']:.1f} "
        f"ms per copy pair, {timing['ms_other']:.1f} ms per other pair"
        + (
            f", signatures {timing['ms_signature']:.1f} ms per file"
            if timing["ms_signature"]
            else ""
        )
        + f"; accepted {timing['copies_accepted']:.2f} of the copies ("
        + ", ".join(f"{k} {v:.2f}" for k, v in timing["by_kind"].items())
        + f") and {timing['others_accepted']:.2f} of the others"
    )

    screened = screen_stage(args.real) if args.real else None
    if screened:
        say(
            f"- screen (retrieval.duplicates.screen), {args.threads} thread(s), on the "
            f"{screened['pairs']:,} "
            f"real candidate pairs the library proposes on bench/duplicates.py's collection "
            f"({screened['images']:,} files, untrained fc7): {screened['us_per_pair']:.0f} us a "
            f"pair; it passed {screened['copies_kept']:.3f} of the {screened['copies']:,} copy "
            f"pairs and {screened['others_kept']:.4f} of the others to verification"
        )
        picture = np.arange(args.n)  # each row its own picture, but copies and crops their source's
        for a, b in sorted(np.concatenate([truth, crops]).tolist(), key=lambda pair: pair[1]):
            picture[b] = picture[a]
        n0 = screened["images"]
        synth = window_density(codes[:n0], windows[:n0], picture[:n0])
        say(
            f"- other pictures with a window within {'/'.join(map(str, WINDOW_RADII))} bits of "
            f"an image's pHash, per image at N = {n0:,}: synthetic "
            f"{' / '.join(f'{v:.2f}' for v in synth)}, bench/duplicates.py's real collection "
            f"{' / '.join(f'{v:.2f}' for v in screened['window_density'])}. Real pHashes crowd "
            "more windows near an image than uniform codes do, so at scale the real share of "
            "crops found is lower than the synthetic one above"
        )
    else:
        say(
            "- screen: not measured (no --real folder, or the tool has no screen): every pair "
            "is verified"
        )

    def grow(key: str) -> float:
        ns = [n for n in steps if measured[n].get(key)]
        if len(ns) < 2:
            return 1.0
        values = [measured[n][key] for n in ns]
        return max(1.0, float(np.polyfit(np.log(ns), np.log(values), 1)[0]))

    last, scale = measured[args.n], 1_000_000 / args.n
    say("")
    say("| stage | at N | growth (fitted power of N, at least 1) | projected at 1,000,000 |")
    say("|---|---:|---:|---:|")
    total = 0.0
    for name in names:
        power = grow(f"{name}_s")
        projected = last[f"{name}_s"] * scale**power
        total += projected
        label = "candidates' fc7 distances" if name == "distances" else f"{name} candidates"
        say(f"| {label}, s | {last[name + '_s']:.1f} | {power:.2f} | {projected:.0f} |")
    power = grow("union")
    pairs_1m = last["union"] * scale**power
    copies_1m = last["copies"] * scale
    others_kept = screened["others_kept"] if screened else 1.0
    screen_us = screened["us_per_pair"] if screened else 0.0

    def verifying(pairs: float, copies: float) -> tuple[float, float]:
        """(pairs that reach verification, seconds verifying them) of ``pairs`` candidates."""
        others = (pairs - copies) * others_kept
        return copies + others, (copies * timing["ms_copy"] + others * timing["ms_other"]) / 1000

    reach_n, verify_n = verifying(last["union"], last["copies"])
    reach_1m, verify_1m = verifying(pairs_1m, copies_1m)
    total += verify_1m + pairs_1m * screen_us / 1e6
    say(f"| candidate pairs | {last['union']:,} | {power:.2f} | {pairs_1m:,.0f} |")
    say(
        f"| screen, s ({args.threads} thread(s)) | {last['union'] * screen_us / 1e6:.0f} | | "
        f"{pairs_1m * screen_us / 1e6:.0f} |"
    )
    say(f"| pairs to verification | {reach_n:,.0f} | | {reach_1m:,.0f} |")
    say(f"| verification, s ({args.threads} thread(s)) | {verify_n:.0f} | | {verify_1m:.0f} |")
    say(f"| **whole pass, s** | | | **{total:.0f}** ({total / 60:.1f} min; goal < 10 min) |")
    say("")
    say(
        f"- peak RSS {peak_gib():.1f} GiB at {args.n:,} (counts the memory-mapped fc7 pages "
        f"read). At 1,000,000: the reduced fc7 copy + IVF {2 * 128 * 4 * 1e6 / 2**30:.1f} GiB, "
        f"hashes {(8 + WINDOWS) * 8 * 1e6 / 2**20:.0f} MiB, candidate pairs "
        f"{pairs_1m * 16 / 2**20:.0f} MiB; the 4096-d vectors stay on disk"
    )
    say(
        f"- not in the total: signatures (hashes, windows, thumbnails), "
        f"{timing['ms_signature']:.1f} ms a file (decoded from disk), made once per file by "
        f"`retrieve index` (or else the first duplicates pass) and kept by content "
        f"({timing['ms_signature'] * 1e6 / 1000 / 3600:.1f} hours on one core at 1,000,000 "
        "files, once)"
    )
    say(
        f"- whole benchmark {time.perf_counter() - started:.0f} s; load average at end: "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    results = {
        "n": args.n,
        "measured": measured,
        "candidates": stage["where"],
        "verification": {"code": verify_name, **timing},
        "screen": screened,
        "projected_1m_seconds": total,
    }
    (args.json or work / "results.json").write_text(json.dumps(results, indent=1))
    del array
    (work / "fc7.npy").unlink(missing_ok=True)


def dirty(path: str | None) -> bool:
    out = os.popen(f"git -C {path or ROOT} status --porcelain --untracked-files=normal retrieval")
    return bool(out.read().strip())


if __name__ == "__main__":
    main()
