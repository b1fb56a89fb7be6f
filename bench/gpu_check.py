"""Everything GPU-side in one run of a few minutes: correctness first, then throughput.

    python bench/gpu_check.py plan                          the steps and their time limits
    python bench/gpu_check.py step NAME --data D --out O    one step -> O/steps/NAME.json
    python bench/gpu_check.py report --out O                O/gpu_check.json and .md

``bench/gpu_check.sh`` runs each step in its own process under ``timeout`` (a step that hangs
loses only itself) and writes the report after each one, so a run cut short still leaves what
it measured; the table marks the steps not reached. Steps, in order (:data:`PLAN`):

1. ``decode``: the decode race (the pipelined CUDA runner, nvjpeg ordered by streams and
   unordered, against a synchronised reference; a run is corrupted when a row's fc7 differs by
   more than 1e-3 relative L2), determinism (the same features twice, and under
   CUDA_LAUNCH_BLOCKING=1), synchronisations per batch, and where the images were decoded (every
   JPEG on the GPU, none on the CPU after an nvjpeg failure);
2. ``pytest_cuda``: every test marked ``cuda`` (``Index(device="cuda")`` included);
3. ``extract``: ``bench/extract.py --device cuda`` (end to end with nvjpeg, fp32 and bf16;
   model-only fp32 and bf16), then ``model_compiled``: model-only bf16, ``torch.compile``'d (its
   own step: a compilation that runs long loses only itself);
4. ``exact_search``: 1,000,000 synthetic 4096-d rows in fp16, 1,000 queries at once and single
   queries, with torch (the GPU search this check can measure: a faiss GPU wheel is hundreds of
   MB and cannot travel to the machine, which takes 64 MiB);
5. ``ivfpq_gpu``: IVF-PQ on the GPU, where the faiss here has GPUs (skipped otherwise);
6. ``train_300_steps``: 300 training steps at 224 px.

Only the standard library is imported at the top: ``plan``, ``mark`` and ``report`` run in
an interpreter that has not yet shown it can import torch.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# (step, seconds): hard limits, 395 s in all; with install and preflight under 7 minutes.
PLAN = [
    ("decode", 60),
    ("pytest_cuda", 110),
    ("extract", 70),
    ("model_compiled", 40),
    ("exact_search", 45),
    ("ivfpq_gpu", 15),
    ("train_300_steps", 55),
]


def write_step(out: Path, name: str, record: dict) -> None:
    (out / "steps").mkdir(parents=True, exist_ok=True)
    target = out / "steps" / f"{name}.json"
    target.with_suffix(".tmp").write_text(json.dumps(record, indent=2, default=str) + "\n")
    target.with_suffix(".tmp").replace(target)


def run_step(name: str, data: str, out: Path, limit: float) -> int:
    import gpu_steps as s  # the steps import torch; plan, mark and report do not

    steps: dict[str, Callable[[], dict]] = {
        "decode": lambda: s.step_decode(data, limit),
        "pytest_cuda": lambda: s.step_pytest(out, limit),
        "extract": lambda: s.step_extract(data, out, limit),
        "model_compiled": lambda: s.step_model_compiled(limit),
        "exact_search": lambda: s.step_search(limit),
        "ivfpq_gpu": lambda: s.step_ivfpq(limit),
        "train_300_steps": lambda: s.step_train(data, out, limit),
    }
    started = time.perf_counter()
    try:
        record = steps[name]()
        record.setdefault("status", "ok")
    except Exception as exc:  # one step's failure must not hide the others' numbers
        record = {
            "status": "failed",
            "summary": f"{type(exc).__name__}: {exc}"[:300],
            "trace": traceback.format_exc(limit=6),
        }
    record.update(limit_s=limit, seconds=round(time.perf_counter() - started, 1))
    write_step(out, name, record)
    print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s", flush=True)
    return 0


# --- the report -----------------------------------------------------------------------------


def machine() -> dict:
    info = {"python": platform.python_version(), "cpu_cores": len(os.sched_getaffinity(0))}
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        info["gpu"] = found.stdout.strip().splitlines()[0] if found.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = None
    return info


def report(out: Path, final: bool) -> dict:
    results: dict = {"machine": machine(), "steps": {}}
    for name, limit in PLAN:
        path = out / "steps" / f"{name}.json"
        if path.exists():
            results["steps"][name] = json.loads(path.read_text())
        else:
            results["steps"][name] = {"status": "not reached", "limit_s": limit}
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"Machine: {json.dumps(results['machine'])}",
        "",
        "| step | status | seconds (limit) | result |",
        "| --- | --- | --- | --- |",
    ]
    for name, record in results["steps"].items():
        seconds = f"{record.get('seconds', '-')} ({record.get('limit_s', '-')})"
        summary = str(record.get("summary", "")).replace("|", "/")
        lines.append(f"| {name} | {record['status']} | {seconds} | {summary} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    if final:
        print("\n".join(lines), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan")
    step = sub.add_parser("step")
    step.add_argument("name", choices=[n for n, _ in PLAN])
    step.add_argument("--data", required=True)
    step.add_argument("--out", type=Path, required=True)
    step.add_argument("--limit", type=float, required=True)
    mark = sub.add_parser("mark", help="record a step the shell had to stop")
    mark.add_argument("name")
    mark.add_argument("--out", type=Path, required=True)
    mark.add_argument("--status", required=True)
    mark.add_argument("--limit", type=float, required=True)
    rep = sub.add_parser("report")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--final", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "plan":
        print("\n".join(f"{name} {limit}" for name, limit in PLAN))
        return 0
    if args.command == "step":
        return run_step(args.name, args.data, args.out, args.limit)
    if args.command == "mark":
        write_step(
            args.out,
            args.name,
            {"status": args.status, "limit_s": args.limit, "seconds": args.limit},
        )
        return 0
    results = report(args.out, args.final)
    bad = [n for n, r in results["steps"].items() if r["status"] not in ("ok", "skipped")]
    if args.final:
        print(f"[gpu_check] done; not ok: {', '.join(bad) or 'none'}", flush=True)
    return 1 if args.final and bad else 0


if __name__ == "__main__":
    sys.exit(main())
