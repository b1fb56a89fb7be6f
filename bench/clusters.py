"""Cluster quality: k-means on fc7 vs on raw pixels, purity and NMI against the true classes.

    python bench/clusters.py --imagenette-index IDX [--fashion shared/datasets/fashion-mnist] \
        [--weights random:0] [--k 10] [--out FILE.md]

Imagenette val: fc7 read from an index of the val folder (``retrieve index``; its model is
reported), raw pixels = each file shrunk to 32x32 RGB (3072 values). Fashion-MNIST test: fc7
of each 28x28 image embedded in memory with ``--weights`` (the same preprocessing a folder of
them would get), raw pixels = the 784 grey values. Both through
``retrieval.collection.clusters.kmeans`` (faiss k-means, seeded, best of 3 starts), k = the
number of classes, same seeds, same run.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search import machine

from retrieval import Index
from retrieval.collection.clusters import kmeans, label_scores
from retrieval.collection.vectors import ArrayVectors

SEEDS = (0, 1, 2)


def scores(vectors: np.ndarray, labels: list, k: int) -> tuple[float, float]:
    runs = [
        label_scores(labels, kmeans(ArrayVectors(vectors), k, seed=s).assignment) for s in SEEDS
    ]
    return (float(np.mean([r["purity"] for r in runs])), float(np.mean([r["nmi"] for r in runs])))


def imagenette(index_dir: Path, k: int) -> list[str]:
    with Index.open(index_dir) as ix:
        rows = ix.rows(limit=None)
        fc7 = ix.vectors([r.id for r in rows])
        model = ix.manifest["model"]["source"]
    labels = [r.label for r in rows]
    pixels = np.stack(
        [
            np.asarray(
                Image.open(r.path).convert("RGB").resize((32, 32), Image.BILINEAR), np.float32
            ).ravel()
            / 255
            for r in rows
        ]
    )
    out = []
    for name, data in (("fc7", fc7), ("raw pixels 32x32 RGB", pixels)):
        started = time.perf_counter()
        purity, nmi = scores(data, labels, k)
        out.append(
            f"| Imagenette val ({len(rows)}) | {name} | {purity:.3f} | {nmi:.3f} | "
            f"{time.perf_counter() - started:.0f} |"
        )
    return [f"- Imagenette fc7 from {index_dir} (model {model})", *out]


def fashion(folder: Path, weights: str, k: int, limit: int | None) -> list[str]:
    import torch

    from retrieval.extraction import embed_decoded, make_mapper
    from retrieval.extraction.types import ExtractOptions
    from retrieval.model.weights import load_model

    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if limit:
        images, labels = images[:limit], labels[:limit]
    model = load_model(weights)
    mapper = make_mapper(model, ExtractOptions(device="cpu", threads=torch.get_num_threads()))
    started = time.perf_counter()
    fc7 = np.concatenate(
        [
            embed_decoded([Image.fromarray(x) for x in images[s : s + 128]], mapper)[0]
            for s in range(0, len(images), 128)
        ]
    )
    embedded = time.perf_counter() - started
    out = [f"- Fashion-MNIST test: fc7 of model {weights} ({embedded:.0f} s to embed)"]
    for name, data in (("fc7", fc7), ("raw pixels 28x28", images.reshape(len(images), -1) / 255)):
        started = time.perf_counter()
        purity, nmi = scores(np.asarray(data, np.float32), labels.tolist(), k)
        out.append(
            f"| Fashion-MNIST test ({len(images)}) | {name} | {purity:.3f} | {nmi:.3f} | "
            f"{time.perf_counter() - started:.0f} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenette-index", type=Path, default=None)
    parser.add_argument("--fashion", type=Path, default=None)
    parser.add_argument("--fashion-limit", type=int, default=None)
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=1, help="faiss threads (see duplicates_scale)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    notes, table = [], []
    for part in (
        imagenette(args.imagenette_index, args.k) if args.imagenette_index else [],
        fashion(args.fashion, args.weights, args.k, args.fashion_limit) if args.fashion else [],
    ):
        notes += [line for line in part if line.startswith("- ")]
        table += [line for line in part if line.startswith("|")]
    lines = [
        "# Cluster quality (bench/clusters.py)",
        "",
        *machine(),
        *notes,
        f"- k-means k={args.k}, mean of seeds {SEEDS}",
        "",
        "| data | features | purity | NMI | seconds |",
        "|---|---|---|---|---|",
        *table,
        "",
        f"- load average at end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
