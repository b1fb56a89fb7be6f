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
  prefix), so at full N it is the reference the approximate pass is scored against;
- ``ivf``: the same copy in IndexIVFFlat (4 sqrt(N) lists, nprobe 16); runs at several N to fit
  its growth, projected to 1M and 10M.
Peak memory is the process's max RSS after each pass (ru_maxrss), beside the reduced copy's size.
"""

from __future__ import annotations

import argparse
import math
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
    started = time.perf_counter()
    array, truth = fc7_like_with_copies(work / "fc7.npy", args.n, args.dim, args.copies)
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

    prefix = ArrayVectors(array[: args.exact_n])
    exact, t_exact = run(prefix, threshold, "exact")
    row("exact (full 4096-d, blocks)", args.exact_n, t_exact, exact, "1 (reference)")
    pca_small, t_pca_small = run(prefix, threshold, "pca")
    same = as_set(pca_small) == as_set(exact)
    row(
        "pca (PCA-128 flat + check)",
        args.exact_n,
        t_pca_small,
        pca_small,
        f"{len(as_set(pca_small) & as_set(exact)) / max(1, len(exact)):.4f}"
        + (" (same pairs)" if same else ""),
    )
    ivf_times = {}
    for n in [int(v) for v in args.steps.split(",") if v] + [args.n]:
        source = ArrayVectors(array[:n])
        if n == args.n:
            reference, t_ref = run(source, threshold, "pca")
            row("pca (PCA-128 flat + check)", n, t_ref, reference, "1 (reference)")
        ivf, t_ivf = run(source, threshold, "ivf")
        ivf_times[n] = t_ivf
        recall = (
            ""
            if n != args.n
            else (f"{len(as_set(ivf) & as_set(reference)) / max(1, len(reference)):.4f}")
        )
        row("ivf (PCA-128, IVF 4 sqrt(N), nprobe 16)", n, t_ivf, ivf, recall)
    truth_found = len(as_set(reference) & set(map(tuple, truth.tolist()))) / len(truth)
    ns = sorted(ivf_times)
    slope = np.polyfit(np.log(ns), np.log([ivf_times[n] for n in ns]), 1)[0]
    lines += [
        "",
        f"- planted copies found by the exact pass at {args.n:,}: {truth_found:.4f}",
        f"- exact pass, projected (x N^2 from {args.exact_n:,}): "
        + ", ".join(
            f"{m:,}: {t_exact * (m / args.exact_n) ** 2 / 3600:.1f} h"
            for m in (args.n, 1_000_000, 10_000_000)
        ),
        f"- pca pass, projected (x N^2 from {args.n:,}): "
        + ", ".join(
            f"{m:,}: {t_ref * (m / args.n) ** 2 / 60:.0f} min" for m in (1_000_000, 10_000_000)
        ),
        f"- ivf pass grows like N^{slope:.2f} over {ns[0]:,}..{ns[-1]:,}; projected: "
        + ", ".join(
            f"{m:,}: {ivf_times[ns[-1]] * (m / ns[-1]) ** max(slope, 1.0) / 60:.1f} min"
            for m in (1_000_000, 10_000_000)
        ),
        f"- memory of the reduced copy + IVF: {2 * 128 * 4 / 2**30 * 1e6:.1f} GiB at 1M, "
        f"{2 * 128 * 4 / 2**30 * 1e7:.1f} GiB at 10M (the 4096-d vectors stay on disk, "
        "read twice: PCA projection and candidate check)",
        f"- load average at end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}",
    ]
    print("\n".join(lines[-7:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    del array
    for leftover in work.glob("fc7.npy"):
        leftover.unlink()
    math.isfinite(slope)


if __name__ == "__main__":
    main()
