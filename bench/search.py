"""Benchmark the index kinds on synthetic fc7-like vectors: one run, one Markdown table.

    python bench/search.py [--n 200000] [--dim 4096] [--queries 1000] [--out FILE.md] [--quick]

For each kind: build time (train + add), memory (serialized bytes = disk; RAM estimate adds what
faiss builds on load), recall@10 against exact Flat search, single-query latency (median ms over
``--single`` queries) and batched queries/s, with ratios against Flat. IVF kinds get the
smallest nprobe reaching the target recall on a separate set of tuning queries (not the ones
scored). Then projections for 10 M and 100 M vectors. Indexes are built by
``retrieval.indexes.kinds`` and searched by ``searcher.search_faiss``, what the product's
``Searcher`` runs for these kinds (the Flat row is faiss's own exact search, the reference).

The data (see :func:`fc7_like`): fc7 is non-negative (ReLU), about half zeros, and its PCA
spectrum decays steeply; neighbours are meaningful because images come in classes. So each
vector is ``relu(z @ W + b + noise)`` with ``z`` a rank-``--rank`` latent drawn around one of
``--classes`` class centres, within-class spread decaying like 1/sqrt(i) over latent dims,
``W`` a random dim x rank map, ``b`` a per-unit bias and small isotropic noise in all ``dim``
units. Queries are fresh draws (not database rows). Real fc7 may be easier or harder for PQ:
check your own collection with ``retrieve recall --against``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from retrieval.indexes import kinds
from retrieval.indexes.kinds import IndexSpec
from retrieval.indexes.searcher import search_faiss, set_search_params
from retrieval.metrics import recall_at_k

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faiss_helpers import (
    build_seeded,
    index_memory_bytes,
    index_ram_bytes,
    ivf_centroids,
)
from machine import cpu_name

K = 10


@dataclass
class Row:
    name: str
    params: str = ""
    build_s: float = 0.0
    disk: int = 0
    ram: int = 0
    recall: float = 1.0
    single_ms: float = 0.0
    qps: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


def fc7_like(
    n: int, dim: int, *, rank: int = 256, classes: int = 1000, per_class: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(n x dim float32 fc7-like vectors, their class labels), made in chunks.

    Latent z (rank-d), with std in latent dim i decaying like 1/sqrt(i) at every level: a class
    centre (0.65/sqrt(i): classes overlap, so neighbours mostly but not always share the class),
    plus an instance offset (0.8/sqrt(i); ``per_class`` instances per class: the same object or
    scene photographed again), plus the image's own offset (0.4/sqrt(i)). fc7 = relu(z @ W + b +
    0.1 N(0, 1)) with W ~ N(0, 1/rank) and b ~ N(0, 0.25^2) per unit: about half the units are 0.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
    bias = (0.25 * rng.standard_normal(dim)).astype(np.float32)
    decay = (1 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
    centres = 0.65 * decay * rng.standard_normal((classes, rank), dtype=np.float32)
    instances = np.repeat(centres, per_class, axis=0)
    instances += 0.8 * decay * rng.standard_normal(instances.shape, dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    data_rng = np.random.default_rng(seed + 1)
    labels = data_rng.integers(0, len(instances), n)
    for s in range(0, n, 20_000):
        m = min(20_000, n - s)
        z = instances[labels[s : s + m]]
        z += 0.4 * decay * data_rng.standard_normal((m, rank), dtype=np.float32)
        x = z @ w
        x += bias
        x += 0.1 * data_rng.standard_normal((m, dim), dtype=np.float32)
        np.maximum(x, 0.0, out=out[s : s + m])
    return out, labels // per_class


def machine() -> list[str]:
    cpu = cpu_name()
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP thread(s)), numpy "
        f"{np.__version__}, Python {platform.python_version()}",
        f"- load average at start: {', '.join(f'{v:.1f}' for v in os.getloadavg())}",
    ]
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"- GPU: {', '.join(gpus) if gpus else 'none'} (torch {torch.__version__})")
    except ImportError:
        lines.append("- GPU: none (torch not installed)")
    return lines


def timed_search(index, q: np.ndarray, n_single: int) -> tuple[float, float, np.ndarray]:
    """(median single-query ms, batched queries/s, ids of the batched run), on CPU."""
    search_faiss(index, q[:2], K)  # warm-up: lazy allocations, tables
    lat = []
    for i in range(n_single):
        t = time.perf_counter()
        search_faiss(index, q[i : i + 1], K)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, ids = search_faiss(index, q, K)
    return 1000 * float(np.median(lat)), len(q) / (time.perf_counter() - t), ids


def training_sample(spec: IndexSpec, xb: np.ndarray, seed: int) -> np.ndarray | None:
    """A random sample of the database of the size the kind asks for (None: no training)."""
    if not kinds.needs_training(spec, xb.shape[1]):
        return None
    size = min(len(xb), kinds.training_sample_size(spec, xb.shape[1]))
    return xb[np.sort(np.random.default_rng(seed).choice(len(xb), size, replace=False))]


def build(spec: IndexSpec, xb: np.ndarray, seed: int, centroids=None) -> tuple[object, float, int]:
    """(index filled with ids 0..n-1, seconds to train and add, RAM of the empty trained index)."""
    t = time.perf_counter()
    index = build_seeded(spec, xb.shape[1], training_sample(spec, xb, seed), centroids)
    fixed = index_ram_bytes(index)
    for s in range(0, len(xb), 50_000):
        chunk = xb[s : s + 50_000]
        index.add_with_ids(chunk, np.arange(s, s + len(chunk), dtype=np.int64))
    return index, time.perf_counter() - t, fixed


def tune(
    index, tq: np.ndarray, truth: np.ndarray, knob: str, values, target: float
) -> tuple[int, float]:
    """Smallest knob value reaching ``target`` recall on the tuning queries (or, when the sweep
    cannot, within 0.005 of the best it reaches)."""
    recalls = [recall_at_k(search_faiss(index, tq, K, **{knob: v})[1], truth, K) for v in values]
    target = min(target, max(recalls) - 0.005)
    v, r = next((v, r) for v, r in zip(values, recalls, strict=True) if r >= target)
    set_search_params(index, **{knob: v})  # the sweep's knobs applied to one search each
    return v, r


def gpu_rows(xb: np.ndarray, xq: np.ndarray, truth: np.ndarray) -> list[Row]:
    """Exact search on the GPU with the database resident (torch fp32 and fp16), if one exists."""
    from retrieval.indexes import gpu

    if not gpu.torch_cuda_available():
        return []
    import torch

    rows = []
    for precision in ("float32", "float16"):
        log(f"GPU exact search, {precision}")
        t = time.perf_counter()
        searcher = gpu.TorchExactSearcher(xb, device="cuda", precision=precision)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t
        searcher.search(xq[:8], K)  # warm-up: cuBLAS handles, kernels
        lat = []
        for i in range(min(100, len(xq))):
            t = time.perf_counter()
            searcher.search(xq[i : i + 1], K)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, found = searcher.search(xq, K)
        qps = len(xq) / (time.perf_counter() - t)
        size = xb.size * (2 if precision == "float16" else 4)
        row = Row(f"Flat (torch CUDA {precision})", "exact", build_s, size, size)
        row.recall, row.qps = recall_at_k(found, truth, K), qps
        row.single_ms = 1000 * float(np.median(lat))
        row.note = f"{torch.cuda.get_device_name()}: memory is GPU memory, build is the upload"
        rows.append(row)
        del searcher
        torch.cuda.empty_cache()
    return rows


def parse_kind(text: str) -> IndexSpec:
    """'IVF1024,Flat', 'Flat+PCA256' (reduce), 'HNSW32+norm' (normalize)."""
    kind, *extras = text.split("+")
    reduce = next((e for e in extras if e.startswith("PCA")), None)
    return IndexSpec(kind, reduce=reduce, normalize="norm" in extras)


def default_kinds(n: int, dim: int) -> tuple[int, list[str]]:
    # 2 sqrt(n) lists rather than faiss's 4 sqrt(n): the coarse k-means on 4096-d dominates
    # build time on a small CPU, and recall does not need more lists here.
    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    return nlist, [
        f"IVF{nlist},Flat",
        f"IVF{nlist},PQ64",
        f"IVF{nlist},PQ{dim // 2}x4fs",
        f"IVF{nlist},PQ64,RFlat",
        "HNSW32",
        "Flat+PCA256",
    ]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_kind(text, xb, xq, tq, truth, tune_truth, shared, seed, target) -> Row:
    spec = parse_kind(text)
    nlist_centroids, kmeans_s = shared.get(text.split(",")[0], (None, 0.0))
    if spec.reduce or spec.normalize:
        nlist_centroids, kmeans_s = None, 0.0  # the shared centroids live in raw fc7 space
    index, build_s, fixed = build(spec, xb, seed, nlist_centroids)
    row = Row(text, build_s=build_s + kmeans_s)
    if nlist_centroids is not None:
        row.note = f"incl. {kmeans_s:.0f} s shared coarse k-means"
    nlist = getattr(faiss.try_extract_index_ivf(index), "nlist", 0)
    if nlist:
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128) if v <= nlist]
        v, _ = tune(index, tq, tune_truth, "nprobe", values, target)
        row.params = f"nprobe={v}"
        if "RFlat" in spec.kind or "Refine(" in spec.kind:
            kf, _ = tune(index, tq, tune_truth, "refine_k_factor", [4, 8, 16, 32, 64], target)
            row.params += f", k_factor={kf}"
    elif "HNSW" in spec.kind:
        v, _ = tune(index, tq, tune_truth, "ef_search", [16, 32, 64, 128, 256], target)
        row.params = f"efSearch={v}"
    row.single_ms, row.qps, ids = timed_search(index, xq, n_single=min(100, len(xq)))
    row.recall = recall_at_k(ids, truth, K)
    row.disk, row.ram = index_memory_bytes(index), index_ram_bytes(index)
    row.extra["fixed"] = fixed
    return row


def table(rows: list[Row], flat: Row, n: int) -> list[str]:
    out = [
        "| index | search | build s | disk MB | RAM MB | bytes/vector | recall@10 | "
        "1-query ms | batch q/s | speed-up (batch / 1-query) | memory shrink |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| `{r.name}` | {r.params or '-'} | {r.build_s:.1f} | {r.disk / 1e6:.1f} | "
            f"{r.ram / 1e6:.1f} | {r.ram / n:.0f} | {r.recall:.3f} | {r.single_ms:.2f} | "
            f"{r.qps:.0f} | {r.qps / flat.qps:.1f}x / {flat.single_ms / r.single_ms:.1f}x | "
            f"{flat.ram / r.ram:.1f}x |"
        )
    return out


def acceptance(rows: list[Row], flat: Row) -> list[str]:
    """Issue 6: an IVF-PQ row with recall@10 >= 0.90 at >= 10x Flat's q/s and >= 8x less RAM."""
    out = []
    for r in rows:
        if not (r.name.startswith("IVF") and ",PQ" in r.name) or r.qps == 0:
            continue
        checks = (r.recall >= 0.9, r.qps >= 10 * flat.qps, flat.ram >= 8 * r.ram)
        out.append(
            f"- `{r.name}` ({r.params}): recall@10 {r.recall:.3f}, {r.qps / flat.qps:.1f}x q/s, "
            f"{flat.ram / r.ram:.1f}x smaller: **{'MET' if all(checks) else 'not met'}**"
        )
    return [
        "Issue 6 acceptance (IVF-PQ, recall@10 >= 0.90, >= 10x Flat's batched q/s, >= 8x "
        "smaller in RAM):",
        "",
        *out,
    ]


