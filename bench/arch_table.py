"""The per-architecture quality table (issue 14, item 5): each of the five AlexNets trained with
`retrieve train` on three data sets, then top-1, fc7 precision@6 and mAP beside the untrained
network's fc7 (same arch, same init) and raw pixels, all measured in the same run.

    .venv/bin/python bench/arch_table.py --only small:torchvision   # one training + evaluation
    .venv/bin/python bench/arch_table.py --table                    # the table of what is there

Run each `--only DATASET:ARCH` as its own process (under the CPU lock) so other jobs interleave:

    for run in small:torchvision small:paper ...; do
        flock /work/notes/cpu.lock .venv/bin/python bench/arch_table.py --only $run; done

Data sets (paths under --shared):
  small       550 Imagenette training images (bench/small_folder.py's pick: 55 per class),
              `retrieve train DIR -o m.pt --image-size 64` + the arch options and nothing else;
              queries: all 3,925 Imagenette val images; database: the 550.
  fashion     Fashion-MNIST's idx files, `--time-budget` (3m); queries: a seeded stratified
              2,000 of the 10,000 test images; database: a seeded stratified 10,000 of the
              60,000 training images.
  imagenette  imagenette2-224 from scratch (train -> val), `--time-budget` (3m); queries: the
              3,925 val images; database: the 9,469 training images.
cifar trains at 32 px (`--image-size 32` on the small folder; --time-budget keeps cifar at 32).

`--no-eval` trains only and `--reuse` evaluates an existing model.pt, so a long run can take the
lock twice. Each run writes OUT/DATASET-ARCH/{model.pt, train.json, train.log, result.json}. A
run whose training fails (a diverging run stops with one line) is recorded with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402
from small_folder import pick, pixel_rows, quality, queries  # noqa: E402

from retrieval.model.weights import load_model  # noqa: E402
from retrieval.training.augment import BatchTransform  # noqa: E402
from retrieval.training.datasets import open_training_data, stratified_split  # noqa: E402
from retrieval.training.imagesets import ImageSet  # noqa: E402
from retrieval.training.loop import epoch_order  # noqa: E402
from retrieval.training.prepare import open_run_data  # noqa: E402
from retrieval.training.recipes import Recipe, build_model, scale_to_unit  # noqa: E402
from retrieval.training.validation import classify  # noqa: E402

K = 6
P_AT_K = f"precision@{K}"
ARCHS: dict[str, list[str]] = {
    "torchvision": [],
    "paper": ["--arch", "paper"],
    "paper-groups2": ["--arch", "paper", "--groups", "2"],
    "torchvision-bn": ["--batch-norm"],
    "cifar": ["--arch", "cifar"],
}
DATASETS = ("small", "fashion", "imagenette")
# Query and database caps per data set (0: all); the table states the sizes used.
CAPS = {"small": (0, 0), "fashion": (2000, 10000), "imagenette": (0, 0)}
WORKERS = 2


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    arch: str

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.arch}"


def parse_only(text: str) -> RunSpec:
    """``DATASET:ARCH`` (e.g. ``small:paper-groups2``) as a run, checked against the lists."""
    dataset, sep, arch = text.partition(":")
    if not sep or dataset not in DATASETS or arch not in ARCHS:
        raise SystemExit(
            f"--only {text!r}: expected DATASET:ARCH with DATASET in {DATASETS} "
            f"and ARCH in {tuple(ARCHS)}"
        )
    return RunSpec(dataset, arch)


def train_options(spec: RunSpec, time_budget: str) -> list[str]:
    """What follows `retrieve train DIR -o model.pt` for this run."""
    arch = ARCHS[spec.arch]
    if spec.dataset == "small":
        size = "32" if spec.arch == "cifar" else "64"
        return ["--image-size", size, *arch]
    return ["--time-budget", time_budget, *arch]


def capped(labels: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor | None:
    """Indices of a seeded, stratified ``limit`` of ``labels`` (None: keep all)."""
    if not limit or limit >= len(labels):
        return None
    _, keep = stratified_split(labels, limit / len(labels), seed)
    return keep


def features(model, images: ImageSet, prep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, fc7 rows and labels of every image (centre crop, the checkpoint's preprocessing)."""
    transform = BatchTransform(prep.crop, prep.mean, prep.std)
    rows: list[torch.Tensor] = []
    logits, labels = classify(
        model, images, transform, prep.resize, 128, torch.device("cpu"), fc7=rows
    )
    return logits, torch.cat(rows), labels


