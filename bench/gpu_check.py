"""Everything GPU-side in one run of a few minutes: correctness first, then throughput.

    python bench/gpu_check.py --data DIR --out DIR [--budget 450]     (bench/gpu_check.sh runs it)

Steps, in order, each with its own time limit; a step that fails or runs out of time is
recorded as such and the next one runs:

1. decode race: the pipelined CUDA runner ``--race-runs`` times with nvjpeg unordered (the old
   code), ordered by streams (the fix) and synchronised (the reference); a run is corrupted when
   a row's fc7 differs from the reference by more than 1e-3 relative L2;
2. determinism: the same features twice, and once more in a process with CUDA_LAUNCH_BLOCKING=1;
3. synchronisations per batch in the CUDA runner (``torch.cuda.set_sync_debug_mode("warn")``);
4. ``pytest -m cuda``;
5. ``bench/extract.py --device cuda`` on the data (end to end with nvjpeg; model-only fp32,
   bf16 and compiled);
6. exact search over 1,000,000 synthetic 4096-d fc7 rows (fp16 and fp32; 1,000 queries at once
   and single queries), and an IVF-PQ index on the GPU if faiss has GPUs;
7. 300 training steps at 224 px (images/s).

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` after every step, so a run cut
short still leaves what it measured. ``--smoke`` runs every step on the CPU with tiny sizes: it
checks this script, not the GPU (the shell wrapper refuses to start without one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.extraction.cuda import extract_on_device  # noqa: E402
from retrieval.extraction.mapper import Fc7Mapper  # noqa: E402
from retrieval.extraction.types import ExtractOptions  # noqa: E402
from retrieval.images.walk import find_images  # noqa: E402
from retrieval.model.weights import load_model  # noqa: E402


class Check:
    """Results so far, written out after every step."""

    def __init__(self, out: Path, budget: float, smoke: bool) -> None:
        self.out, self.budget, self.smoke = out, budget, smoke
        self.started = time.perf_counter()
        self.results: dict = {"machine": machine(), "steps": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def step(self, name: str, limit: float, run: Callable[[float], dict]) -> None:
        limit = min(limit, self.left())
        record: dict = {"limit_s": round(limit, 1)}
        start = time.perf_counter()
        if limit < 5:
            record.update(status="not run", why="out of time")
        else:
            try:
                record.update(run(limit))
                record.setdefault("status", "ok")
            except Exception as exc:  # one step's failure must not hide the others' numbers
                record.update(status="failed", why=f"{type(exc).__name__}: {exc}")
                record["trace"] = traceback.format_exc(limit=4)
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.results["steps"][name] = record
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s", flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.results))


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    return info


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {json.dumps(results['machine'])}",
        "",
        "| step | status | seconds | result |",
    ]
    lines.append("| --- | --- | --- | --- |")
    for name, record in results["steps"].items():
        shown = {k: v for k, v in record.items() if k not in ("status", "seconds", "trace")}
        lines.append(
            f"| {name} | {record['status']} | {record['seconds']} | `{json.dumps(shown)}` |"
        )
    return "\n".join(lines) + "\n"


def features(paths, loaded, mapper, batch: int, ordering: str) -> np.ndarray:
    options = ExtractOptions(device=str(mapper.device), batch_size=batch, workers=8)
    runs = extract_on_device(paths, loaded, mapper, options, ordering=ordering)
    return np.concatenate([b.features for b in runs])


def worst_relative(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return float((np.linalg.norm(a - b, axis=1) / norms).max())


def race(ctx: dict, runs: int) -> Callable[[float], dict]:
    def run(limit: float) -> dict:
        paths, loaded, mapper, batch = ctx["paths"], ctx["loaded"], ctx["mapper"], ctx["batch"]
        reference = features(paths, loaded, mapper, batch, "sync")
        out: dict = {"images": len(paths), "runs_each": runs}
        deadline = time.perf_counter() + limit * 0.9
        for ordering in ("none", "streams"):
            corrupted = done = 0
            worst = 0.0
            for _ in range(runs):
                if time.perf_counter() > deadline:
                    break
                diff = worst_relative(features(paths, loaded, mapper, batch, ordering), reference)
                corrupted += diff > 1e-3
                worst, done = max(worst, diff), done + 1
            out[ordering] = {"runs": done, "corrupted": corrupted, "worst_relative": worst}
        out["status"] = "ok" if out["streams"]["corrupted"] == 0 else "FAILED: fix corrupts"
        return out

    return run


BLOCKING = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1] + "/bench")
from gpu_check import setup, features
ctx = setup(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
np.save(sys.argv[5], features(ctx["paths"], ctx["loaded"], ctx["mapper"], ctx["batch"], "streams"))
"""


def determinism(ctx: dict, data: str, images: int, smoke: bool) -> Callable[[float], dict]:
    def run(limit: float) -> dict:
        paths, loaded, mapper, batch = ctx["paths"], ctx["loaded"], ctx["mapper"], ctx["batch"]
        first = features(paths, loaded, mapper, batch, "streams")
        second = features(paths, loaded, mapper, batch, "streams")
        target = Path(ctx["tmp"]) / "blocking.npy"
        env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
        argv = [sys.executable, "-c", BLOCKING, str(ROOT), data, str(images), str(int(smoke))]
        subprocess.run([*argv, str(target)], env=env, check=True, timeout=limit * 0.8)
        blocking = np.load(target)
        return {
            "rerun_worst_relative": worst_relative(second, first),
            "rerun_bitwise_equal": bool(np.array_equal(first, second)),
            "launch_blocking_worst_relative": worst_relative(blocking, first),
        }

    return run


