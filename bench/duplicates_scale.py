"""The whole duplicates pass at scale: candidates from several signals, then verification.

    python bench/duplicates_scale.py [--n 100000] [--steps 25000,50000] [--verify-pairs 200] \
        [--pythonpath /work/lead] [--out FILE.md] [--json FILE.json]

Issue 21's pipeline has two stages, measured apart and added up:

1. **Candidates**, at ``--steps`` and ``--n`` images, on synthetic data: fc7-like vectors (a
   low-rank latent around classes and instances, ReLU'd; memory-mapped) and, from the same
   latent, 64-bit "perceptual hashes" of each image under its 8 flips/rotations (signs of random
   projections plus per-image noise: a copy lands a few bits from its source, images of one
   instance ~10-20 bits apart, unrelated ones ~32). ``--copies`` of the rows are edited copies of
   the row before. Signals: fc7 neighbours under the copies' 99th-percentile distance, and
   Hamming neighbours within ``--radius`` bits over the 8 isometries; their union is what reaches
   verification, some of it decided cheaply (hash and fc7 both close), the rest by geometry.
2. **Verification**, timed per pair on real images (Imagenette val: an original against an
   edited copy made by bench/duplicates.py's own edits, and against its nearest other image by
   pHash over 8 isometries, half each), then multiplied by the pairs that reach it at each N.

Each stage calls the library's own code when ``--pythonpath`` (or the bench's tree) has it and
says which it ran; where the library has no such stage yet, a stand-in written here runs and is
named as such in the report: ``fc7_candidates`` (today: ``retrieval.collection.near`` ivf),
``hash_candidates`` (stand-in: faiss ``IndexBinaryIVF``, k nearest of each isometry's code),
``crop_candidates`` (none yet), ``verify_pair`` (stand-in: ORB + RANSAC similarity + NCC of
the aligned overlap, mirrored tried too, OpenCV). Times grow by the fitted power of N from the
steps and are projected to 1,000,000; peak memory is the process's max RSS after each stage.
"""

from __future__ import annotations

import argparse
import importlib
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


# -- synthetic collection ------------------------------------------------------------------------