def untrained(recipe: Recipe, train_dir: Path, prep, n_classes: int, channels: int):
    """The network the run started from: the recipe's seeded init, LSUV-scaled on the same 256
    training images the training loop used (``_Run.init_batch``), no step taken."""
    model = build_model(recipe, n_classes, channels)
    if recipe.init == "lsuv" and not recipe.finetune:
        train = open_run_data(train_dir, recipe).train
        order = epoch_order(len(train), recipe.seed, -1)[:256]
        pixels = torch.cat([p for p, _ in train.batches(order, 256, prep.resize)])
        scale_to_unit(model, BatchTransform(prep.crop, prep.mean, prep.std)(pixels, train=False))
    return model.eval()


def eval_sets(spec: RunSpec, train_dir: Path, shared: Path) -> tuple[ImageSet, ImageSet, Any]:
    """(database, queries, splits) for a data set, capped as CAPS says."""
    data = open_training_data(train_dir)
    n_queries, n_database = CAPS[spec.dataset]
    if spec.dataset == "small":  # the whole folder (train + its held-out 10%), as small_folder
        from retrieval.training.imagesets import FileImages

        database: ImageSet = FileImages(
            [*data.train.paths, *data.val.paths],
            torch.cat([data.train.labels, data.val.labels]),
            data.classes,
            3,
        )
        query_set: ImageSet = queries(shared / "datasets/imagenette2-224", data.classes, 0)
    else:
        database, query_set = data.train, data.val
    keep = capped(database.labels, n_database)
    database = database if keep is None else database.subset(keep)
    keep = capped(query_set.labels, n_queries)
    query_set = query_set if keep is None else query_set.subset(keep)
    return database, query_set, data


def train(spec: RunSpec, run_dir: Path, train_dir: Path, time_budget: str) -> dict[str, Any]:
    """`retrieve train`, timed, with the load average; the error line if it fails."""
    model = run_dir / "model.pt"
    command = [
        str(ROOT / ".venv/bin/retrieve"),
        "train",
        str(train_dir),
        "-o",
        str(model),
        "--overwrite",  # a re-run of the table measures again
        *train_options(spec, time_budget),
    ]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with (run_dir / "train.json").open("w") as out, (run_dir / "train.log").open("w") as err:
        done = subprocess.run([*command, "--json"], stdout=out, stderr=err)
    record = {
        "command": " ".join(command[1:]).replace(str(ROOT) + "/", ""),
        "train_seconds": round(time.perf_counter() - started, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "returncode": done.returncode,
    }
    if done.returncode:
        lines = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()
        record["error"] = lines[-1] if lines else f"exit status {done.returncode}"
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))
    return record


def scored(model, database: ImageSet, query_set: ImageSet, prep) -> dict[str, Any]:
    """Top-1 of the queries, and precision@6 and mAP of their fc7 against the database's."""
    logits, q, ql = features(model, query_set, prep)
    _, d, dl = features(model, database, prep)
    top1 = float((logits.argmax(1) == ql).float().mean())
    return {"top1": top1, **quality(q, ql, d, dl), "dim": int(q.shape[1])}


def evaluate(spec: RunSpec, run_dir: Path, train_dir: Path, shared: Path) -> dict[str, Any]:
    """Top-1, precision@6 and mAP: trained fc7, untrained fc7 (same init), raw pixels."""
    started = time.perf_counter()
    loaded = load_model(run_dir / "model.pt")
    prep = loaded.preprocessing
    database, query_set, data = eval_sets(spec, train_dir, shared)
    database = database.in_memory(prep.resize, WORKERS)  # decoded once for all three
    query_set = query_set.in_memory(prep.resize, WORKERS)
    recipe = Recipe.from_dict(loaded.metadata["recipe"])
    start = untrained(recipe, train_dir, prep, len(data.classes), data.channels)
    rows = {
        "trained fc7": scored(loaded.model, database, query_set, prep),
        "untrained fc7": scored(start, database, query_set, prep),
    }
    d, dl = pixel_rows(database, prep.crop, prep.mean, prep.std)
    q, ql = pixel_rows(query_set, prep.crop, prep.mean, prep.std)
    rows["raw pixels"] = {"top1": None, **quality(q, ql, d, dl), "dim": int(q.shape[1])}
    summary = json.loads((run_dir / "train.json").read_text())
    best = (summary.get("best") or {}).get("epoch")
    kept = [m for m in loaded.metadata.get("metrics") or [] if m.get("epoch") == best]
    return {
        "queries": len(query_set),
        "database": len(database),
        "image_size": prep.crop,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "recipe": summary.get("recipe"),
        "plan": summary.get("plan"),
        "best": summary.get("best"),
        "epochs_run": summary.get("epochs"),
        "kept_epoch_val_top1": 1 - kept[0]["top1_error"] if kept else None,
        "rows": rows,
    }


