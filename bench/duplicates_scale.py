"""How the near-duplicate pass scales: exact vs PCA copy vs IVF on synthetic fc7-like vectors.

    python bench/duplicates_scale.py [--n 200000] [--dim 4096] [--copies 0.01] [--out FILE.md]

Vectors are bench/search.py's fc7-like model (ReLU of a low-rank latent around classes and
instances) written block by block to a memory-mapped file, so RAM holds the reduced copy only;
``--copies`` of them are followed by an edited copy (same latent, a small latent nudge, fresh
unit noise). The threshold is the 99th percentile of those copies' distances. Passes, all
through ``retrieval.collection.near`` (the code ``retrieve duplicates`` runs):

- ``exact``: full 4096-d vectors block against block; O(N^2 D), so it runs on a ``--exact-n``
  prefix and is projected quadratically;
- ``pca``: PCA-128 copy, flat range search, every candidate checked with the full vectors;
  finds exactly the exact pairs (a projection never lengthens a distance; checked on the
  prefix), at the cost of every candidate the looser reduced distance lets through;
- ``ivf``: the same copy in IndexIVFFlat (4 sqrt(N) lists, nprobe 16), each vector's 16
  nearest there checked with the full vectors; runs at several N to fit its growth, projected
  to 1M and 10M; scored against the exact pairs on the prefix, and by the planted copies it
  finds at every N.
Peak memory is the process's max RSS after each pass (ru_maxrss), beside the reduced copy's size.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search import machine

from retrieval.collection.near import NearOptions, near_pairs
from retrieval.collection.vectors import ArrayVectors


def fc7_like_with_copies(path: Path, n: int, dim: int, copies: float, seed: int = 0):
    """Memory-mapped n x dim fc7-like vectors; returns (array, true copy pairs)."""
    rank, classes, per_class = 256, 1000, 20
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
    bias = (0.25 * rng.standard_normal(dim)).astype(np.float32)
    decay = (1 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
    centres = 0.65 * decay * rng.standard_normal((classes, rank), dtype=np.float32)
    instances = np.repeat(centres, per_class, axis=0)
    instances += 0.8 * decay * rng.standard_normal(instances.shape, dtype=np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    data = np.random.default_rng(seed + 1)
    is_copy = data.random(n) < copies
    is_copy[0] = False
    pairs = []
    step = 20_000
    last_z = None
    for s in range(0, n, step):
        m = min(step, n - s)
        z = instances[data.integers(0, len(instances), m)]
        z += 0.4 * decay * data.standard_normal((m, rank), dtype=np.float32)
        for i in np.flatnonzero(is_copy[s : s + m]):
            source = i - 1 if i > 0 else None
            if source is None:  # first row of a block: copy the previous block's last row
                z[i] = last_z
            else:
                z[i] = z[source]
            z[i] += 0.04 * decay * data.standard_normal(rank, dtype=np.float32)
            pairs.append((s + i - 1, s + i))
        last_z = z[-1].copy()
        x = z @ w
        x += bias
        x += 0.1 * data.standard_normal((m, dim), dtype=np.float32)
        np.maximum(x, 0.0, out=out[s : s + m])
    out.flush()
    return out, np.asarray(pairs, np.int64)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(source, threshold, method, **kw):
    started = time.perf_counter()
    pairs = near_pairs(source, threshold, NearOptions(method=method, **kw))
    return pairs, time.perf_counter() - started


def as_set(p) -> set:
    return set(zip(p.a.tolist(), p.b.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--copies", type=float, default=0.01)
    parser.add_argument("--exact-n", type=int, default=20_000)
    parser.add_argument("--steps", default="50000,100000")
    parser.add_argument("--reuse", action="store_true", help="keep WORKDIR/fc7.npy if there")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="faiss/OpenMP threads: on a shared 2-core machine 2 threads spin-wait (a PCA "
        "that takes 1.4 s with one thread took 17 s with two at load 18)",
    )
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    lines = ["# Near-duplicate pass at scale (bench/duplicates_scale.py)", "", *machine()]
    lines.append(f"- faiss threads: {args.threads}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dupscale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.reuse and (work / "fc7.npy").exists() and (work / "truth.npy").exists():
        array, truth = np.load(work / "fc7.npy", mmap_mode="r"), np.load(work / "truth.npy")
    else:
        array, truth = fc7_like_with_copies(work / "fc7.npy", args.n, args.dim, args.copies)
        np.save(work / "truth.npy", truth)
    made = time.perf_counter() - started
    gaps = np.linalg.norm(array[truth[:2000, 0]] - array[truth[:2000, 1]], axis=1)
    threshold = float(np.percentile(gaps, 99))
    sample = np.random.default_rng(2).choice(args.n, 2000, replace=False)
    nn = np.linalg.norm(array[sample[:1000]] - array[sample[1000:]], axis=1)
    lines += [
        f"- {args.n:,} x {args.dim} float32 fc7-like vectors ({args.n * args.dim * 4 / 2**30:.1f} "
        f"GiB, memory-mapped, written in {made:.0f} s), {len(truth):,} edited copies",
        f"- threshold {threshold:.3f} (99th percentile of copy distances; median distance "
        f"between random vectors {np.median(nn):.2f})",
        "",
        "| pass | N | seconds | pairs | candidates checked | recall of exact pairs | peak RSS "
        "GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def row(name, n, seconds, pairs, recall):
        text = (
            f"| {name} | {n:,} | {seconds:.1f} | {len(pairs):,} | {pairs.candidates:,} | "
            f"{recall} | {peak_gib():.1f} |"
        )
        lines.append(text)
        print(text, flush=True)

    planted = set(map(tuple, truth.tolist()))

    def found_planted(pairs, n):
        wanted = {p for p in planted if p[1] < n}
        return len(as_set(pairs) & wanted) / max(1, len(wanted))

    prefix = ArrayVectors(array[: args.exact_n])
    exact, t_exact = run(prefix, threshold, "exact")
    row("exact (full 4096-d, blocks)", args.exact_n, t_exact, exact, "1 (reference)")
    exact_planted = found_planted(exact, args.exact_n)
    pca_small, t_pca_small = run(prefix, threshold, "pca")
    same = as_set(pca_small) == as_set(exact)
    recall = len(as_set(pca_small) & as_set(exact)) / max(1, len(exact))
    row(
        "pca (PCA-128 range + check)",
        args.exact_n,
        t_pca_small,
        pca_small,
        f"{recall:.4f}" + (" (same pairs)" if same else ""),
    )
    ivf_times, planted_found = {}, {}
    for n in [args.exact_n] + [int(v) for v in args.steps.split(",") if v] + [args.n]:
        ivf, t_ivf = run(ArrayVectors(array[:n]), threshold, "ivf")
        ivf_times[n], planted_found[n] = t_ivf, found_planted(ivf, n)
        recall = ""
        if n == args.exact_n:
            recall = f"{len(as_set(ivf) & as_set(exact)) / max(1, len(exact)):.4f}"
        row("ivf (PCA-128, IVF 4 sqrt(N) lists, nprobe 16, 16-NN + check)", n, t_ivf, ivf, recall)
    ns = sorted(ivf_times)
    slope = np.polyfit(np.log(ns), np.log([ivf_times[n] for n in ns]), 1)[0]
    grow = max(slope, 1.0)
    lines += [
        "",
        f"- planted copies found: exact pass at {args.exact_n:,}: {exact_planted:.4f}; ivf pass "
        + ", ".join(f"at {n:,}: {planted_found[n]:.4f}" for n in ns),
        f"- exact pass, projected (x N^2 from {args.exact_n:,}): "
        + ", ".join(
            f"{m:,}: {t_exact * (m / args.exact_n) ** 2 / 3600:.1f} h"
            for m in (args.n, 1_000_000, 10_000_000)
        ),
        f"- pca pass: the same pairs as exact, but on these vectors the PCA-128 distance is a "
        f"loose bound ({pca_small.candidates:,} candidates for {len(exact):,} pairs at "
        f"{args.exact_n:,}), so it does not scale here",
        f"- ivf pass grows like N^{slope:.2f} over {ns[0]:,}..{ns[-1]:,}; projected (x N^"
        f"{grow:.2f}): "
        + ", ".join(
            f"{m:,}: {ivf_times[ns[-1]] * (m / ns[-1]) ** grow / 60:.1f} min"
            for m in (1_000_000, 10_000_000)
        ),
        f"- memory: the reduced copy + IVF hold 2 x 128 floats per vector: "
        f"{2 * 128 * 4 * 1e6 / 2**30:.1f} GiB at 1M, {2 * 128 * 4 * 1e7 / 2**30:.1f} GiB at 10M; "
        "the 4096-d vectors stay on disk (memory-mapped: peak RSS above counts their cached pages)",
        f"- load average at end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}",
    ]
    print("\n".join(lines[-7:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    del array
    if not args.reuse:
        for leftover in work.glob("*.npy"):
            leftover.unlink()


if __name__ == "__main__":
    main()
