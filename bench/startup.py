"""Start-up benchmark (issue 11 item 3): what one CLI command costs before and after the change.

    .venv/bin/python bench/startup.py [--before c52fa72] [--rows 200000] [--files 10000]
        [--repeats 3] [--work /tmp/retrieve-startup] [--keep]

Three commands, each timed as a fresh process (wall time; peak RSS from GNU time; peak
anonymous RSS sampled from /proc every 20 ms, since a memory-mapped index counts in RSS as
file pages the OS can drop and processes share): ``retrieve info`` and one
``retrieve query IMG -k 6`` on a Flat index of --rows fc7-like vectors, and a no-op
``retrieve index`` of a --files-file folder.
"Before" is the code at --before, "after" the working tree; each is laid out as installed
(retrieval/, indexes/ -> retrieval/indexes, cli/ -> retrieval/cli) and run with
``python -c "from retrieval.cli.main import cli; cli()"`` on PYTHONPATH. Both read the same
vectors and rows files (hard links); only manifest.json differs, copied from an index each
version builds itself of three images (same ``--weights random`` sha256), so each version
sees its own format. Vectors are relu(N(0, 1)) (about half zeros, like fc7); the rows' paths
need not exist, except the re-indexed folder's, whose rows carry the files' real size, mtime
and sha256. Runs interleave the versions; the median of --repeats counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402

from retrieval.indexes.flat_file import FlatIndexWriter  # noqa: E402
from retrieval.indexes.rows import SCHEMA  # noqa: E402

DIM = 4096
CLI = "from retrieval.cli.main import cli; cli()"
VERSIONS = ("before", "after")
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout


def lay_out(commit: str | None, target: Path) -> None:
    """The package tree as installed, from a commit (git archive) or from the working tree."""
    if commit:
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "retrieval", "indexes", "cli"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    else:
        for name in git(
            "ls-files", "-co", "--exclude-standard", "retrieval", "indexes", "cli"
        ).splitlines():
            if (ROOT / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
    for package in ("indexes", "cli"):
        (target / package).rename(target / "retrieval" / package)


def retrieve(code: Path, *args: str, cwd: Path) -> tuple[list[float], str]:
    """Run one CLI command: [wall s, CPU s, peak RSS MB, peak anonymous RSS MB], stdout.

    Under GNU time: a child's ru_maxrss starts at the high-water mark of the process that
    forked it, so wait4 from this (large) process would report this process's own peak."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("RETRIEVE_INDEX", None)
    rss_file = cwd / "maxrss.txt"
    command = [TIME, "-f", "%M %U %S", "-o", str(rss_file), sys.executable, "-c", CLI, *args]
    start = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    anon = [0]
    threading.Thread(target=sample_anon, args=(child.pid, anon), daemon=True).start()
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"{' '.join(args)} ({code.name}) failed:\n{stderr.decode()[-2000:]}")
    peak_kb, user, system = rss_file.read_text().split()[-3:]
    return [wall, float(user) + float(system), int(peak_kb) / 1024, anon[0] / 1024], stdout.decode()


def sample_anon(pid: int, peak: list[int]) -> None:
    """Largest RssAnon (kB) seen of the command GNU time (``pid``) runs, until it exits."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children")
        while not (found := children.read_text().split()):
            time.sleep(0.002)
        status = Path(f"/proc/{found[0]}/status")
        while True:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.02)
    except (OSError, ValueError, IndexError):
        return


def write_vectors(path: Path, n: int, seed: int) -> None:
    """An ``IDMap2,Flat`` file of n relu(N(0, 1)) rows with ids 1..n, a block at a time."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        writer = FlatIndexWriter(handle, DIM)
        for start in range(0, n, 8192):
            block = rng.standard_normal((min(8192, n - start), DIM), dtype=np.float32)
            np.maximum(block, 0, out=block)
            writer.add_with_ids(block, np.arange(start + 1, start + 1 + len(block)))
        writer.finish()


