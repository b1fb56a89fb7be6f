"""Indexing speed in one run: the naive way, a plain DataLoader, ``retrieve index``, and ceilings.

    python bench/extract.py [--limit 1000] [--photo-size] [--rounds 2] [--out FILE.md]

(a) naive: what img2vec and most tutorials do: PIL open, torchvision transforms, the model on one
    image at a time under ``no_grad``;
(b) a plain ``DataLoader`` with batches (PIL + transforms in workers, float tensors across
    processes, fp32, default layout);
(c) ``retrieve index``: the real pipeline, ``retrieval.build.index_folder`` into a fresh Flat
    index, timed whole (walk, model load, extraction, commit).
Every method is timed whole: (a) and (b) from loading the model to the last feature, as a
script doing that work would run. Ceilings: decode-only (read + decode + resize/crop, every
core decoding, no model) and model-only (synthetic uint8 crops already on the device). Each
method runs ``--rounds`` times, interleaved, and the best round counts: on a shared machine that
is the least disturbed one.
The neighbours (top 6, self excluded) of sampled queries in (c)'s index are checked against
brute force on (a)'s features. The default weights are random (same FLOPs as ImageNet's; this
machine is offline): speed does not depend on the values, agreement is measured on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import Index, IndexOptions, IndexReport, IndexSpec
from retrieval.devices import fast_bf16, resolve_device, torch_threads
from retrieval.extraction.cpu import (
    _collate,
    _Files,
    default_threads,
    default_workers,
)
from retrieval.extraction.mapper import Fc7Mapper
from retrieval.extraction.types import CPU_BATCH, GPU_BATCH, ExtractOptions
from retrieval.images.decode import DEFAULT_MAX_MEGAPIXELS
from retrieval.images.walk import find_images
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import load_model

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "imagenette2-224"
)
K = 6


def machine(device: torch.device) -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    names = [
        line.split(":", 1)[1].strip()
        for line in cpuinfo.splitlines()
        if line.startswith("model name")
    ]
    cpu = names[0] if names else platform.processor() or "unknown CPU"
    extras = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni") if f in cpuinfo]
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none used"
    return (
        f"CPU {cpu} ({len(os.sched_getaffinity(0))} cores; {', '.join(extras) or 'no bf16'}), "
        f"GPU {gpu}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at start"
    )


def sample(root: Path, limit: int) -> list[Path]:
    """``limit`` images spread evenly over the sorted folder (so over every class)."""
    found, _ = find_images(root)
    if not found:
        raise SystemExit(f"no images under {root}")
    step = max(1, len(found) // limit)
    return found[::step][:limit]


def link_folder(paths: list[Path], folder: Path) -> None:
    for i, path in enumerate(paths):
        target = folder / path.parent.name / f"{i:05d}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())


def photo_sized(paths: list[Path], folder: Path) -> list[Path]:
    """~500x375 JPEGs made from the sample: a typical web photo, larger than the crop."""
    made = []
    for i, path in enumerate(paths):
        target = folder / path.parent.name / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(
                target, quality=90
            )
        made.append(target)
    return made


def transform(loaded) -> T.Compose:
    p = loaded.preprocessing
    return T.Compose(
        [
            T.Resize(p.resize, antialias=True),
            T.CenterCrop(p.crop),
            T.ToTensor(),
            T.Normalize(p.mean, p.std),
        ]
    )


def naive(
    paths: list[Path], weights: str, device: torch.device, threads: int | None = None
) -> tuple[float, np.ndarray]:
    with torch_threads(threads):
        start = time.perf_counter()  # timed whole, as (c) is: the model load included
        loaded = load_model(weights, device=device)
        prepare, rows = transform(loaded), []
        with torch.no_grad():
            for path in paths:
                x = prepare(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
                rows.append(loaded.model.forward_fc7(x).cpu().numpy()[0])
        return len(paths) / (time.perf_counter() - start), np.stack(rows)


class _Plain(Dataset):
    def __init__(self, paths: list[Path], prepare: T.Compose) -> None:
        self.paths, self.prepare = paths, prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.prepare(Image.open(self.paths[i]).convert("RGB"))


def plain_loader(
    paths: list[Path], weights: str, device: torch.device, workers: int, batch: int
) -> float:
    # Timed whole, as (c) is: loading the model, starting the workers, the loop.
    start = time.perf_counter()
    loaded = load_model(weights, device=device)
    loader = DataLoader(
        _Plain(paths, transform(loaded)),
        batch_size=batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    with torch.no_grad():
        for x in loader:
            loaded.model.forward_fc7(x.to(device)).cpu()
    return len(paths) / (time.perf_counter() - start)


def int8_mapper(loaded, device: torch.device) -> Fc7Mapper:
    """The fp32 mapper with fc6 and fc7 dynamically quantised to int8 (CPU only). Only this
    benchmark uses it: measured no faster end to end and it reorders neighbours, so the tool
    does not offer it."""
    import copy
    import warnings

    from torch import nn

    mapper = Fc7Mapper(loaded, device, "fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantisation is deprecated
        head = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(mapper.module.head), {nn.Linear}, dtype=torch.qint8
        )
    mapper.module.head = head  # the mapper's classify step runs it (no fold: not nn.Linear)
    return mapper


def retrieve_index(
    folder: Path, index_dir: Path, weights: str, extract: ExtractOptions
) -> tuple[float, IndexReport]:
    """The real pipeline, timed whole; int8 runs it with the quantised mapper (recorded fp32)."""
    from retrieval.build.run import index_folder
    from retrieval.extraction.embedder import Embedder

    int8 = extract.precision == "int8"
    extract = replace(extract, precision="fp32") if int8 else extract
    options = IndexOptions(weights=weights, spec=IndexSpec("Flat"), extract=extract, rebuild=True)
    start = time.perf_counter()
    embedder = None
    if int8:
        embedder = Embedder(load_model(weights), "fp32", extract)
        embedder.mapper = int8_mapper(embedder.loaded, resolve_device(extract.device))
    report = index_folder(folder, index_dir, options, embedder=embedder)
    return report.count / (time.perf_counter() - start), report


def agreement(
    index_dir: Path, queries: list[Path], expected: list[list[str]], extract: ExtractOptions
) -> tuple[float, float]:
    """Share of the exact top-6 found, and share of queries whose top-6 list is identical."""
    if extract.precision == "int8":
        from retrieval.extraction import extract_images

        with Index.open(index_dir) as ix:
            fp32 = replace(extract, precision="fp32")
            mapper = int8_mapper(ix.model, resolve_device(extract.device))
            features, _ = extract_images(queries, ix.model, fp32, mapper)
            names = [os.path.abspath(q) for q in queries]
            results = ix.search(features, K + 1, names=names)
        for result in results:  # leave each query out of its own list, as exclude_self does
            result.neighbors = [n for n in result.neighbors if n.path != result.query][:K]
    else:
        with Index.open(index_dir, extract=extract) as ix:
            results = ix.search(queries, K, exclude_self=True)
    found = [[os.path.abspath(n.path) for n in r.neighbors] for r in results]
    overlap = np.mean([len(set(f) & set(e)) / K for f, e in zip(found, expected, strict=True)])
    same = np.mean([f == e for f, e in zip(found, expected, strict=True)])
    return float(overlap), float(same)


def decode_ceiling(paths: list[Path], loaded, batch: int) -> float:
    workers = len(os.sched_getaffinity(0))
    files = _Files(paths, loaded.preprocessing, DEFAULT_MAX_MEGAPIXELS)
    loader = DataLoader(files, batch_size=batch, num_workers=workers, collate_fn=_collate)
    start = time.perf_counter()
    count = sum(0 if pixels is None else len(pixels) for _, pixels, _ in loader)
    return count / (time.perf_counter() - start)


class _NoModel:
    """Stands in for the mapper: the CUDA runner then measures reading, nvjpeg, resize, crop."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.out_features = device, 4096

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.zeros((crops.shape[0], self.out_features), device=crops.device)


