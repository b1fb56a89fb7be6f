"""The GPU machine's Python, made ready offline: what the checks import, and what to add.

    python bench/gpu_env.py preflight                  one line: ready, or what is missing
    python bench/gpu_env.py install --wheels .whl --site DIR
    python bench/gpu_env.py link --into DIR torch torchvision     (the rehearsal, see below)

The machine that lends a GPU has Python with torch and torchvision only, no internet, and takes
at most 64 MiB of carried files, so ``bench/gpu_check.sh --prepare`` downloads here the few
wheels the checks need (:data:`WHEELS`) and the machine installs those whose module does not
import, from the carried folder only. Nothing here imports more than the standard library at the
top: it must run in an interpreter that has nothing yet.

``link`` builds the rehearsal's stand-in for that machine: a folder of symbolic links to torch,
torchvision and the distributions they require (read from their metadata, extras included),
taken from a full environment, which a fresh virtual environment sees through a ``.pth`` file;
so it holds exactly what the bare machine holds, without copying gigabytes.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Module -> the wheel (distribution) that provides it, for what the checks import beyond torch
# and torchvision (which bring numpy and Pillow). Pure-Python wheels except faiss-cpu.
WHEELS = {
    "click": "click",
    "tqdm": "tqdm",
    "pytest": "pytest",
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "packaging": "packaging",
    "pygments": "pygments",
    "faiss": "faiss-cpu",
}
# Only before Python 3.11 does pytest need these.
WHEELS_BEFORE_311 = {"exceptiongroup": "exceptiongroup", "tomli": "tomli"}
# What the checks import: the third-party modules, the project's modules the steps run, and
# the test modules that hold CUDA tests (found by their marker).
MODULES = ["torch", "torchvision", "numpy", "PIL", *WHEELS]
PROJECT = [
    "retrieval",
    "retrieval.cli.main",
    "retrieval.extraction.cuda",
    "retrieval.search.index",
    "retrieval.indexes.gpu",
    "retrieval.training.loop",
]


def wheels_for(version: tuple[int, int]) -> dict[str, str]:
    """Module -> distribution for an interpreter of this (major, minor) version."""
    return {**WHEELS, **(WHEELS_BEFORE_311 if version < (3, 11) else {})}


def cuda_test_modules() -> list[str]:
    """``tests.test_x`` for every test file with a test marked ``cuda``."""
    return [
        f"tests.{path.stem}"
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if "mark.cuda" in path.read_text(encoding="utf-8")
    ]


def missing_modules(targets: list[str]) -> dict[str, list[str]]:
    """Missing top-level module -> the targets whose import needed it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    missing: dict[str, list[str]] = {}
    for target in targets:
        try:
            importlib.import_module(target)
        except ModuleNotFoundError as error:
            name = (error.name or str(error)).split(".")[0]
            missing.setdefault(name, []).append(target)
        except Exception as error:  # a module that imports but breaks: just as fatal
            missing.setdefault(f"{target} ({type(error).__name__}: {error})", []).append(target)
    return missing


def preflight(with_project: bool = True) -> int:
    """Import everything the checks need; print one line; 0 when nothing is missing."""
    version = sys.version_info[:2]
    targets = ["torch", "torchvision", "numpy", "PIL", *wheels_for(version)]
    if with_project:
        targets += [*PROJECT, "bench.extract", *cuda_test_modules()]
    missing = missing_modules(targets)
    if missing:
        parts = [f"{name} (for {', '.join(needed[:3])})" for name, needed in missing.items()]
        print(f"preflight: missing {'; '.join(parts)}", flush=True)
        return 1
    import faiss
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    faiss_gpus = getattr(faiss, "get_num_gpus", lambda: 0)()
    print(
        f"preflight: ready: Python {sys.version.split()[0]}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}; {gpu}), faiss {faiss.__version__} ({faiss_gpus} GPUs), "
        f"{len(cuda_test_modules())} test files with CUDA tests import",
        flush=True,
    )
    return 0


def install(wheels: Path, site: Path) -> int:
    """Install, from ``wheels`` only, the wheels of the modules that do not import here."""
    needed = wheels_for(sys.version_info[:2])
    missing = set(missing_modules(list(needed)))
    files = []
    for module, dist in needed.items():
        if module not in missing:
            continue
        stem = dist.replace("-", "_").lower()
        found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem + "-"))
        if not found:
            print(f"install: no wheel for {dist} in {wheels} (for module {module})", flush=True)
            return 1
        files.append(found[-1])
    if not files:
        print("install: nothing to install", flush=True)
        return 0
    site.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if has_pip.returncode == 0:
        argv = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        argv += ["--no-compile", "--disable-pip-version-check", "--target", str(site)]
        done = subprocess.run([*argv, *map(str, files)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"install: pip failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            return 1
    else:  # a wheel is a zip laid out for site-packages
        for file in files:
            with zipfile.ZipFile(file) as archive:
                archive.extractall(site)
    print(f"install: {len(files)} wheels into {site}: {', '.join(f.name for f in files)}")
    return 0


def _requirements(dist) -> list[tuple[str, set[str], list[str]]]:
    """(name, extras) of what ``dist`` requires, markers on extras honoured, others ignored."""
    out = []
    for text in dist.requires or []:
        head, _, marker = text.partition(";")
        wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[([^\]]*)\])?", head)
        out.append((match.group(1), set(filter(None, (match.group(2) or "").split(","))), wanted))
    return out


def link(into: Path, roots: list[str]) -> int:
    """Symbolic links to ``roots`` and everything they require, from this interpreter's env."""
    from importlib import metadata

    into.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, set[str]]] = [(name, set()) for name in roots]
    linked = 0
    while todo:
        name, extras = todo.pop()
        key = (re.sub(r"[-_.]+", "-", name).lower(), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        for child, child_extras, wanted in _requirements(dist):
            if not wanted or set(wanted) & extras:
                todo.append((child, child_extras))
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for entry in tops - {"__pycache__"}:
            target, source = into / entry, base / entry
            if source.exists() and not target.exists():
                target.symlink_to(source)
                linked += 1
    names = {name for name, _ in seen}
    print(f"link: {len(names)} distributions looked at, {linked} links in {into}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("preflight")
    check.add_argument("--third-party-only", action="store_true")
    inst = sub.add_parser("install")
    inst.add_argument("--wheels", type=Path, required=True)
    inst.add_argument("--site", type=Path, required=True)
    lnk = sub.add_parser("link")
    lnk.add_argument("--into", type=Path, required=True)
    lnk.add_argument("roots", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "preflight":
        return preflight(not args.third_party_only)
    if args.command == "install":
        return install(args.wheels, args.site)
    return link(args.into, args.roots)


if __name__ == "__main__":
    sys.exit(main())