def write_rows(path: Path, rows: list[tuple]) -> None:
    """rows: (path, size, mtime_ns, sha256, label) of indexed files, ids 1..n in order."""
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.executemany(
            "INSERT INTO images (id, path, size, mtime_ns, sha256, label, status)"
            " VALUES (?, ?, ?, ?, ?, ?, 'indexed')",
            [
                (i, os.fsencode(p), s, m, h, os.fsencode(lab))
                for i, (p, s, m, h, lab) in enumerate(rows, 1)
            ],
        )
    db.close()


def make_index(data: Path, name: str, rows: list[tuple], templates: dict) -> dict:
    """One vectors + rows pair, hard-linked into a directory per version with its manifest."""
    shared = data / f"{name}-shared"
    shared.mkdir()
    write_vectors(shared / "vectors.1.faiss", len(rows), seed=len(rows))
    write_rows(shared / "rows.1.sqlite", rows)
    dirs = {}
    for version in VERSIONS:
        dirs[version] = directory = data / f"{name}-{version}"
        directory.mkdir()
        for file in ("vectors.1.faiss", "rows.1.sqlite"):
            os.link(shared / file, directory / file)
        manifest = dict(templates[version], generation=1, count=len(rows), skipped=0, dim=DIM)
        manifest["files"] = {"vectors": "vectors.1.faiss", "rows": "rows.1.sqlite"}
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"dirs": dirs, "file_mb": (shared / "vectors.1.faiss").stat().st_size / 2**20}


def manifests(data: Path, code: dict[str, Path]) -> tuple[dict, Path]:
    """Each version's manifest of a 3-image index it builds itself, and one of the images."""
    tiny = data / "tiny" / "a"
    tiny.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tiny / f"{i}.jpg")
    templates = {}
    for version in VERSIONS:
        built = data / f"tiny-{version}"
        command = ["index", str(tiny.parent), "--index", str(built), "--weights", "random"]
        retrieve(code[version], *command, cwd=data)
        templates[version] = json.loads((built / "manifest.json").read_text())
    return templates, tiny / "0.jpg"


def folder_rows(folder: Path, n: int, image: bytes) -> list[tuple]:
    """n real files under folder (the image plus 4 bytes a JPEG decoder ignores), as rows."""
    rows = []
    for i in range(n):
        path = folder / f"c{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content := image + i.to_bytes(4, "little"))
        stat, digest = path.stat(), hashlib.sha256(content).hexdigest()
        rows.append((str(path), stat.st_size, stat.st_mtime_ns, digest, path.parent.name))
    return sorted(rows)


def machine() -> dict:
    cpu = cpu_name()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {name: metadata.version(name) for name in ("torch", "torchvision", "faiss-cpu")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        **versions,
        "load_before": os.getloadavg(),
    }


def prepare(args: argparse.Namespace, data: Path) -> tuple[dict, dict]:
    """Both versions' code, and the commands to time: name -> (index, arguments)."""
    code = {version: data / version for version in VERSIONS}
    lay_out(args.before, code["before"])
    lay_out(None, code["after"])
    templates, query = manifests(data, code)
    log(f"writing {args.rows} x {DIM} vectors and a {args.files}-file folder")
    labels = [f"c{i % 100:03d}" for i in range(args.rows)]
    fake = [(f"{data}/photos/{c}/{i:06d}.jpg", 2000, 0, "0" * 64, c) for i, c in enumerate(labels)]
    big = make_index(data, "flat", fake, templates)
    folder = (data / "folder").resolve()
    rows = folder_rows(folder, args.files, query.read_bytes())
    small = make_index(data, "folder", rows, templates)
    flat = f"{args.rows:,}-image Flat index"
    return code, {
        f"`retrieve info` ({flat})": (big, ["info"]),
        f"`retrieve index`, nothing changed ({args.files:,} files)": (
            small,
            ["index", str(folder)],
        ),
        f"`retrieve query -k 6` ({flat})": (big, ["query", str(query), "-k", "6", "--json"]),
    }