def synthetic(path: Path, n: int, dim: int, copies: float, seed: int = 0):
    """(memory-mapped n x dim fc7-like vectors, (n, 8) uint64 hash codes, true copy pairs)."""
    rank, classes, per_class = 256, 1000, 20
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
    bias = (0.25 * rng.standard_normal(dim)).astype(np.float32)
    decay = (1 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
    centres = 0.65 * decay * rng.standard_normal((classes, rank), dtype=np.float32)
    instances = np.repeat(centres, per_class, axis=0)
    instances += 0.8 * decay * rng.standard_normal(instances.shape, dtype=np.float32)
    # 8 isometries x 64 bits of projections of the latent (a hash sees the latent's coarse shape)
    planes = rng.standard_normal((8, rank, BITS)).astype(np.float32) * decay[None, :, None]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    codes = np.empty((n, 8), np.uint64)
    data = np.random.default_rng(seed + 1)
    is_copy = data.random(n) < copies
    is_copy[0] = False
    pairs, last = [], None
    step = 20_000
    for s in range(0, n, step):
        m = min(step, n - s)
        z = instances[data.integers(0, len(instances), m)]
        z += 0.4 * decay * data.standard_normal((m, rank), dtype=np.float32)
        for i in np.flatnonzero(is_copy[s : s + m]):
            z[i] = z[i - 1] if i > 0 else last
            z[i] += 0.04 * decay * data.standard_normal(rank, dtype=np.float32)
            pairs.append((s + i - 1, s + i))
        last = z[-1].copy()
        x = z @ w
        x += bias
        x += 0.1 * data.standard_normal((m, dim), dtype=np.float32)
        np.maximum(x, 0.0, out=out[s : s + m])
        projected = np.einsum("mr,trb->mtb", z, planes)
        projected += 0.08 * data.standard_normal(projected.shape, dtype=np.float32)
        bits = np.packbits(projected > 0, axis=2)  # (m, 8, 8) bytes
        codes[s : s + m] = bits.view(">u8")[..., 0].astype(np.uint64)
    out.flush()
    return out, codes, np.asarray(pairs, np.int64)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- the stages: the library's where it has them, else a stand-in (named in the report) ---------


def _library(module: str, name: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def fc7_candidates(array: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, str]:
    """Pairs (a < b) of fc7 neighbours under ``threshold``. Call site for the new pipeline's
    fc7 candidate source (loose threshold, SSCD-style normalisation) once it exists."""
    lead = _library("retrieval.collection.candidates", "fc7_candidates")
    if lead is not None:  # the lead's API: adapt here when its signature is known
        pairs = lead(array, threshold)
        return np.asarray(pairs.a), np.asarray(pairs.b), "retrieval.collection.candidates"
    from retrieval.collection.near import NearOptions, near_pairs
    from retrieval.collection.vectors import ArrayVectors

    pairs = near_pairs(ArrayVectors(array), threshold, NearOptions(method="ivf"))
    return pairs.a, pairs.b, "retrieval.collection.near (ivf), today's near pass"


def hash_candidates(
    codes: np.ndarray, radius: int, k: int = 8, nprobe: int = 16
) -> tuple[np.ndarray, np.ndarray, str]:
    """Pairs (a < b) whose hashes are within ``radius`` bits under one of the 8 isometries.
    Stand-in: faiss IndexBinaryIVF of the images' own codes, the k nearest of each of the
    8 isometry codes (N x 8 queries), kept within ``radius``."""
    lead = _library("retrieval.collection.candidates", "hash_candidates")
    if lead is not None:
        pairs = lead(codes, radius)
        return np.asarray(pairs.a), np.asarray(pairs.b), "retrieval.collection.candidates"
    import faiss

    n = len(codes)
    base = np.ascontiguousarray(codes[:, 0]).astype(">u8").view(np.uint8).reshape(n, 8)
    nlist = max(1, int(4 * np.sqrt(n)))
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(BITS), BITS, nlist)
    sample = np.random.default_rng(0).choice(n, min(n, 50 * nlist), replace=False)
    index.train(base[np.sort(sample)])
    index.add(base)
    index.nprobe = nprobe
    a_all, b_all = [], []
    for t in range(8):
        queries = np.ascontiguousarray(codes[:, t]).astype(">u8").view(np.uint8).reshape(n, 8)
        d, j = index.search(queries, k)
        i = np.repeat(np.arange(n), k)
        keep = (d.ravel() <= radius) & (j.ravel() >= 0) & (j.ravel() != i)
        a_all.append(i[keep])
        b_all.append(j.ravel()[keep])
    a, b = np.concatenate(a_all), np.concatenate(b_all)
    key = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return (
        key // n,
        key % n,
        f"stand-in: faiss IndexBinaryIVF ({nlist} lists, nprobe {nprobe}, k {k})",
    )


def crop_candidates(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Call site for the crop-robust source (R-MAC regions or a crop-resistant hash); None
    while the library has none (the report says it was not measured)."""
    lead = _library("retrieval.collection.candidates", "crop_candidates")
    if lead is None:
        return None
    pairs = lead(array)
    return np.asarray(pairs.a), np.asarray(pairs.b), "retrieval.collection.candidates"


def verifier() -> tuple[Callable, str]:
    """(verify(path_a, path_b) -> accepted, which code it is)."""
    lead = _library("retrieval.collection.verify", "verify_pair")
    if lead is not None:
        return lead, "retrieval.collection.verify.verify_pair"
    return stand_in_verify, "stand-in: ORB 500 + RANSAC similarity + NCC >= 0.6 (OpenCV)"


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


def time_verification(pairs: list[tuple], verify: Callable) -> dict:
    started = time.perf_counter()
    verdicts = [bool(verify(a, b)) for a, b, _, _ in pairs]
    seconds = time.perf_counter() - started
    copies = [v for v, p in zip(verdicts, pairs) if p[2]]
    others = [v for v, p in zip(verdicts, pairs) if not p[2]]
    by_kind: dict[str, list[bool]] = {}
    for v, p in zip(verdicts, pairs):
        if p[2]:
            by_kind.setdefault(p[3], []).append(v)
    return {
        "pairs": len(pairs),
        "ms_per_pair": 1000 * seconds / max(1, len(pairs)),
        "copies_accepted": float(np.mean(copies)) if copies else None,
        "others_accepted": float(np.mean(others)) if others else None,
        "by_kind": {k: float(np.mean(v)) for k, v in by_kind.items()},
    }


# -- the run -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--n", type=int, default=100_000)
    add("--steps", default="25000,50000", help="smaller N to fit the growth")
    add("--dim", type=int, default=4096)
    add("--copies", type=float, default=0.01)
    add("--radius", type=int, default=10, help="hash candidates: bits, over 8 isometries")
    add("--accept-bits", type=int, default=6, help="cheap tier: hash within this and fc7 close")
    add("--verify-pairs", type=int, default=200)
    add("--images", type=Path, default=Path("/work/shared/datasets/imagenette2-224/val"))
    add("--workdir", type=Path, default=None)
    add("--pythonpath", default=None, help="the tool's code, first on sys.path")
    add("--threads", type=int, default=1, help="faiss/OpenMP threads (1 on a shared machine)")
    add("--out", type=Path, default=None)
    add("--json", type=Path, default=None)
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dupscale-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ["# The duplicates pass at scale (bench/duplicates_scale.py)", "", *machine()]
    lines.append(f"- faiss threads: {args.threads}; the tool's code: {args.pythonpath or ROOT}")

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    print("\n".join(lines), flush=True)
    started = time.perf_counter()
    array, codes, truth = synthetic(work / "fc7.npy", args.n, args.dim, args.copies)
    made = time.perf_counter() - started
    gaps = np.linalg.norm(array[truth[:2000, 0]] - array[truth[:2000, 1]], axis=1)
    threshold = float(np.percentile(gaps, 99))
    copy_bits = np.bitwise_count(codes[truth[:2000, 0], 0] ^ codes[truth[:2000, 1], 0])
    rand = np.random.default_rng(2).choice(args.n, 2000, replace=False)
    rand_bits = np.bitwise_count(codes[rand[:1000], 0] ^ codes[rand[1000:], 0])
    say(
        f"- {args.n:,} synthetic images: fc7-like {args.dim}-d float32 (memory-mapped, "
        f"{args.n * args.dim * 4 / 2**30:.1f} GiB) and 64-bit hashes x 8 isometries, written in "
        f"{made:.0f} s; {len(truth):,} planted copies; fc7 threshold {threshold:.3f} (copies' "
        f"99th percentile); hash bits between a copy and its source: median "
        f"{np.median(copy_bits):.0f}, between random images: median {np.median(rand_bits):.0f}"
    )
    say("")
    say(
        "| N | fc7 candidates | s | hash candidates | s | crop candidates | s | union (reach "
        "verification) | decided cheaply | to geometry | planted copies among them | peak RSS GiB |"
    )
    say("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    steps = sorted({int(v) for v in args.steps.split(",") if v} | {args.n})
    measured, sources = {}, {}
    planted = truth[:, 0] * args.n + truth[:, 1]
    for n in steps:
        t0 = time.perf_counter()
        fa, fb, sources["fc7"] = fc7_candidates(array[:n], threshold)
        t_fc7 = time.perf_counter() - t0
        t0 = time.perf_counter()
        ha, hb, sources["hash"] = hash_candidates(codes[:n], args.radius)
        t_hash = time.perf_counter() - t0
        t0 = time.perf_counter()
        crop = crop_candidates(array[:n])
        t_crop = time.perf_counter() - t0
        sources["crop"] = crop[2] if crop else "none in the library yet: not measured"
        keys = [fa * args.n + fb, ha * args.n + hb] + ([crop[0] * args.n + crop[1]] if crop else [])
        union = np.unique(np.concatenate(keys))
        a, b = union // args.n, union % args.n
        bits = np.bitwise_count(codes[a, None, :] ^ codes[b, 0, None]).min(axis=1)
        fc7_close = np.isin(union, fa * args.n + fb)
        cheap = int(((bits <= args.accept_bits) & fc7_close).sum())
        wanted = planted[truth[:, 1] < n]
        found = float(np.isin(wanted, union).mean()) if len(wanted) else 0.0
        measured[n] = {
            "fc7": len(fa),
            "fc7_s": t_fc7,
            "hash": len(ha),
            "hash_s": t_hash,
            "crop": len(crop[0]) if crop else None,
            "crop_s": t_crop if crop else None,
            "union": len(union),
            "cheap": cheap,
            "geometry": len(union) - cheap,
            "images_in_pairs": len(np.unique(np.concatenate([a, b]))),
            "planted_found": found,
            "peak_gib": peak_gib(),
        }
        m = measured[n]
        crop_cells = f"{m['crop']:,} | {m['crop_s']:.1f}" if crop else "- | -"
        say(
            f"| {n:,} | {m['fc7']:,} | {t_fc7:.1f} | {m['hash']:,} | {t_hash:.1f} | {crop_cells} "
            f"| {m['union']:,} | {cheap:,} | {m['geometry']:,} | {found:.4f} | "
            f"{m['peak_gib']:.1f} |"
        )
    say("")
    for stage, where in sources.items():
        say(f"- {stage} candidates: {where}")
    verify, verify_name = verifier()
    pairs = verification_pairs(args.images, args.verify_pairs, work / "verify")
    timing = time_verification(pairs, verify)
    say(
        f"- verification ({verify_name}): {timing['ms_per_pair']:.1f} ms per pair, one process, "
        f"decoding both files included, on {timing['pairs']} real pairs (Imagenette val, half "
        f"edited copies, half each original's nearest other image by pHash-8); accepted "
        f"{timing['copies_accepted']:.2f} of the copies and {timing['others_accepted']:.2f} of "
        f"the others (" + ", ".join(f"{k} {v:.2f}" for k, v in timing["by_kind"].items()) + ")"
    )

    def grow(key: str) -> float:
        ns = [n for n in steps if measured[n][key]]
        if len(ns) < 2:
            return 1.0
        values = [measured[n][key] for n in ns]
        return max(1.0, float(np.polyfit(np.log(ns), np.log(values), 1)[0]))

    last = measured[args.n]
    say("")
    say("| stage | at N | growth (fitted power of N, at least 1) | projected at 1,000,000 |")
    say("|---|---:|---:|---:|")
    total = 0.0
    for key, name in (("fc7_s", "fc7 candidates, s"), ("hash_s", "hash candidates, s")) + (
        (("crop_s", "crop candidates, s"),) if last["crop"] is not None else ()
    ):
        power = grow(key)
        projected = last[key] * (1_000_000 / args.n) ** power
        total += projected
        say(f"| {name} | {last[key]:.1f} | {power:.2f} | {projected:.0f} |")
    power = grow("geometry")
    pairs_1m = last["geometry"] * (1_000_000 / args.n) ** power
    verify_1m = pairs_1m * timing["ms_per_pair"] / 1000
    total += verify_1m
    say(f"| pairs to geometry | {last['geometry']:,} | {power:.2f} | {pairs_1m:,.0f} |")
    say(
        f"| verification, s ({timing['ms_per_pair']:.1f} ms x pairs) | "
        f"{last['geometry'] * timing['ms_per_pair'] / 1000:.1f} | | {verify_1m:.0f} |"
    )
    say(f"| **whole pass, s** | | | **{total:.0f}** ({total / 60:.1f} min; goal < 10 min) |")
    say("")
    say(
        f"- peak RSS {peak_gib():.1f} GiB (includes the memory-mapped fc7 pages read); at "
        f"1,000,000 the reduced fc7 copy + IVF hold {2 * 128 * 4 * 1e6 / 2**30:.1f} GiB, the "
        f"hashes {8 * 8 * 1e6 / 2**20:.0f} MiB, the candidate pairs "
        f"{last['union'] * (1_000_000 / args.n) * 16 / 2**20:.0f} MiB"
    )
    say(f"- load average at end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    results = {
        "n": args.n,
        "measured": measured,
        "sources": sources,
        "verification": {"code": verify_name, **timing},
        "projected_1m_seconds": total,
    }
    (args.json or work / "results.json").write_text(json.dumps(results, indent=1))
    del array
    (work / "fc7.npy").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
