"""The transfer benchmark (issue 23): does starting a small folder from another model pay, and how
does the gain grow with the time that model was trained? All measured in one run.

    .venv/bin/python bench/transfer.py [--data ../shared/datasets/imagenette2-224]
        [--out transfer-out] [--pretrain 2m,8m] [--budget 3m]

Imagenette's ten classes are split by their sorted wnid: the even positions (tench, cassette
player, church, garbage truck, golf ball) are the pretraining classes, the odd ones (English
springer, chain saw, French horn, gas pump, parachute) the held-out classes, never seen before
the fine-tuning.

- Pretraining: `retrieve train PRE -o pretrain-L.pt --image-size 64 --time-budget L` for each
  length L, on all the training images of the five pretraining classes (validated on 100 val
  images per class, the first by sha256 of their names).
- The small folder: 55 training images of each held-out class (the first by sha256 of their
  names, bench/small_folder.py's rule), one folder of classes (training holds out its own 10%).
- On it, with the same `--time-budget` (3m) and `--image-size 64`: from scratch (the default
  recipe), and `--finetune pretrain-L.pt` for each L.
- Evaluation: the held-out classes' val images (80 per class, first by sha256) are the queries,
  the small folder's 275 images the database; precision@6 and mAP of fc7 (Euclidean), and top-1
  of the model's own classifier on the queries. Beside them: each pretrained checkpoint used as
  it is (its fc7, no fine-tuning: no top-1, its classes are others), the untrained network
  (the scratch run's seeded init, LSUV-scaled as training starts) and raw pixels.

Nothing is tuned to the queries: every option is the tool's default but the budget and the size.
About 21 minutes with the defaults (the budgets, plus start-up and evaluation). Run it under the
CPU lock, alone: the budgets are wall-clock time, and a busy machine trains fewer steps in them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from arch_table import scored, untrained  # noqa: E402
from machine import cpu_name  # noqa: E402
from small_folder import pixel_rows, quality  # noqa: E402

from retrieval.model.weights import load_model  # noqa: E402
from retrieval.training.datasets import open_eval_data, open_training_data  # noqa: E402
from retrieval.training.imagesets import FileImages  # noqa: E402
from retrieval.training.recipes import Recipe  # noqa: E402

K = 6
P_AT_K = f"precision@{K}"
IMAGE_SIZE = "64"
WORKERS = 2


def by_name_hash(files: list[Path]) -> list[Path]:
    """A seeded order that needs no RNG: the sha256 of each file's name."""
    return sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).digest())


