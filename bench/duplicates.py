"""Near-duplicate quality: `retrieve duplicates` at its own calibrated threshold vs pHash.

    python bench/duplicates.py --images shared/datasets/imagenette2-224/val --work /tmp/dup \
        [--index IDX_OF_IMAGES] [--weights random:0] [--sources 500] [--out FILE.md]

``--sources`` images of the folder (seeded) each get one edited copy, the kind drawn at random
with a random strength: JPEG re-encoded at quality 12-30, shrunk to 40-60%, cropped to the
central 78-92%, or 10-30% brighter (wider than the calibration's fixed edits, so the benchmark
is not the calibration's own test). The copies sit among all the untouched images. Ground
truth: each (original, copy) pair. A tool's answer is every pair inside each group it reports;
pair precision, recall and F1 against the truth. Baseline: pHash (imagehash, 64 bits) at
imagededup's default ``max_distance_threshold`` 10, same files, same run. With ``--index`` (an
index of ``--images``), it is copied and only the copies are embedded.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search import machine

from retrieval import Index
from retrieval.build.options import IndexOptions
from retrieval.collection.calibration import CalibrationOptions, calibrate
from retrieval.collection.duplicates import find_duplicates
from retrieval.collection.near import near_pairs
from retrieval.collection.vectors import IndexVectors
from retrieval.images.walk import find_images

PHASH_THRESHOLD = 10  # imagededup PHash.find_duplicates default


def edit(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int, str]:
    kind = rng.choice(["jpeg", "shrink", "crop", "brighter"])
    w, h = image.size
    if kind == "jpeg":
        q = int(rng.integers(12, 31))
        return image, q, f"jpeg q{q}"
    if kind == "shrink":
        f = rng.uniform(0.4, 0.6)
        return (
            image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS),
            92,
            (f"shrink {f:.2f}"),
        )
    if kind == "crop":
        f = rng.uniform(0.78, 0.92)
        cw, ch = round(w * f), round(h * f)
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch)), 92, f"crop {f:.2f}"
    f = rng.uniform(1.1, 1.3)
    return ImageEnhance.Brightness(image).enhance(f), 92, f"brighter {f:.2f}"


def make_copies(paths: list[Path], folder: Path, n: int, seed: int) -> tuple[set, dict]:
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(n, len(paths)), replace=False))
    truth, kinds = set(), {}
    for i in chosen:
        source = paths[i]
        image = Image.open(source).convert("RGB")
        edited, quality, kind = edit(image, rng)
        target = folder / source.parent.name / f"copy-{source.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        edited.save(target, quality=quality)
        pair = tuple(sorted((os.path.abspath(source), os.path.abspath(target))))
        truth.add(pair)
        kinds[pair] = kind.split()[0]
    return truth, kinds


def score(found: set, truth: set) -> tuple[float, float, float]:
    tp = len(found & truth)
    precision = tp / len(found) if found else 1.0
    recall = tp / len(truth)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def phash_pairs(paths: list[str]) -> tuple[set, float]:
    import imagehash

    started = time.perf_counter()
    bits = np.stack([imagehash.phash(Image.open(p)).hash.ravel() for p in paths])
    packed = np.packbits(bits, axis=1).view(np.uint64)[:, 0]
    pairs = set()
    for i in range(len(paths)):
        x = np.bitwise_xor(packed[i], packed[i + 1 :])
        distance = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        for j in np.flatnonzero(distance <= PHASH_THRESHOLD):
            pairs.add(tuple(sorted((paths[i], paths[i + 1 + j]))))
    return pairs, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--index", type=Path, default=None)
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--sources", type=int, default=500)
    parser.add_argument("--sample", type=int, default=300, help="calibration sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = ["# Near-duplicate quality (bench/duplicates.py)", "", *machine()]
    images = args.images.resolve()
    originals = find_images(images)[0]
    edits = args.work / "edits"
    shutil.rmtree(args.work, ignore_errors=True)
    truth, kinds = make_copies(originals, edits, args.sources, args.seed)
    index_dir = args.work / "index"
    started = time.perf_counter()
    if args.index:
        shutil.copytree(args.index, index_dir)
        ix = Index.open(index_dir)
    else:
        ix = Index.create(index_dir, images, IndexOptions(weights=args.weights))
    ix.update(edits)
    indexed = time.perf_counter() - started
    model = ix.manifest["model"]["source"]
    lines.append(
        f"- {len(originals)} images of {images.name} + {len(truth)} edited copies = "
        f"{ix.count} indexed (model {model}; embedding took {indexed:.0f} s)"
    )
    started = time.perf_counter()
    cal = calibrate(ix, CalibrationOptions(sample=args.sample, seed=args.seed))
    calibrated = time.perf_counter() - started
    started = time.perf_counter()
    report = find_duplicates(ix, cal.threshold)
    searched = time.perf_counter() - started
    found = {
        tuple(sorted(pair))
        for g in report.groups
        for pair in itertools.combinations([m.path for m in g.members], 2)
    }
    ours = score(found, truth)
    all_paths = [r.path for r in ix.rows(limit=None)]
    # Direct pairs (each within the threshold), and the best F1 any threshold would give this
    # model: what the calibration could reach at most with these fc7.
    wide = near_pairs(IndexVectors(ix), 2 * cal.threshold)
    wide_pairs = [tuple(sorted((all_paths[a], all_paths[b]))) for a, b in zip(wide.a, wide.b)]
    direct = {p for p, d in zip(wide_pairs, wide.distance) if d <= cal.threshold}
    direct_score = score(direct, truth)
    order = np.argsort(wide.distance, kind="stable")
    hits = np.cumsum([wide_pairs[i] in truth for i in order])
    precisions, recalls = hits / np.arange(1, len(order) + 1), hits / len(truth)
    f1s = 2 * precisions * recalls / np.maximum(precisions + recalls, 1e-12)
    at = int(np.argmax(f1s)) if len(f1s) else 0
    best = (
        float(f1s[at]) if len(f1s) else 0.0,
        float(wide.distance[order[at]]) if len(f1s) else 0.0,
        (float(precisions[at]), float(recalls[at]), float(f1s[at])) if len(f1s) else (0, 0, 0),
    )
    theirs_pairs, hashed = phash_pairs(all_paths)
    theirs = score(theirs_pairs, truth)
    lines += [
        f"- calibrated threshold {cal.threshold:.3f} on {cal.sampled} sampled images "
        f"(calibration precision {cal.precision:.3f}, recall {cal.recall:.3f}; {calibrated:.0f} s)",
        "",
        "| method | threshold | pairs reported | precision | recall | F1 | seconds |",
        "|---|---|---|---|---|---|---|",
        f"| retrieve duplicates (fc7, calibrated) | {cal.threshold:.3f} | {len(found)} | "
        f"{ours[0]:.3f} | {ours[1]:.3f} | {ours[2]:.3f} | {calibrated + searched:.0f} |",
        f"| retrieve, direct pairs (each within the threshold) | {cal.threshold:.3f} | "
        f"{len(direct)} | {direct_score[0]:.3f} | {direct_score[1]:.3f} | "
        f"{direct_score[2]:.3f} | |",
        f"| fc7 of this model at its best threshold (oracle, for scale) | {best[1]:.3f} | | "
        f"{best[2][0]:.3f} | {best[2][1]:.3f} | {best[2][2]:.3f} | |",
        f"| pHash (imagehash), imagededup default | {PHASH_THRESHOLD} bits | {len(theirs_pairs)} | "
        f"{theirs[0]:.3f} | {theirs[1]:.3f} | {theirs[2]:.3f} | {hashed:.0f} |",
        "",
        "Recall by kind of edit:",
        "",
        "| edit | copies | retrieve | pHash |",
        "|---|---|---|---|",
    ]
    for kind in ("jpeg", "shrink", "crop", "brighter"):
        pairs = {p for p, k in kinds.items() if k == kind}
        if pairs:
            lines.append(
                f"| {kind} | {len(pairs)} | {len(pairs & found) / len(pairs):.3f} | "
                f"{len(pairs & theirs_pairs) / len(pairs):.3f} |"
            )
    goal = ours[0] >= 0.95 and ours[2] >= theirs[2] + 0.10
    lines += [
        "",
        f"- goal (precision >= 0.95 and F1 >= pHash + 0.10): {'met' if goal else 'not met'}",
        f"- load average at end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}",
    ]
    ix.close()
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