def summarise(runs: dict, commands: dict) -> list[dict]:
    """Medians of each command's runs, per version."""
    results = []
    for name, (index, _) in commands.items():
        row = {"command": name, "index_file_mb": round(index["file_mb"])}
        for version, measured in runs[name].items():
            wall, cpu, rss, anon = (round(statistics.median(x), 2) for x in zip(*measured))
            row[version] = {"s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "peak_anon_mb": anon}
            row[version]["runs_s"] = [round(run[0], 2) for run in measured]
        row["ratio"] = round(row["before"]["s"] / row["after"]["s"], 1)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="c52fa72")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/retrieve-startup"))
    parser.add_argument("--keep", action="store_true", help="keep the indexes and folders")
    args = parser.parse_args()
    if not os.access(TIME, os.X_OK):
        raise SystemExit(f"{TIME} (GNU time) is needed to measure each command's peak RSS")
    info = machine()
    dirty = git("status", "--porcelain", "--", "retrieval", "indexes", "cli").strip()
    info["before"] = git("rev-parse", "--short", args.before).strip()
    info["after"] = "working tree at " + git("rev-parse", "--short", "HEAD").strip()
    info["after"] += " with uncommitted changes" if dirty else ""
    data = args.work / "data"
    shutil.rmtree(data, ignore_errors=True)
    try:
        code, commands = prepare(args, data)
        runs = measure(args, code, commands, info)
    finally:
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    info["load_after"] = os.getloadavg()
    report(info, summarise(runs, commands), args)


def measure(args: argparse.Namespace, code: dict, commands: dict, info: dict) -> dict:
    """Every command --repeats times, versions interleaved: name -> version -> runs."""
    data = args.work / "data"
    runs: dict = {name: {version: [] for version in VERSIONS} for name in commands}
    answers: set[tuple] = set()
    for repeat in range(args.repeats):
        log(f"run {repeat + 1} of {args.repeats}")
        for name, (index, arguments) in commands.items():
            for version in VERSIONS:
                where = ["--index", str(index["dirs"][version])]
                measured, stdout = retrieve(code[version], *arguments, *where, cwd=data)
                runs[name][version].append(measured)
                if arguments[0] == "query":
                    answers.add(tuple(n["id"] for n in json.loads(stdout)["neighbors"]))
                if arguments[0] == "index" and f"{args.files} unchanged" not in stdout:
                    raise SystemExit(f"the re-index was not a no-op ({version}): {stdout}")
    info["same_neighbours"] = len(answers) == 1  # both versions, every run
    return runs


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(info: dict, results: list[dict], args: argparse.Namespace) -> None:
    load = f"{info['load_before'][0]:.1f} before, {info['load_after'][0]:.1f} after"
    print(
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; Python "
        f"{info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, faiss "
        f"{info['faiss-cpu']}; load average {load}. Before: {info['before']}; after: "
        f"{info['after']}. Median of {args.repeats} runs, versions interleaved.\n"
    )
    print(
        "| command | before s | after s | before/after | CPU s before / after "
        "| peak RSS MB before / after | of it anonymous MB | index file MB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in results:
        b, a = r["before"], r["after"]
        print(
            f"| {r['command']} | {b['s']:.2f} | {a['s']:.2f} | {r['ratio']:.1f}x "
            f"| {b['cpu_s']:.2f} / {a['cpu_s']:.2f} "
            f"| {b['peak_rss_mb']:.0f} / {a['peak_rss_mb']:.0f} "
            f"| {b['peak_anon_mb']:.0f} / {a['peak_anon_mb']:.0f} | {r['index_file_mb']} |"
        )
    same = "the same" if info["same_neighbours"] else "DIFFERENT"
    print(f"\nBoth versions gave {same} 6 neighbours (ids) in every query run.")
    out = args.work / "startup.json"
    out.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
