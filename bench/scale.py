"""Does the Ray engine spread the work? 1 and 2 model actors against the local engine, one run.

    python bench/scale.py [--data DIR] [--limit 1200] [--rounds 2] [--num-cpus 4]
        [--precision auto|fp32|bf16] [--out FILE.md]

A local Ray cluster with ``--num-cpus`` logical CPUs; each model actor reserves one CPU and runs
the model on one torch thread, decode tasks take the rest. Each engine extracts the same images
into fresh shards; rates are whole runs (model loading and actor start included) and marginal
(the whole run less a 32-image run of the same engine: what one more image costs). Beside
them, in the same run: the model on one thread (the per-actor ceiling) and the decoder on one
core (the per-core rate), the two numbers of the cluster throughput model
``min(GPUs x per-GPU rate, decode cores x per-core rate, storage bandwidth / file size)``.
The floor this checks: 2 actors >= 1.6x 1 actor on 4 logical CPUs. Each Ray run also says how
it spread: rows per model actor and each actor's busy share of the run (its model seconds over
the run's wall clock), which shows the work spreading whatever the machine's physical cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name

from retrieval.devices import choose_precision
from retrieval.distributed import RayOptions, Source, extract_locally, extract_with_ray
from retrieval.distributed.tasks import decode_batch
from retrieval.extraction.mapper import Fc7Mapper
from retrieval.extraction.types import ExtractOptions
from retrieval.images.walk import find_images
from retrieval.model.weights import load_model

SMALL_RUN = 32  # images in the run that measures each engine's fixed cost
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenette2-224"


def machine() -> str:
    return (
        f"CPU {cpu_name()} "
        f"({len(os.sched_getaffinity(0))} cores), torch {torch.__version__}, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at start"
    )


def sample(root: Path, limit: int, folder: Path) -> None:
    found, _ = find_images(root)
    picked = found[:: max(1, len(found) // limit)][:limit]
    for i, path in enumerate(picked):
        target = folder / path.parent.name / f"{i:05d}{path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())


def timed(run):
    start = time.perf_counter()
    report = run()
    return time.perf_counter() - start, report


def marginal_rate(run_small, run_large) -> tuple[float, float, str]:
    """(whole-run rate, marginal rate, how the large run spread over the model actors): the
    marginal rate subtracts a small run's fixed cost (cluster scheduling, actor start, model
    load), which the driver cannot see directly."""
    small_s, small = timed(run_small)
    large_s, large = timed(run_large)
    gained = large.images - small.images
    marginal = gained / (large_s - small_s) if large_s > small_s else float("nan")
    return large.images / large_s, marginal, large.describe_actors()


def one_thread_model_rate(
    weights: str, precision: str, batch: int = 32, seconds: float = 5.0
) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(weights)
        mapper = Fc7Mapper(loaded, torch.device("cpu"), precision)
        p = loaded.preprocessing
        crops = torch.randint(0, 256, (batch, p.channels, p.crop, p.crop), dtype=torch.uint8)
        mapper(crops)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            mapper(crops)
            done += batch
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def one_core_decode_rate(folder: Path, weights: str) -> float:
    paths, _ = find_images(folder)
    batch = {
        "key": np.arange(len(paths)),
        "path": np.asarray([str(p) for p in paths], dtype=object),
        "tar": np.asarray([""] * len(paths), dtype=object),
        "offset": np.full(len(paths), -1),
        "length": np.full(len(paths), -1),
        "mtime_ns": np.full(len(paths), -1),
        "part": np.zeros(len(paths), dtype=np.int64),
    }
    preprocessing = load_model(weights).preprocessing.to_dict()
    start = time.perf_counter()
    decode_batch(batch, preprocessing, 175.0)
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    precision = choose_precision(args.precision, "cpu")
    import ray

    lines = [f"Machine: {machine()}"]
    print(lines[0], flush=True)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    best: dict[str, tuple[float, float]] = {}
    spread: dict[str, str] = {}  # the best round's actor line per engine
    with tempfile.TemporaryDirectory(prefix="retrieve-scale-") as tmp:
        folder = Path(tmp) / "images"
        sample(args.data.resolve(), args.limit, folder)
        source = Source.parse(folder)
        count = len(find_images(folder)[0])
        lines.append(
            f"Data: {count} JPEGs from {args.data.name}; weights {args.weights}, {precision}"
        )
        local = ExtractOptions(precision=precision)
        small_folder = Path(tmp) / "small"
        sample(args.data.resolve(), SMALL_RUN, small_folder)
        small = Source.parse(small_folder)
        for round_ in range(args.rounds):
            runs: dict[str, tuple[float, float, str]] = {}
            base = Path(tmp) / f"round-{round_}"
            runs["local engine (1 process, every core)"] = marginal_rate(
                partial(extract_locally, small, args.weights, base / "local-small", local),
                partial(extract_locally, source, args.weights, base / "local", local),
            )
            for actors in (1, 2):
                options = RayOptions(
                    actors=actors, batch_size=32, part_files=count, precision=precision
                )
                runs[f"ray, {actors} model actor{'s' * (actors > 1)}"] = marginal_rate(
                    partial(
                        extract_with_ray, small, args.weights, base / f"ray{actors}-s", options
                    ),
                    partial(extract_with_ray, source, args.weights, base / f"ray{actors}", options),
                )
            for name, (whole, steady, actors) in runs.items():
                old = best.get(name, (0.0, 0.0))
                if whole > old[0]:
                    spread[name] = actors
                best[name] = (max(old[0], whole), max(old[1], steady))
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{k}: {w:.1f} ({s:.1f} marginal)" for k, (w, s, _) in runs.items()),
                flush=True,
            )
        per_actor = one_thread_model_rate(args.weights, precision)
        per_core = one_core_decode_rate(folder, args.weights)
    ray.shutdown()
    one, two = best["ray, 1 model actor"], best["ray, 2 model actors"]
    lines += [
        "",
        "| engine | images/s, whole run | images/s, marginal (fixed cost taken out) |",
        "|---|---:|---:|",
        *(f"| {name} | {w:.1f} | {s:.1f} |" for name, (w, s) in best.items()),
        f"| ceiling: model on 1 torch thread (per CPU actor) | {per_actor:.1f} | |",
        f"| ceiling: decoder on 1 core (per decode task) | {per_core:.1f} | |",
        "",
        f"2 actors / 1 actor: {two[0] / one[0]:.2f}x whole run, {two[1] / one[1]:.2f}x marginal "
        f"(floor 1.6x on {args.num_cpus} logical CPUs); best of {args.rounds} rounds.",
        "How the best whole runs spread (busy = model seconds / the run's wall clock):",
        *(f"- {name}: {line}" for name, line in spread.items() if line),
        f"Load average at the end: {os.getloadavg()[0]:.1f}",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
