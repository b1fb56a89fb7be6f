"""What signing for `retrieve duplicates` adds to `retrieve index`, by the two roads the tool has,
measured in one run on the same files.

    .venv/bin/python bench/signing.py FOLDER [FOLDER ...] [--rounds 2] [--weights random:0]
        [--out FILE.md]

Each folder is indexed afresh three ways, the ways interleaved round by round: without
signatures; signed in the build (the CPU decoders sign the image they decode for the model);
and without, followed by the pass over the files the GPU and Ray roads use (``sign_index``).
Each run is timed whole (walk, model, extraction, commit, signing) in this process; the
fastest round of each way counts. A camera-size folder shows the difference best: there the
model's decode and the signature's are both at 1/8 scale, so the build's image serves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402

from retrieval import ExtractOptions, Index, IndexOptions  # noqa: E402
from retrieval.devices import usable_cores  # noqa: E402
from retrieval.duplicates.signatures import sign_index  # noqa: E402

WAYS = ("no signatures", "signed in the build", "signed by a pass after the build")


def index_once(folder: Path, way: str, weights: str) -> tuple[float, int]:
    """Seconds for one fresh index of ``folder`` the ``way`` given, and how many it signed."""
    work = Path(tempfile.mkdtemp(prefix="bench-signing-"))
    options = IndexOptions(
        weights=weights,
        signatures=way == WAYS[1],
        extract=ExtractOptions(threads=usable_cores()),  # as the CLI runs it
    )
    try:
        started = time.perf_counter()
        with Index.create(work / "index", folder, options) as index:
            signed = index.report.signed
            if way == WAYS[2]:
                signed += sign_index(index)
        return time.perf_counter() - started, signed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    header = (
        f"{cpu_name()}, {usable_cores()} usable cores, load average {os.getloadavg()[0]:.1f} "
        f"at start; weights {args.weights}; best of {args.rounds} interleaved rounds"
    )
    lines = [
        header,
        "",
        "| folder | signed | " + " | ".join(WAYS) + " |",
        "|---|---:|---:|---:|---:|",
    ]
    for folder in args.folders:
        best = {way: float("inf") for way in WAYS}
        signed = {}
        for _ in range(args.rounds):
            for way in WAYS:
                seconds, signed[way] = index_once(folder, way, args.weights)
                best[way] = min(best[way], seconds)
                print(f"{folder} {way}: {seconds:.1f} s, {signed[way]} signed", file=sys.stderr)
        files = max(signed.values())
        cells = " | ".join(f"{best[way]:.1f} s" for way in WAYS)
        lines.append(f"| {folder} | {files} | {cells} |")
    lines.append(f"\nLoad average {os.getloadavg()[0]:.1f} at the end.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
