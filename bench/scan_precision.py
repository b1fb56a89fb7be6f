"""Is the bf16 scan of the exact search (``retrieve serve --search-precision bf16``) worth it?
Its answers and its speed against the fp32 scan of the same mapped file, one run.

    .venv/bin/python bench/scan_precision.py [--rows 60000] [--index DIR ...] [--queries 300]

Data: (1) ``--rows`` synthetic relu(N(0, 1)) rows (what bench/serve.py searches; independent
rows make every distance nearly equal, the hardest case for a rounded scan), queries other
such rows; (2) each ``--index``: a real index's stored fc7 vectors, queries a sample of its
own rows less the row itself (its neighbours among the others). For k = 6, 10 and 100: the
share of queries whose whole top-k list (ids in order) equals the fp32 scan's, and recall@k.
Then latency of one query and of 16 at once (median of 20), and the time to make the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name

from retrieval.devices import fast_bf16
from retrieval.indexes import exact, store
from retrieval.indexes.exact import MappedFlat

KS = (6, 10, 100)


def machine() -> str:
    return (
        f"CPU {cpu_name()} ({len(os.sched_getaffinity(0))} "
        f"cores, native bf16: {fast_bf16(torch.device('cpu'))}), torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )


def synthetic(folder: Path, rows: int, dim: int = 4096) -> Path:
    """An IDMap2,Flat file of relu(N(0, 1)) rows, written in blocks."""
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 5000):
        block = np.maximum(rng.standard_normal((min(5000, rows - start), dim), np.float32), 0)
        index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    path = folder / "synthetic.faiss"
    faiss.write_index(index, str(path))
    return path


def median_ms(run, repeats: int = 20) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def compare(flat: MappedFlat, queries: np.ndarray, drop_self: np.ndarray | None) -> dict:
    started = time.perf_counter()
    flat.bf16_copy()
    copy_s = time.perf_counter() - started
    extra = 1 if drop_self is not None else 0
    kmax = max(KS) + extra
    _, i32 = flat.search(queries, kmax)
    _, i16 = flat.search(queries, kmax, scan="bf16")
    if drop_self is not None:  # each query is a stored row: its neighbours are the others
        i32 = np.stack([r[r != s][: max(KS)] for r, s in zip(i32, drop_self)])
        i16 = np.stack([r[r != s][: max(KS)] for r, s in zip(i16, drop_self)])
    answers = {}
    for k in KS:
        same = float(np.mean([np.array_equal(a[:k], b[:k]) for a, b in zip(i32, i16)]))
        recall = float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(i32, i16)]))
        answers[f"k={k}"] = {"identical_lists": round(same, 4), "recall": round(recall, 5)}
    one, sixteen = queries[:1], queries[:16]
    return {
        "rows": flat.ntotal,
        "queries": len(queries),
        "answers_vs_fp32_scan": answers,
        "one_query_ms": {
            "fp32": median_ms(lambda: flat.search(one, 6)),
            "bf16": median_ms(lambda: flat.search(one, 6, scan="bf16")),
        },
        "sixteen_queries_ms": {
            "fp32": median_ms(lambda: flat.search(sixteen, 6)),
            "bf16": median_ms(lambda: flat.search(sixteen, 6, scan="bf16")),
        },
        "bf16_copy": {"seconds": round(copy_s, 2), "bytes": flat.bf16_bytes()},
        "loadavg": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--index", type=Path, action="append", default=[])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result: dict = {"machine": machine(), "runs": {}}
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        if args.rows:
            path = synthetic(Path(tmp), args.rows)
            queries = np.maximum(rng.standard_normal((args.queries, 4096), np.float32), 0)
            # mapped by faiss as a snapshot maps it; the vectors are searched in the mapping
            flat = exact.flat_view(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC))
            result["runs"]["synthetic"] = compare(flat, queries, None)
            del flat
            path.unlink()
        for index_dir in args.index:
            snapshot = store.open_snapshot(index_dir)
            flat = snapshot.mapped_flat()
            if flat is None:
                raise SystemExit(f"{index_dir}: not an exact Flat index")
            picked = rng.choice(flat.ntotal, min(args.queries, flat.ntotal), replace=False)
            queries = np.array(flat.vectors[np.sort(picked)])
            ids = flat.ids[np.sort(picked)]
            result["runs"][str(index_dir)] = compare(flat, queries, ids)
            snapshot.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
