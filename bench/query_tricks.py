"""Retrieval quality beyond the paper, measured before it is offered (issue 14, item 4).

On one labelled database (default: Imagenette train) and labelled queries (Imagenette val), with
one checkpoint, all in one run: precision@6 and mAP (full ranking) of

- plain fc7, Euclidean (the paper, and `retrieve`'s default);
- L2-normalised fc7 (`--normalize`);
- flip-averaged query fc7 (the query's and its mirror image's, averaged);
- average query expansion (AQE, Chum et al. 2007): the query replaced by the mean of itself
  and its top-n neighbours' stored vectors, then searched again;
- PCA-whitening learned on the database, then L2 normalisation (Babenko et al. 2014, Razavian
  et al. 2014), at 256 and 512 dimensions.

    python bench/query_tricks.py --weights model.pt [--train DIR --val DIR --limit N]

Prints a table with the machine; writes it as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import Index, IndexOptions
from retrieval.images.walk import find_images
from retrieval.metrics import mean_average_precision, precision_at_k

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "imagenette2-224"
K = 6


def ranked(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Row order of the whole database by Euclidean distance, per query (nearest first)."""
    d = (db * db).sum(1)[None, :] - 2.0 * queries @ db.T
    return np.argsort(d, axis=1, kind="stable")


def scores(order: np.ndarray, db_labels: np.ndarray, q_labels: np.ndarray) -> dict[str, float]:
    labels = db_labels[order]
    return {
        "precision@6": precision_at_k(labels[:, :K], q_labels, K),
        "mAP": mean_average_precision(labels, q_labels),
    }


def expand(db: np.ndarray, queries: np.ndarray, n: int) -> np.ndarray:
    """Average query expansion with the top ``n`` database vectors of a first search."""
    top = ranked(db, queries)[:, :n]
    return (queries + db[top].sum(1)) / (n + 1)


def whitener(db: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection) of PCA-whitening to ``dim`` dimensions, learned on ``db``."""
    mean = db.mean(0)
    _, s, vt = np.linalg.svd(db - mean, full_matrices=False)
    scale = s[:dim] / np.sqrt(len(db) - 1)
    return mean, (vt[:dim].T / np.maximum(scale, 1e-6)).astype(np.float32)


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def labelled(folder: Path, limit: int | None) -> list[Path]:
    found, _ = find_images(folder)
    if limit:
        rng = np.random.default_rng(0)
        found = sorted(rng.choice(found, min(limit, len(found)), replace=False).tolist())
    return [Path(p) for p in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--train", type=Path, default=DATA / "train")
    parser.add_argument("--val", type=Path, default=DATA / "val")
    parser.add_argument("--limit", type=int, default=None, help="queries sampled from --val")
    parser.add_argument("--out", type=Path, default=Path("bench-out/query_tricks.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        options = IndexOptions(weights=args.weights)
        with Index.create(Path(tmp) / "index", args.train, options) as ix:
            rows = ix.rows(limit=None)
            db = ix.vectors([r.id for r in rows])
            db_labels = np.array([r.label for r in rows])
            paths = labelled(args.val, args.limit)
            plain, records = ix.embed(paths)
            flipped, _ = ix.embed(paths, flip=True)
    q_labels = np.array([Path(r.path).parent.name for r in records if r.ok])
    results = {"plain fc7 (Euclidean)": scores(ranked(db, plain), db_labels, q_labels)}
    results["L2-normalised fc7"] = scores(ranked(l2(db), l2(plain)), db_labels, q_labels)
    results["flip-averaged query"] = scores(ranked(db, flipped), db_labels, q_labels)
    for n in (1, 3, 5):
        results[f"AQE, n={n}"] = scores(ranked(db, expand(db, plain, n)), db_labels, q_labels)
    for dim in (256, 512):
        mean, w = whitener(db, dim)
        wdb, wq = l2((db - mean) @ w), l2((plain - mean) @ w)
        results[f"PCA-whitened {dim} + L2"] = scores(ranked(wdb, wq), db_labels, q_labels)
    base = results["plain fc7 (Euclidean)"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"{len(plain)} queries against {len(db)} indexed images; weights {args.weights}")
    seconds = time.perf_counter() - started
    print(f"machine: {machine}; load average {os.getloadavg()[0]:.1f}; {seconds:.0f} s")
    print("| variant | precision@6 | mAP | vs plain (p@6, mAP) |")
    print("|---|---:|---:|---:|")
    for name, s in results.items():
        delta = f"{s['precision@6'] - base['precision@6']:+.3f}, {s['mAP'] - base['mAP']:+.3f}"
        print(f"| {name} | {s['precision@6']:.3f} | {s['mAP']:.3f} | {delta} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
