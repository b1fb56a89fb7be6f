"""Peak memory of ``retrieve index`` against the number of images: does it grow, and with what?

    python bench/memory.py [--sizes 5000,50000] [--kinds "IVF64,PQ16x4" Flat] [--out FILE.md]

Generates small JPEGs (48x48, 1-2 KB each) and indexes each collection size with a fresh
``retrieve index`` run in its own process (the CLI, called in-process by a child Python), with a
full-size AlexNet on a 64-px crop so that 50,000 images take minutes, not hours. The child
reports its peak resident memory (VmHWM from /proc/self/status) and that of its largest decoder
worker (RUSAGE_CHILDREN).

What may grow: nothing much. Extraction streams (features go to staged chunks on disk, one batch
in memory at a time); the default Flat index is streamed from those chunks into its file
(``indexes/flat_file.py``), never held whole; IVF-PQ holds 16 bytes per image. The file list, the
sync plan, the Flat file's id list and the SQLite rows grow by well under 1 KB per image.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_jpegs(folder: Path, count: int, size: int = 48) -> None:
    """``count`` distinct small JPEGs, 1,000 per sub-folder (one "class" each)."""
    rng = np.random.default_rng(count)
    base = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    for i in range(count):
        sub = folder / f"c{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        pixels = base[i % 64] // 2 + rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:06d}.jpg", quality=80)


def make_model(path: Path) -> None:
    from retrieval.model.alexnet import ModelArgs, build_alexnet
    from retrieval.model.preprocess import Preprocessing
    from retrieval.model.weights import save_checkpoint

    save_checkpoint(
        path,
        build_alexnet(ModelArgs(num_classes=10), seed=0),
        Preprocessing(resize=64, crop=64),
        classes=[str(i) for i in range(10)],
    )


def peak_kib(field: str = "VmHWM") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(args: list[str]) -> None:
    """Run ``retrieve index ARGS`` here and print this process's peak memory as JSON."""
    from retrieval.cli.main import cli

    start = time.perf_counter()
    try:
        cli.main(args=["index", *args], standalone_mode=False)
    except SystemExit as exit_:
        if exit_.code:
            raise
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "peak_mib": peak_kib() / 1024,
                "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def run(images: Path, index: Path, model: Path, kind: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(images),
        "--index",
        str(index),
        "--weights",
        str(model),
        "--index-type",
        kind,
        "--rebuild",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode:
        raise SystemExit(f"retrieve index failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--kinds", nargs="+", default=["IVF64,PQ16x4", "Flat"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [
        "| index kind | images | peak RSS (main) | peak RSS (largest worker) | time | images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    with tempfile.TemporaryDirectory(prefix="retrieve-memory-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model.pt"
        make_model(model)
        for size in sizes:
            started = time.perf_counter()
            make_jpegs(tmp / f"images-{size}", size)
            print(f"made {size} JPEGs in {time.perf_counter() - started:.0f}s", flush=True)
        for kind in args.kinds:
            peaks = []
            for size in sizes:
                result = run(tmp / f"images-{size}", tmp / f"index-{size}", model, kind)
                peaks.append(result["peak_mib"])
                rate = size / result["seconds"]
                rows.append(
                    f"| {kind} | {size:,} | {result['peak_mib']:.0f} MiB | "
                    f"{result['worker_peak_mib']:.0f} MiB | {result['seconds']:.0f}s | "
                    f"{rate:.0f} |"
                )
                print(rows[-1], flush=True)
            ratios.append(
                f"{kind}: peak at {sizes[-1]:,} / peak at {sizes[0]:,} = "
                f"{peaks[-1] / peaks[0]:.2f}x"
            )
    text = "\n".join(
        [f"Load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs", "", *rows, "", *ratios]
    )
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