def previous_record(run_dir: Path) -> dict[str, Any] | None:
    """The training record of an earlier run in ``run_dir`` (this script's run.json, or
    bench/small_folder.py's report.json for the same command)."""
    for name in ("run.json", "report.json"):
        path = run_dir / name
        if path.exists() and (name == "run.json" or (run_dir / "model.pt").exists()):
            data = json.loads(path.read_text())
            keys = ("command", "train_seconds", "load_average_before", "load_average_after")
            record = {k: data.get(k) for k in (*keys, "error") if k in data}
            record["returncode"] = data.get("returncode", 0)
            record["reused_from"] = name
            return record
    return None


def run_one(spec: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = args.out / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    shared = args.shared
    if spec.dataset == "small":
        train_dir = pick(shared / "datasets/imagenette2-224", run_dir, 55)
    elif spec.dataset == "fashion":
        train_dir = shared / "datasets/fashion-mnist"
    else:
        train_dir = shared / "datasets/imagenette2-224"
    record = previous_record(run_dir) if args.reuse else None
    if record is None:
        record = train(spec, run_dir, train_dir, args.time_budget)
    result = {
        "dataset": spec.dataset,
        "arch": spec.arch,
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **record,
    }
    if args.no_eval:
        return result
    if not record.get("returncode"):
        try:
            result.update(evaluate(spec, run_dir, train_dir, shared))
        except Exception as exc:  # a variant that trains but cannot be evaluated: say why
            result["error"] = f"evaluation failed: {type(exc).__name__}: {exc}"
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def load_text(result: dict[str, Any]) -> str:
    before, after = result.get("load_average_before"), result.get("load_average_after")
    if not before or not after:
        return "—"
    return f"{before[0]:.1f}→{after[0]:.1f}"


def steps_text(result: dict[str, Any]) -> str:
    recipe = result.get("recipe") or {}
    if not recipe:
        return "—"
    return f"{recipe.get('steps')}×{recipe.get('batch_size')} @{recipe.get('image_size')} px"


def table_rows(results: list[dict[str, Any]]) -> list[str]:
    """The Markdown table: one row per run, trained / untrained / pixels side by side."""
    head = (
        "| data | arch | training | load 1-min | steps×batch | top-1 | p@6 trained | untrained "
        "| pixels | mAP trained | untrained | pixels |"
    )
    lines = [head, "|" + "---|" * 2 + "---:|" * 10]
    for r in results:
        rows = r.get("rows")
        if not rows:
            why = r.get("error", "not run")
            lines.append(
                f"| {r['dataset']} | {r['arch']} | {fmt(r.get('train_seconds'), 0)} s "
                f"| {load_text(r)} | {steps_text(r)} | failed: {why} |" + " |" * 6
            )
            continue
        t, u, p = rows["trained fc7"], rows["untrained fc7"], rows["raw pixels"]
        lines.append(
            f"| {r['dataset']} | {r['arch']} | {fmt(r.get('train_seconds'), 0)} s "
            f"| {load_text(r)} | {steps_text(r)} | {fmt(t['top1'])} "
            f"| **{fmt(t[P_AT_K])}** | {fmt(u[P_AT_K])} | {fmt(p[P_AT_K])} "
            f"| **{fmt(t['map'])}** | {fmt(u['map'])} | {fmt(p['map'])} |"
        )
    return lines


def collect(out: Path) -> list[dict[str, Any]]:
    """The result.json of every run under ``out``, in table order."""
    results = []
    for dataset in DATASETS:
        for arch in ARCHS:
            path = out / f"{dataset}-{arch}" / "result.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/work/bench-runs/arch"))
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--only", action="append", default=[], metavar="DATASET:ARCH")
    parser.add_argument("--time-budget", default="3m", help="for fashion and imagenette")
    parser.add_argument("--reuse", action="store_true", help="evaluate an existing model.pt")
    parser.add_argument("--no-eval", action="store_true", help="train only (then --reuse)")
    parser.add_argument("--table", action="store_true", help="print the table of OUT's runs")
    args = parser.parse_args()
    specs = [parse_only(text) for text in args.only]
    if not specs and not args.table:
        specs = [RunSpec(d, a) for d in DATASETS for a in ARCHS]
    for spec in specs:
        result = run_one(spec, args)
        print(json.dumps({k: v for k, v in result.items() if k != "recipe"}, indent=2))
    results = collect(args.out)
    lines = table_rows(results)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "table.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
