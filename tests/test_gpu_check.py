"""bench/gpu_check.sh: the GPU machine's few minutes are not spent on a missing wheel.

The rehearsal is the bare machine here: a fresh virtual environment that sees only torch,
torchvision and their requirements, no network (``unshare -n``), every other module from the
carried wheels; it must install, pass the preflight and collect the CUDA tests without error.
Skipped where ``unshare`` is not allowed (not root) or the wheels cannot be downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import make_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_env  # noqa: E402


def test_the_plan_fits_in_seven_minutes_with_room_to_set_up() -> None:
    limits = [limit for _, limit in gpu_check.PLAN]
    assert sum(limits) <= 400 and all(limit >= 15 for limit in limits)
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "BUDGET=${BUDGET:-395}" in text


def test_report_marks_steps_not_reached_and_steps_stopped(tmp_path: Path) -> None:
    gpu_check.write_step(tmp_path, "decode", {"status": "ok", "summary": "a | b", "seconds": 3})
    assert (
        gpu_check.main(
            [
                "mark",
                "pytest_cuda",
                "--out",
                str(tmp_path),
                "--status",
                "timed out",
                "--limit",
                "110",
            ]
        )
        == 0
    )
    assert gpu_check.main(["report", "--out", str(tmp_path), "--final"]) == 1
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: record["status"] for name, record in results["steps"].items()}
    assert statuses == {
        "decode": "ok",
        "pytest_cuda": "timed out",
        **{name: "not reached" for name, _ in gpu_check.PLAN[2:]},
    }
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| decode | ok | 3 (-) | a / b |" in table
    assert "| train_300_steps | not reached |" in table


def test_preflight_names_what_is_missing_in_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_env, "WHEELS", {**gpu_env.WHEELS, "no_such_module": "no-such"})
    assert gpu_env.preflight(with_project=False) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["preflight: missing no_such_module (for no_such_module)"]
    assert gpu_env.missing_modules(["retrieval.cli.main", "tests.test_one_fc7"]) == {}


def _unshare_allowed() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def _copy_of_the_tree(target: Path) -> Path:
    """The repository's code (the script works where it lies; .whl lands beside it)."""
    for name in ("bench", "cli", "indexes", "retrieval", "tests"):
        shutil.copytree(
            ROOT / name, target / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", target)
    return target


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_allowed(), reason="unshare -n is not allowed here (not root?)")
def test_rehearsal_installs_offline_and_collects_every_cuda_test(tmp_path: Path) -> None:
    tree = _copy_of_the_tree(tmp_path / "tree")
    data = tmp_path / "data"
    for label in ("a", "b"):
        for i in range(3):
            make_image(data / label / f"{i}.jpg", size=(48, 40), seed=i)
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    version = "{}.{}".format(*sys.version_info[:2])
    script = str(tree / "bench" / "gpu_check.sh")
    prepared = subprocess.run(
        ["bash", script, "--prepare", "--python", version, "--data", str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if prepared.returncode != 0 and "cannot download" in prepared.stderr:
        pytest.skip(f"the wheels could not be downloaded: {prepared.stderr.strip()[-300:]}")
    assert prepared.returncode == 0, prepared.stderr
    assert f"prepared for Python {version}" in prepared.stdout
    wheels = sorted(p.name.split("-")[0].lower() for p in (tree / ".whl").glob("*.whl"))
    assert "faiss_cpu" in wheels and "pytest" in wheels and "numpy" not in wheels

    env.update(PYTHON=getattr(sys, "_base_executable", sys.executable), TORCH_FROM=sys.prefix)
    rehearsal = subprocess.run(
        ["bash", script, "--rehearse"], env=env, capture_output=True, text=True, timeout=300
    )
    said = rehearsal.stderr
    assert rehearsal.returncode == 0, said[-3000:]
    assert "network cut off (interfaces: lo )" in said
    assert "install: " in said and "click" in said.split("install: ")[1].splitlines()[0]
    assert "preflight: ready" in said
    # Every CUDA test this full environment collects, the bare one collected too.
    here = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            "tests",
        ],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = here.stdout.strip().splitlines()[-1].split("/")[0]
    assert int(expected) > 0
    collected = [line for line in said.splitlines() if "collected:" in line]
    assert collected and f"collected: {expected}/" in collected[0], collected
    assert "stopping where a GPU is needed" in said
    assert not list(tmp_path.glob("gpu-rehearsal.*"))  # the rehearsal cleaned up after itself


@pytest.mark.slow
def test_the_steps_run_on_the_cpu_at_toy_sizes(tmp_path: Path) -> None:
    """GPU_CHECK_SMOKE=1: the steps' own code (not the GPU) runs, so a typo costs no GPU run."""
    data = tmp_path / "data"
    for i in range(8):
        make_image(data / "a" / f"{i}.jpg", size=(72, 64), seed=i)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHONPATH": str(ROOT)}
    for name in ("decode", "exact_search", "ivfpq_gpu"):
        argv = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "step", name]
        argv += ["--data", str(data), "--out", str(out), "--limit", "60"]
        subprocess.run(argv, env=env, check=True, timeout=120, capture_output=True)
    gpu_check.main(["report", "--out", str(out)])
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    decode = steps["decode"]
    assert decode["status"] == "ok", decode
    assert decode["decoded"] == {"gpu": 8, "cpu": 0, "cpu_after_gpu_failure": 0, "skipped": 0}
    assert decode["rerun_bitwise_equal"] and decode["race_streams"]["corrupted"] == 0
    assert steps["exact_search"]["status"] == "ok" and steps["exact_search"]["self_found"] == 1.0
    assert steps["ivfpq_gpu"]["status"] == "skipped"  # faiss-cpu here
    assert steps["pytest_cuda"]["status"] == "not reached"


@pytest.mark.slow
def test_the_run_loop_records_a_step_that_ran_out_of_time(tmp_path: Path) -> None:
    """The shell's loop on the CPU (GPU_CHECK_SMOKE=1): a step killed at its limit is marked
    timed out, the next one still runs, the ones not picked are not reached; exit 1."""
    tree = _copy_of_the_tree(tmp_path / "tree")
    wheels = tree / ".whl"
    wheels.mkdir()
    (wheels / "PYTHON").write_text("{}.{}\n".format(*sys.version_info[:2]))
    (tree / ".gpu-data" / "imagenette" / "a").mkdir(parents=True)
    make_image(tree / ".gpu-data" / "imagenette" / "a" / "0.jpg")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "GPU_CHECK_SMOKE": "1",
           "GPU_CHECK_STEPS": "decode ivfpq_gpu", "GPU_CHECK_LIMIT_CAP": "3",
           "GPU_SITE": str(tmp_path / "site")}  # fmt: skip
    done = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "preflight: ready" in done.stderr and "install: nothing to install" in done.stderr
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["decode"]["status"] == "timed out" and steps["decode"]["limit_s"] == 3
    assert steps["ivfpq_gpu"]["status"] == "skipped"
    assert steps["train_300_steps"]["status"] == "not reached"
    assert "| decode | timed out |" in (out / "gpu_check.md").read_text()
