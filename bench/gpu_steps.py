"""The steps of ``bench/gpu_check.py``, one function each; each returns its part of the JSON.

``GPU_CHECK_SMOKE=1`` runs them on the CPU at toy sizes: it checks this code, not the GPU
(``tests/test_gpu_check.py``), so a typo here does not cost a run of the GPU machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
IMAGES = 8 if SMOKE else 512  # for the decode step
BATCH = 4 if SMOKE else 128
SEARCH_ROWS, SEARCH_DIM = (4096, 4096) if SMOKE else (1_000_000, 4096)


def features(ctx: dict, ordering: str):
    """fc7 of the decode step's images through the CUDA runner, and the summed stage times."""
    import numpy as np

    from retrieval.extraction.cuda import extract_on_device
    from retrieval.extraction.types import ExtractOptions, StageTimes

    options = ExtractOptions(device=DEVICE, batch_size=ctx["batch"], workers=8)
    batches = list(
        extract_on_device(ctx["paths"], ctx["loaded"], ctx["mapper"], options, ordering=ordering)
    )
    times = StageTimes()
    for batch in batches:
        times.add(batch.times)
    return np.concatenate([b.features for b in batches]), times


def worst_relative(a, b) -> float:
    import numpy as np

    norms = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return float((np.linalg.norm(a - b, axis=1) / norms).max())