def projections(rows: list[Row], n: int) -> list[str]:
    ram_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    out = [
        "| index | RAM at 10 M | RAM at 100 M | 1-query ms at 10 M | 1-query ms at 100 M |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        fixed = r.extra.get("fixed", 0)
        per_vector = (r.ram - fixed) / n
        cells = []
        for big in (10**7, 10**8):
            gb = (fixed + per_vector * big) / 1e9
            fits = "" if gb < ram_gib * 1.073 else " (over this RAM)"
            cells.append(f"{gb:,.1f} GB{fits}")
        for big in (10**7, 10**8):
            if r.name.startswith("IVF"):
                scale = math.sqrt(big / n)  # 4 sqrt(N) lists: probed codes and lists grow by sqrt
            elif "HNSW" in r.name:
                scale = math.log(big) / math.log(n)
            else:
                scale = big / n  # exact search reads every vector
            cells.append(f"{r.single_ms * scale:,.1f}")
        out.append(f"| `{r.name}` | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="database vectors (default 200,000)")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--queries", type=int, default=None, help="scored queries (default 1000)")
    p.add_argument("--tune-queries", type=int, default=200)
    p.add_argument(
        "--target", type=float, default=0.92, help="recall@10 that nprobe / efSearch are tuned for"
    )
    p.add_argument("--kinds", default=None, help="comma-free list separated by ';'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads")
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    p.add_argument("--quick", action="store_true", help="N=20,000, 200 queries: a smoke test")
    args = p.parse_args(argv)
    if args.threads:
        # On a shared machine, fewer OpenMP threads than busy cores avoids spin-wait stalls
        # that slow small parallel regions (PQ training, single queries) by up to 10x.
        faiss.omp_set_num_threads(args.threads)
    n = args.n or (20_000 if args.quick else 200_000)
    nq = args.queries or (200 if args.quick else 1000)
    nlist, kind_list = default_kinds(n, args.dim)
    if args.kinds:
        kind_list = [k for k in args.kinds.split(";") if k and k != "Flat"]
    started = time.perf_counter()
    lines = ["# Search benchmark: index kinds on synthetic fc7", "", *machine()]
    lines.append(
        f"- data: {n:,} database x {args.dim}-d fc7-like vectors (bench/search.py fc7_like, "
        f"seed {args.seed}), {nq} scored queries, {args.tune_queries} tuning queries, k={K}"
    )
    lines.append(
        f"- approximate rows use the smallest nprobe / efSearch / k_factor reaching recall@10 "
        f">= {args.target} on the tuning queries (separate from the scored ones), or the best "
        f"the sweep reaches; recall@10 = share of the exact 10 neighbours found"
    )
    log(f"generating {n + nq + args.tune_queries:,} x {args.dim} vectors")
    x, labels = fc7_like(n + nq + args.tune_queries, args.dim, seed=args.seed)
    xb, xq, tq = x[:n], x[n : n + nq], x[n + nq :]

    log("Flat: exact reference")
    flat_index, build_s, fixed = build(IndexSpec("Flat"), xb, args.seed)
    single_ms, qps, truth = timed_search(flat_index, xq, n_single=min(20, nq))
    tune_truth = search_faiss(flat_index, tq, K)[1]
    same_class = (labels[truth] == labels[n : n + nq, None]).mean()
    lines.append(
        f"- zeros: {(xb[:10_000] == 0).mean():.0%} of fc7 units; {same_class:.0%} of the exact "
        f"10 nearest neighbours share the query's class"
    )
    flat = Row("Flat", "exact", build_s, index_memory_bytes(flat_index), 0, 1.0)
    flat.ram, flat.single_ms, flat.qps = index_ram_bytes(flat_index), single_ms, qps
    flat.extra["fixed"] = fixed
    del flat_index
    rows = [flat]

    shared: dict[str, tuple[np.ndarray, float]] = {}
    if any(k.startswith(f"IVF{nlist},") for k in kind_list):
        log(f"coarse k-means for IVF{nlist} (shared by the raw-fc7 IVF rows)")
        t = time.perf_counter()
        spec = IndexSpec(f"IVF{nlist},Flat")
        coarse = kinds.build_index(spec, args.dim, training_sample(spec, xb, args.seed))
        shared[f"IVF{nlist}"] = (ivf_centroids(coarse), time.perf_counter() - t)
    for text in kind_list:
        log(f"{text}: build, tune, search")
        try:
            rows.append(
                run_kind(text, xb, xq, tq, truth, tune_truth, shared, args.seed, args.target)
            )
        except Exception as e:  # one broken kind must not lose the whole run
            log(f"{text} failed: {e}")
            rows.append(Row(text, note=f"failed: {e}"))
    rows += gpu_rows(xb, xq, truth)
    rows = [r for r in rows if r.qps > 0] + [r for r in rows if r.qps == 0]
    lines += ["", *table([r for r in rows if r.qps > 0], flat, n), ""]
    lines += [f"- `{r.name}`: {r.note}" for r in rows if r.note]
    lines += ["", *acceptance(rows, flat), ""]
    lines += [
        "## Projections to 10 M and 100 M vectors",
        "",
        "Scaled from the rows above: RAM = the trained empty index + measured bytes/vector x N; "
        "latency: exact search x N/n (it reads every vector), IVF x sqrt(N/n) (with the usual "
        "4 sqrt(N) lists both the coarse search and the codes probed grow by sqrt), HNSW x "
        "log N / log n. Estimates, not measurements; more lists at 100 M add nlist x "
        f"{args.dim} x 4 bytes of centroids.",
        "",
        *projections([r for r in rows if r.qps > 0], n),
        "",
        f"Total run time {time.perf_counter() - started:.0f} s; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