def sync_count(ctx: dict) -> Callable[[float], dict]:
    def run(limit: float) -> dict:
        if not torch.cuda.is_available():
            return {"status": "skipped", "why": "no CUDA (smoke run)"}
        paths, loaded, mapper, batch = ctx["paths"], ctx["loaded"], ctx["mapper"], ctx["batch"]
        features(paths[: 2 * batch], loaded, mapper, batch, "streams")  # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                features(paths, loaded, mapper, batch, "streams")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where: dict[str, int] = {}
        for w in syncs:
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
        batches = -(-len(paths) // batch)
        return {"syncs": len(syncs), "batches": batches, "per_batch": len(syncs) / batches,
                "where": where}  # fmt: skip

    return run


def command(argv: list[str], parse_json: bool = False) -> Callable[[float], dict]:
    def run(limit: float) -> dict:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        out: dict = {"exit": done.returncode, "tail": (done.stdout + done.stderr)[-1500:]}
        if parse_json and done.returncode == 0:
            out["json"] = json.loads(done.stdout.strip().splitlines()[-1])
        if done.returncode != 0:
            out["status"] = "failed"
        return out

    return run


def search(rows: int, dim: int, device: str) -> Callable[[float], dict]:
    def run(limit: float) -> dict:
        from retrieval.indexes import gpu

        generator = torch.Generator(device=device).manual_seed(0)
        database = torch.rand((rows, dim), generator=generator, device=device)
        queries = database[:1000] + 0.01 * torch.rand(
            (1000, dim), generator=generator, device=device
        )
        queries = queries.cpu().numpy()
        out: dict = {"rows": rows, "dim": dim}
        answers = {}
        for precision in ("float16", "float32"):
            searcher = gpu.TorchExactSearcher(database, device=device, precision=precision)
            searcher.search(queries[:10], 10)  # warm-up
            start = time.perf_counter()
            _, answers[precision] = searcher.search(queries, 10)
            batch_s = time.perf_counter() - start
            singles = []
            for q in queries[:50]:
                start = time.perf_counter()
                searcher.search(q[None], 10)
                singles.append(time.perf_counter() - start)
            out[precision] = {
                "batch_1000_s": batch_s,
                "single_median_ms": 1e3 * float(np.median(singles)),
                # the queries are rows plus a little noise: each must find its own row first
                "self_found": float(np.mean(answers[precision][:, 0] == np.arange(1000))),
            }
            del searcher
            if device == "cuda":
                torch.cuda.empty_cache()
        out["ivfpq_gpu"] = ivfpq_on_gpu(database, queries)
        return out

    return run


def ivfpq_on_gpu(database: torch.Tensor, queries: np.ndarray) -> dict:
    from retrieval.indexes import gpu

    if gpu.faiss_gpu_count() == 0:
        return {"status": "skipped", "why": "faiss has no GPUs here (faiss-cpu wheel)"}
    import faiss

    train = database[:100_000].cpu().numpy()
    index = faiss.index_factory(train.shape[1], "IVF1024,PQ64")
    index.train(train)
    index.add(database.cpu().numpy())
    on_gpu = gpu.faiss_index_to_gpu(index)
    on_gpu.nprobe = 16
    start = time.perf_counter()
    on_gpu.search(queries, 10)
    return {"status": "ok", "batch_1000_s": time.perf_counter() - start}


def setup(data: str, images: int, smoke: bool) -> dict:
    paths, _ = find_images(Path(data))
    paths = paths[:: max(1, len(paths) // images)][:images]
    device = torch.device("cpu" if smoke else "cuda")
    loaded = load_model("random")
    mapper = Fc7Mapper(loaded, device)
    import tempfile

    return {"paths": paths, "loaded": loaded, "mapper": mapper, "batch": 16 if smoke else 128,
            "tmp": tempfile.mkdtemp(prefix="gpu-check-")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=430.0, help="seconds for everything")
    parser.add_argument("--race-runs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: tests the script")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing run", file=sys.stderr)
        return 2
    smoke = args.smoke
    images = 32 if smoke else 512
    check = Check(args.out, args.budget, smoke)
    ctx = setup(args.data, images, smoke)
    py = sys.executable
    device = "cpu" if smoke else "cuda"
    check.step("decode_race", 45, race(ctx, 2 if smoke else args.race_runs))
    check.step("determinism", 35, determinism(ctx, args.data, images, smoke))
    check.step("sync_count", 15, sync_count(ctx))
    tests = "tests/test_gpu_search.py" if smoke else "tests/"
    check.step("pytest_cuda", 90, command([py, "-m", "pytest", "-q", "-m", "cuda", "-p",
                                              "no:cacheprovider", tests]))  # fmt: skip
    extract = [py, "bench/extract.py", "--device", device, "--data", args.data, "--rounds", "1",
               "--limit", "64" if smoke else "2000", "--queries", "10",
               "--out", str(args.out / "extract.md")]  # fmt: skip
    if not smoke:
        extract += ["--compiled"]
    check.step("extract", 120, command(extract))
    rows = 20_000 if smoke else 1_000_000
    check.step("exact_search", 45, search(rows, 4096, device))
    cli = "from retrieval.cli.main import cli; cli()"
    train = [py, "-c", cli, "train", args.data, "-o", str(Path(ctx["tmp"]) / "m.pt"),
             "--recipe", "paper", "--image-size", "64" if smoke else "224", "--steps",
             "3" if smoke else "300", "--max-steps", "3" if smoke else "300",
             "--device", device, "--json"]  # fmt: skip
    check.step("train_300_steps", 60, command(train, parse_json=True))
    check.write()
    failed = [n for n, r in check.results["steps"].items() if r["status"] not in ("ok", "skipped")]
    print(f"[gpu_check] done; not ok: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