def decode_context(data: str) -> dict:
    import torch

    from retrieval.extraction.mapper import Fc7Mapper
    from retrieval.images.walk import find_images
    from retrieval.model.weights import load_model

    paths, _ = find_images(Path(data))
    paths = paths[:: max(1, len(paths) // IMAGES)][:IMAGES]
    loaded = load_model("random")
    return {
        "paths": paths,
        "loaded": loaded,
        "batch": BATCH,
        "mapper": Fc7Mapper(loaded, torch.device(DEVICE)),
    }


BLOCKING = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1] + "/bench")
from gpu_steps import decode_context, features
np.save(sys.argv[3], features(decode_context(sys.argv[2]), "streams")[0])
"""


def step_decode(data: str, limit: float) -> dict:
    import warnings

    import numpy as np
    import torch

    deadline = time.perf_counter() + limit - 5
    ctx = decode_context(data)
    reference, times = features(ctx, "sync")
    out: dict = {
        "images": len(ctx["paths"]),
        "decoded": {
            "gpu": times.gpu_decoded,
            "cpu": times.cpu_decoded,
            "cpu_after_gpu_failure": times.gpu_fallback,
            "skipped": times.skipped,
        },
    }
    problems = []
    if times.gpu_fallback or not times.gpu_decoded:
        problems.append("nvjpeg did not decode the JPEGs (see decoded)")
    # Blocking launches in a second process first: it costs a process start, so it gets the
    # time while there is most of it.
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "blocking.npy"
        argv = [sys.executable, "-c", BLOCKING, str(ROOT), data, str(target)]
        env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
        try:  # the race and the rerun still run if this process does not finish in time
            budget = max(5, (deadline - time.perf_counter()) / 2)
            subprocess.run(argv, env=env, check=True, timeout=budget, capture_output=True)
            out["launch_blocking_worst_relative"] = worst_relative(np.load(target), reference)
        except (subprocess.SubprocessError, OSError) as error:
            out["launch_blocking_worst_relative"] = f"not measured: {type(error).__name__}"
    again, _ = features(ctx, "streams")
    out["rerun_bitwise_equal"] = bool(np.array_equal(again, reference))
    out["rerun_worst_relative"] = worst_relative(again, reference)
    for ordering in ("streams", "none"):
        runs = corrupted = 0
        worst = 0.0
        while runs < (1 if SMOKE else 20) and time.perf_counter() < deadline - 8:
            diff = worst_relative(features(ctx, ordering)[0], reference)
            corrupted, worst, runs = corrupted + (diff > 1e-3), max(worst, diff), runs + 1
        out[f"race_{ordering}"] = {"runs": runs, "corrupted": corrupted, "worst_relative": worst}
    if out["race_streams"]["corrupted"]:
        problems.append("the streams ordering corrupts")
    if out["rerun_worst_relative"] > 1e-3:
        problems.append("a rerun differs")
    if DEVICE == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                features(ctx, "streams")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        out["syncs_per_batch"] = len(syncs) / -(-len(ctx["paths"]) // ctx["batch"])
    if problems:
        out["status"] = "FAILED: " + "; ".join(problems)
    out["summary"] = (
        f"{out['decoded']['gpu']} on GPU, {out['decoded']['cpu_after_gpu_failure']} fell back; "
        f"race: streams {out['race_streams']['corrupted']}/{out['race_streams']['runs']}, "
        f"none {out['race_none']['corrupted']}/{out['race_none']['runs']} corrupted; "
        f"rerun equal: {out['rerun_bitwise_equal']}"
    )
    return out


def _run(argv: list[str], limit: float, log: Path) -> tuple[int, str]:
    """Run ``argv`` with its output streamed to ``log`` (a timeout keeps what it printed)."""
    with log.open("w") as sink:
        try:
            done = subprocess.run(
                argv, stdout=sink, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT
            )
            status = done.returncode
        except subprocess.TimeoutExpired:
            status = -1
    return status, log.read_text(errors="replace")


def step_pytest(out: Path, limit: float) -> dict:
    files = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "tests").glob("test_*.py"))
        if "mark.cuda" in p.read_text(encoding="utf-8")
    ]
    argv = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", *files]
    status, text = _run(argv, limit - 5, out / "pytest_cuda.log")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text[-400:])}
    failed = re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)", text, re.M)
    record = {"exit": status, "counts": counts, "failed": failed[:20], "tail": text[-1500:]}
    if status == -1:
        record["status"] = "timed out"
    elif status != 0 or counts.get("skipped"):
        record["status"] = "failed" if status else "FAILED: CUDA tests skipped on a GPU"
    record["summary"] = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary line"
    return record


def step_extract(data: str, out: Path, limit: float) -> dict:
    size = "16" if SMOKE else "1500"
    argv = [sys.executable, "bench/extract.py", "--device", DEVICE, "--data", data, "--limit"]
    argv += [size, "--rounds", "1", "--queries", "10", "--out", str(out / "extract.md")]
    status, text = _run(argv, limit - 5, out / "extract.log")
    rates = {
        name.strip(): float(rate)
        for name, rate in re.findall(r"^\| ([^|]+) \| ([\d.]+) \|", text, re.M)
    }
    record = {"exit": status, "images_per_s": rates, "tail": text[-1500:]}
    if status != 0:
        record["status"] = "timed out" if status == -1 else "failed"
    end_to_end = {k: v for k, v in rates.items() if k.startswith("(c)")}
    model = {k: v for k, v in rates.items() if k.startswith("ceiling: model")}
    record["summary"] = "; ".join(f"{k}: {v:,.0f}/s" for k, v in {**end_to_end, **model}.items())
    return record


def step_model_compiled(limit: float) -> dict:
    import torch

    from bench.extract import model_ceiling
    from retrieval.extraction.types import GPU_BATCH

    rate = model_ceiling(
        "random",
        torch.device(DEVICE),
        "bf16",
        BATCH if SMOKE else GPU_BATCH,
        seconds=1.0 if SMOKE else 4.0,
        compiled=True,
    )
    return {"images_per_s": rate, "summary": f"bf16 compiled: {rate:,.0f}/s (goal >= 80,000)"}


def step_search(limit: float) -> dict:
    import numpy as np
    import torch

    from retrieval.indexes.gpu import TorchExactSearcher

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    database = torch.empty((SEARCH_ROWS, SEARCH_DIM), dtype=torch.float16, device=DEVICE)
    for start in range(0, SEARCH_ROWS, 65_536):  # fc7 is non-negative (a ReLU's output)
        part = database[start : start + 65_536]
        part.copy_(torch.rand(part.shape, generator=generator, device=DEVICE))
    noise = 0.01 * torch.rand((1000, SEARCH_DIM), generator=generator, device=DEVICE)
    queries = (database[:1000].float() + noise).cpu().numpy()
    searcher = TorchExactSearcher(database, device=DEVICE, precision="float16")
    del database
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    searcher.search(queries[:10], 10)  # warm-up
    start = time.perf_counter()
    _, rows = searcher.search(queries, 10)
    batch_s = time.perf_counter() - start
    singles = []
    for query in queries[:50]:
        start = time.perf_counter()
        searcher.search(query[None], 10)
        singles.append(time.perf_counter() - start)
    found = float(np.mean(rows[:, 0] == np.arange(1000)))
    record = {
        "rows": SEARCH_ROWS,
        "dim": SEARCH_DIM,
        "precision": "float16",
        "batch_1000_s": batch_s,
        "single_median_ms": 1e3 * float(np.median(singles)),
        "self_found": found,
    }
    if found < 0.99:
        record["status"] = "FAILED: queries did not find their own rows"
    record["summary"] = (
        f"1,000 queries {batch_s:.3f} s (goal < 1 s), single {record['single_median_ms']:.1f} ms,"
        f" self found {found:.3f}"
    )
    return record


def step_ivfpq(limit: float) -> dict:
    import numpy as np

    from retrieval.indexes import gpu

    if gpu.faiss_gpu_count() == 0:
        return {
            "status": "skipped",
            "summary": "faiss here is the CPU build: a faiss GPU wheel "
            "cannot travel to this machine (64 MiB carried)",
        }
    import faiss

    rng = np.random.default_rng(0)
    database = rng.random((200_000, SEARCH_DIM), dtype=np.float32)
    index = faiss.index_factory(SEARCH_DIM, "IVF1024,PQ64")
    on_gpu = gpu.faiss_index_to_gpu(index)
    on_gpu.train(database[:65_536])
    on_gpu.add(database)
    on_gpu.nprobe = 32
    queries = database[:1000] + 0.01 * rng.random((1000, SEARCH_DIM), dtype=np.float32)
    start = time.perf_counter()
    _, rows = on_gpu.search(queries, 10)
    batch_s = time.perf_counter() - start
    found = float(np.mean(rows[:, 0] == np.arange(1000)))
    return {
        "rows": len(database),
        "batch_1000_s": batch_s,
        "self_found": found,
        "summary": f"200k rows, 1,000 queries {batch_s:.3f} s, self found {found:.3f}",
    }


def step_train(data: str, out: Path, limit: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cli = "from retrieval.cli.main import cli; cli()"
        argv = [sys.executable, "-c", cli, "train", data, "-o", str(Path(tmp) / "m.pt")]
        steps = "3" if SMOKE else "300"
        argv += ["--recipe", "paper", "--image-size", "64" if SMOKE else "224", "--steps", steps]
        argv += ["--max-steps", steps, "--device", DEVICE, "--json"]
        status, text = _run(argv, limit - 5, out / "train.log")
    record: dict = {"exit": status, "tail": text[-1500:]}
    if status != 0:
        record["status"] = "timed out" if status == -1 else "failed"
        return record
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        return {**record, "status": "failed", "summary": "no JSON line"}
    result = record["json"] = json.loads(lines[-1])
    seconds, batch = result["seconds"], result["recipe"]["batch_size"]
    record["images_per_s"] = int(steps) * batch / seconds
    record["summary"] = (
        f"{steps} steps of {batch} in {seconds:.1f} s (set-up and data loading included): "
        f"{record['images_per_s']:,.0f} images/s"
    )
    return record
