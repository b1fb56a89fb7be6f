"""The small-folder benchmark (issue 14): `retrieve train` on 550 Imagenette images, fc7 retrieval
quality beside the untrained network's fc7 and raw pixels, all measured in one run.

    .venv/bin/python bench/small_folder.py [--data ../shared/datasets/imagenette2-224]
        [--out small-folder-out] [--per-class 55] [--queries 0] [-- TRAIN OPTIONS...]

The folder: 55 training images per class (the first 55 of each class's files ordered by the
sha256 of their names, a seeded rule that needs no RNG), as symlinks in OUT/folder/CLASS/. The
training command is `retrieve train OUT/folder -o OUT/model.pt --image-size 64` plus whatever
follows `--`; `retrieve train` holds out its own 10% for validation. Then the 550 images are
indexed three ways (the trained fc7, an untrained network's fc7, raw pixels: the 64-px centre
crop, normalised, flattened) and Imagenette's val images (all, or --queries per class) are
the queries: precision@6 and mAP over the whole 550-image ranking.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.metrics import mean_average_precision, precision_at_k  # noqa: E402
from retrieval.model.weights import load_model  # noqa: E402
from retrieval.training.augment import BatchTransform, resize_for  # noqa: E402
from retrieval.training.datasets import open_training_data  # noqa: E402
from retrieval.training.imagesets import FileImages  # noqa: E402
from retrieval.training.recipes import Recipe, build_model  # noqa: E402
from retrieval.training.validation import classify  # noqa: E402

K = 6


def pick(data: Path, out: Path, per_class: int) -> Path:
    folder = out / "folder"
    for class_dir in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
        names = sorted(class_dir.iterdir(), key=lambda p: hashlib.sha256(p.name.encode()).digest())
        target = folder / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for path in names[:per_class]:
            link = target / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return folder


def queries(data: Path, classes: list[str], per_class: int) -> FileImages:
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted((data / "val" / name).iterdir())
        if per_class:
            files = sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).digest())
            files = files[:per_class]
        paths += files
        labels += [index] * len(files)
    return FileImages(paths, torch.tensor(labels), classes, 3)


def fc7_rows(weights, images, image_size: int, prep=None) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = load_model(weights) if not hasattr(weights, "model") else weights
    prep = prep or loaded.preprocessing
    transform = BatchTransform(image_size, prep.mean, prep.std)
    rows: list[torch.Tensor] = []
    _, labels = classify(
        loaded.model,
        images,
        transform,
        resize_for(image_size),
        64,
        torch.device("cpu"),
        fc7=rows,
        workers=2,
    )
    return torch.cat(rows), labels


def pixel_rows(images, image_size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    transform = BatchTransform(image_size, mean, std)
    rows, labels = [], []
    for pixels, batch_labels in images.batches(
        torch.arange(len(images)), 256, resize_for(image_size), workers=2
    ):
        rows.append(transform(pixels, train=False).flatten(1))
        labels.append(batch_labels)
    return torch.cat(rows), torch.cat(labels)


def quality(q, ql, d, dl) -> dict[str, float]:
    ranked = dl[torch.cdist(q.double(), d.double()).argsort(dim=1)].numpy()
    return {
        f"precision@{K}": precision_at_k(ranked, ql.numpy(), K),
        "map": mean_average_precision(ranked, ql.numpy()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/datasets/imagenette2-224"
    )
    parser.add_argument("--out", type=Path, default=Path("small-folder-out"))
    parser.add_argument("--per-class", type=int, default=55)
    parser.add_argument("--queries", type=int, default=0, help="val images per class (0: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--skip-train", action="store_true", help="reuse OUT/model.pt")
    parser.add_argument("train_options", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = pick(args.data, args.out, args.per_class)
    model = args.out / "model.pt"
    command = [
        str(ROOT / ".venv/bin/retrieve"),
        "train",
        str(folder),
        "-o",
        str(model),
        "--overwrite",  # --skip-train reuses it; otherwise each run trains afresh
        "--image-size",
        str(args.image_size),
        *args.train_options,
    ]
    load_before = os.getloadavg()
    started = time.perf_counter()
    if not args.skip_train:
        print("$", " ".join(command), file=sys.stderr)
        with (args.out / "train.json").open("w") as summary_file:
            subprocess.run([*command, "--json"], check=True, stdout=summary_file)
    train_seconds = time.perf_counter() - started
    load_after = os.getloadavg()

    loaded = load_model(model)
    image_size = loaded.preprocessing.crop
    data = open_training_data(folder)  # the same classes and file order as training saw
    database = FileImages(
        [*data.train.paths, *data.val.paths],
        torch.cat([data.train.labels, data.val.labels]),
        data.classes,
        3,
    )
    query_set = queries(args.data, data.classes, args.queries)
    prep = loaded.preprocessing
    rows = {}
    d, dl = fc7_rows(loaded, database, image_size)
    q, ql = fc7_rows(loaded, query_set, image_size)
    rows["trained fc7"] = quality(q, ql, d, dl)
    # The network training started from: the recipe's init and seed, no step taken.
    untrained = load_model(model)
    recipe = Recipe.from_dict(loaded.metadata["recipe"])
    untrained.model = build_model(recipe, len(data.classes), 3).eval()
    d, dl = fc7_rows(untrained, database, image_size, prep)
    q, ql = fc7_rows(untrained, query_set, image_size, prep)
    rows["untrained fc7 (same arch)"] = quality(q, ql, d, dl)
    d, dl = pixel_rows(database, image_size, prep.mean, prep.std)
    q, ql = pixel_rows(query_set, image_size, prep.mean, prep.std)
    rows["raw pixels"] = quality(q, ql, d, dl)
    summary = json.loads((args.out / "train.json").read_text())
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(command),
        "database": len(database),
        "queries": len(query_set),
        "train_seconds": round(train_seconds, 1),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "recipe": summary.get("recipe"),
        "best": summary.get("best"),
        "val_top1": 1 - summary["top1_error"] if "top1_error" in summary else None,
        "rows": rows,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    t = rows["trained fc7"]
    for name, r in rows.items():
        print(f"| {name} | {r[f'precision@{K}']:.3f} | {r['map']:.3f} |")
    print(
        f"acceptance: p@6 {t[f'precision@{K}']:.3f} vs untrained "
        f"{rows['untrained fc7 (same arch)'][f'precision@{K}']:.3f} (+0.15 needed) and pixels "
        f"{rows['raw pixels'][f'precision@{K}']:.3f} (+0.20 needed)"
    )


if __name__ == "__main__":
    main()