def link(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        target = folder / path.name
        if not target.exists():
            target.symlink_to(path.resolve())


def split_classes(data: Path) -> tuple[list[str], list[str]]:
    wnids = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    return wnids[0::2], wnids[1::2]


def make_folders(data: Path, out: Path, per_class: int, val_per_class: int, queries: int):
    """The pretraining set (train/ + val/), the small folder, and the query folder."""
    pre_classes, held_out = split_classes(data)
    pretrain, folder, query_dir = out / "pretrain", out / "folder", out / "queries"
    for wnid in pre_classes:
        link(sorted((data / "train" / wnid).iterdir()), pretrain / "train" / wnid)
        val = by_name_hash(list((data / "val" / wnid).iterdir()))[:val_per_class]
        link(val, pretrain / "val" / wnid)
    for wnid in held_out:
        link(by_name_hash(list((data / "train" / wnid).iterdir()))[:per_class], folder / wnid)
        link(by_name_hash(list((data / "val" / wnid).iterdir()))[:queries], query_dir / wnid)
    words = data / "words.txt"
    for target in (pretrain, folder, query_dir):
        if words.exists():  # readable class names beside each folder, as ImageNet's layout has
            shutil.copyfile(words, target / "words.txt")
    return pretrain, folder, query_dir, pre_classes, held_out


def train(name: str, data_dir: Path, out: Path, options: list[str]) -> dict[str, Any]:
    """`retrieve train` as a user runs it (this tree's code), timed, with the load average."""
    model = out / f"{name}.pt"
    command = ["train", str(data_dir), "-o", str(model), "--overwrite", "--image-size", IMAGE_SIZE]
    command += options
    print("$ retrieve", " ".join(command), file=sys.stderr, flush=True)
    runner = [sys.executable, "-c", "from retrieval.cli.main import cli; cli()"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load_before, started = os.getloadavg(), time.perf_counter()
    with (out / f"{name}.json").open("w") as stdout, (out / f"{name}.log").open("w") as stderr:
        done = subprocess.run([*runner, *command, "--json"], stdout=stdout, stderr=stderr, env=env)
    record = {
        "command": "retrieve " + " ".join(command).replace(str(out) + "/", ""),
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "returncode": done.returncode,
    }
    if done.returncode:
        lines = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
        record["error"] = lines[-1] if lines else f"exit status {done.returncode}"
        return record
    summary = json.loads((out / f"{name}.json").read_text())
    best = (summary.get("best") or {}).get("epoch")
    kept = [r for r in load_model(model).metadata.get("metrics", []) if r["epoch"] == best]
    record.update(
        epochs=summary.get("epochs"),
        plan=summary.get("plan"),
        kept_epoch=best,
        kept_val_top1=round(1 - kept[0]["top1_error"], 4) if kept else None,
    )
    return record


def evaluate(out: Path, folder: Path, query_dir: Path, lengths: list[str]) -> dict[str, Any]:
    data = open_training_data(folder)  # the classes and file order training saw
    database = FileImages(
        [*data.train.paths, *data.val.paths],
        torch.cat([data.train.labels, data.val.labels]),
        data.classes,
        3,
    )
    query_set = open_eval_data(query_dir, data.classes, 3)  # all of them, in these classes
    resize = load_model(out / "scratch.pt").preprocessing.resize
    database = database.in_memory(resize, WORKERS)  # decoded once for every row
    query_set = query_set.in_memory(resize, WORKERS)
    rows: dict[str, dict[str, Any]] = {}

    def score(name: str, weights: Path, top1: bool = True) -> None:
        if not weights.exists():
            rows[name] = {"error": "not trained"}
            return
        loaded = load_model(weights)
        row = scored(loaded.model, database, query_set, loaded.preprocessing)
        rows[name] = row if top1 else {**row, "top1": None}

    score("scratch, 3 min", out / "scratch.pt")
    for length in lengths:
        score(f"fine-tuned from pretrain-{length}", out / f"finetune-{length}.pt")
    for length in lengths:
        score(f"pretrain-{length} as it is", out / f"pretrain-{length}.pt", top1=False)
    scratch = load_model(out / "scratch.pt")
    prep = scratch.preprocessing
    recipe = Recipe.from_dict(scratch.metadata["recipe"])
    start = untrained(recipe, folder, prep, len(data.classes), 3)
    rows["untrained fc7"] = {**scored(start, database, query_set, prep), "top1": None}
    d, dl = pixel_rows(database, prep.crop, prep.mean, prep.std)
    q, ql = pixel_rows(query_set, prep.crop, prep.mean, prep.std)
    rows["raw pixels"] = {"top1": None, **quality(q, ql, d, dl), "dim": int(q.shape[1])}
    return {"database": len(database), "queries": len(query_set), "rows": rows}


def table(report: dict[str, Any]) -> str:
    lines = ["| start | top-1 | precision@6 | mAP |", "|---|---|---|---|"]
    for name, row in report["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | ({row['error']}) | | |")
            continue
        top1 = f"{100 * row['top1']:.1f}%" if row.get("top1") is not None else "—"
        lines.append(f"| {name} | {top1} | {row[P_AT_K]:.3f} | {row['map']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/datasets/imagenette2-224"
    )
    parser.add_argument("--out", type=Path, default=Path("transfer-out"))
    parser.add_argument("--pretrain", default="2m,8m", help="pretraining --time-budget list")
    parser.add_argument("--budget", default="3m", help="--time-budget on the small folder")
    parser.add_argument("--per-class", type=int, default=55)
    parser.add_argument("--queries", type=int, default=80, help="val images per held-out class")
    parser.add_argument("--eval-only", action="store_true", help="reuse the trained models")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    lengths = [x.strip() for x in args.pretrain.split(",") if x.strip()]
    pretrain, folder, query_dir, pre_classes, held_out = make_folders(
        args.data, out, args.per_class, 100, args.queries
    )
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    if not args.eval_only:
        for length in lengths:
            runs[f"pretrain-{length}"] = train(
                f"pretrain-{length}", pretrain, out, ["--time-budget", length]
            )
        runs["scratch"] = train("scratch", folder, out, ["--time-budget", args.budget])
        for length in lengths:
            start = out / f"pretrain-{length}.pt"
            if start.exists():
                options = ["--time-budget", args.budget, "--finetune", str(start)]
                runs[f"finetune-{length}"] = train(f"finetune-{length}", folder, out, options)
        (out / "runs.json").write_text(json.dumps(runs, indent=2))
    else:
        runs = json.loads((out / "runs.json").read_text())
    evaluated = evaluate(out, folder, query_dir, lengths)
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"torch {torch.__version__}, CPU only",
        "pretrain_classes": pre_classes,
        "held_out_classes": held_out,
        "pretrain_lengths": lengths,
        "budget": args.budget,
        "image_size": int(IMAGE_SIZE),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
        **evaluated,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