def device_decode_ceiling(paths: list[Path], loaded, device: torch.device, batch: int) -> float:
    """Reader threads + nvjpeg + resize/crop on the GPU, as ``retrieve index`` runs them."""
    from retrieval.extraction.cuda import extract_on_device

    options = ExtractOptions(device=str(device), batch_size=batch)
    start = time.perf_counter()
    count = sum(
        len(b.features) for b in extract_on_device(paths, loaded, _NoModel(device), options)
    )
    return count / (time.perf_counter() - start)


def model_ceiling(
    weights: str,
    device: torch.device,
    precision: str,
    batch: int,
    threads: int | None = None,
    seconds: float = 4.0,
    compiled: bool = False,
) -> float:
    # The mapper applies the pipeline's own numeric policy (fixed shapes, IEEE fp32 on CUDA).
    with torch_threads(threads):
        return _model_ceiling(weights, device, precision, batch, seconds, compiled)


def _model_ceiling(
    weights: str, device: torch.device, precision: str, batch: int, seconds: float, compiled: bool
) -> float:
    if precision == "int8":
        mapper = int8_mapper(load_model(weights), device)
    else:
        mapper = Fc7Mapper(load_model(weights), device, precision, compile=compiled)
    p = mapper.preprocessing
    crops = torch.randint(
        0,
        256,
        (batch, p.channels, p.crop, p.crop),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    ).to(device)
    mapper(crops)  # warm-up: kernel choice, oneDNN primitives, compilation (not timed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        mapper(crops)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done += batch
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--photo-size", action="store_true")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument(
        "--precisions",
        default=None,
        help="(c) variants, e.g. fp32,bf16,int8 [default: all on CPU (bf16 only where native), "
        "fp32,bf16 on CUDA]",
    )
    parser.add_argument(
        "--compiled", action="store_true", help="also the model-only ceiling, torch.compile'd"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    lines = [f"Machine: {machine(device)}"]
    if args.precisions:
        precisions = args.precisions.split(",")
    elif not fast_bf16(device):
        precisions = ["fp32", "int8"]
        lines.append("bf16: not measured (no native bf16 on this CPU: emulated, ~6x slower)")
    else:
        precisions = ["fp32", "bf16", "int8"] if cpu else ["fp32", "bf16"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="retrieve-bench-") as tmp:
        tmp = Path(tmp)
        paths = sample(args.data.resolve(), args.limit)
        folder = tmp / "images"
        if args.photo_size:
            paths = photo_sized(paths, folder)
        else:
            link_folder(paths, folder)
        paths, _ = find_images(folder)  # (c)'s order, so rows line up
        what = "500x375 JPEGs made from" if args.photo_size else "JPEGs from"
        lines.append(
            f"Data: {len(paths)} {what} {args.data.name}; weights {args.weights} "
            f"({'random: same FLOPs, offline machine' if args.weights == 'random' else ''})"
        )
        extract = ExtractOptions(device=str(device))
        # A fair baseline on a GPU decodes in worker processes too (0 workers starves the GPU).
        if cpu:  # as many decoders as the pipeline itself would start for these files
            workers = default_workers(paths, Preprocessing(), DEFAULT_MAX_MEGAPIXELS)
        else:
            workers = min(8, len(os.sched_getaffinity(0)))
        batch = CPU_BATCH if cpu else GPU_BATCH
        best: dict[str, float] = {}
        reports: dict[str, IndexReport] = {}
        features = None
        for round_ in range(args.rounds):
            rate, found = naive(paths, args.weights, device)
            features = found if features is None else features
            runs = {"a": rate}
            if cpu and len(os.sched_getaffinity(0)) > 1:
                runs["a1"] = naive(paths, args.weights, device, threads=1)[0]
            runs["b"] = plain_loader(paths, args.weights, device, workers, batch)
            for precision in precisions:
                index_dir = tmp / f"index-{precision}"
                runs[f"c-{precision}"], reports[precision] = retrieve_index(
                    folder, index_dir, args.weights, replace(extract, precision=precision)
                )
            for name, rate in runs.items():
                best[name] = max(best.get(name, 0.0), rate)
            print(
                f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs.items()),
                flush=True,
            )
        loaded = load_model(args.weights)
        if cpu:
            best["decode"] = decode_ceiling(paths, loaded, batch)
        else:
            device_decode_ceiling(paths[:batch], loaded, device, batch)  # warm-up: nvjpeg handles
            best["decode"] = device_decode_ceiling(paths, loaded, device, batch)
        thread_counts = sorted({1, default_threads()}) if cpu else [None]
        model_rates = {
            (p, t): model_ceiling(args.weights, device, p, batch, t)
            for p in precisions
            for t in thread_counts
        }
        if args.compiled:  # the fastest precision only: each compilation takes tens of seconds
            p = "bf16" if "bf16" in precisions else precisions[0]
            model_rates[(f"{p} compiled", thread_counts[-1])] = model_ceiling(
                args.weights, device, p, batch, thread_counts[-1], compiled=True
            )
        rng = np.random.default_rng(0)
        picked = sorted(rng.choice(len(paths), min(args.queries, len(paths)), replace=False))
        squared = (features**2).sum(1)
        distances = squared[picked, None] + squared[None, :] - 2 * features[picked] @ features.T
        distances[np.arange(len(picked)), picked] = np.inf
        order = np.argsort(distances, axis=1, kind="stable")[:, :K]
        expected = [[str(paths[j]) for j in row] for row in order]
        queries = [paths[i] for i in picked]
        checks = {
            p: agreement(tmp / f"index-{p}", queries, expected, replace(extract, precision=p))
            for p in precisions
        }
    lines += table(best, model_rates, checks, reports, workers, batch, len(picked))
    lines.append(f"Load average at the end: {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


def model_rates_on_cpu(model_rates: dict) -> bool:
    return all(threads is not None for _, threads in model_rates)


def table(best, model_rates, checks, reports, workers, batch, n_queries) -> list[str]:
    a, b = best["a"], best["b"]
    threads = torch.get_num_threads()
    rows = [
        "",
        "| method | images/s | c/a | c/b | top-6 vs (a) |",
        "|---|---:|---:|---:|---|",
        f"| (a) naive: PIL + transforms + model one image at a time ({threads} torch threads) "
        f"| {a:.1f} | | | |",
    ]
    if "a1" in best:
        rows.append(f"| (a') the same with 1 torch thread | {best['a1']:.1f} | | | |")
    rows.append(
        f"| (b) plain DataLoader: batch {batch}, {workers} workers, {threads} torch threads "
        f"| {b:.1f} | | | |"
    )
    for precision, (overlap, same) in checks.items():
        c = best[f"c-{precision}"]
        name = "retrieve index" + {
            "fp32": "",
            "int8": ", int8 mapper (bench only, not offered)",
        }.get(precision, f" --precision {precision}")
        rows.append(
            f"| (c) {name} | {c:.1f} | {c / a:.2f}x | {c / b:.2f}x | overlap "
            f"{overlap:.3f}, identical lists {same:.0%} |"
        )
    cores = len(os.sched_getaffinity(0))
    how = f"{cores} worker processes" if model_rates_on_cpu(model_rates) else "reader threads + GPU"
    rows.append(
        f"| ceiling: decode only (read+decode+resize/crop, {how}) | {best['decode']:.1f} | | | |"
    )
    for (precision, count), rate in model_rates.items():
        where = f"{count} torch thread{'s' * (count != 1)}" if count else "synthetic crops on GPU"
        rows.append(f"| ceiling: model only, {precision}, {where} | {rate:.1f} | | | |")
    times = reports["fp32"].times
    stages = ", ".join(
        f"{k} {times.get(k, 0):.1f}s" for k in ("read", "decode", "preprocess", "model", "write")
    )
    rows += [
        "",
        f"top-6 neighbours of {n_queries} sampled queries (self excluded) in (c)'s index against "
        "brute force on (a)'s features; each method's best round counts.",
        f"(c) fp32 stage busy times in its last round: {stages}; wall {times.get('wall', 0):.1f}s",
    ]
    if "a1" in best:
        rows.append(
            f"c/a' (fp32 against the naive way on 1 thread): {best['c-fp32'] / best['a1']:.2f}x"
        )
    return rows


if __name__ == "__main__":
    main()
