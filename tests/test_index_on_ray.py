"""`retrieve index DIR --engine ray` on a local Ray cluster answers exactly as the local engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from retrieval.cli.main import cli  # noqa: E402
from tests.corpus import make_image  # noqa: E402
from tests.stored import stored_vectors  # noqa: E402
from tests.test_ray_cluster import ray_processes_under  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs: with 2, a resumed Ray Data job deadlocks.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


def rows_of(index_dir: Path) -> dict[str, tuple]:
    from retrieval import Index

    with Index.open(index_dir) as ix:
        return {r.path: (r.status, r.reason, r.sha256) for r in ix.rows(status=None, limit=None)}


def test_ray_and_local_engines_give_the_same_index_and_update(
    cluster, photos: Path, tmp_path: Path, small_model: Path
) -> None:
    (photos / "junk.jpg").write_text("not an image")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    run("index", photos, "--index", local, "--weights", small_model)
    summary = run("index", photos, "--index", on_ray, "--weights", small_model, "--engine", "ray")
    assert "12 added" in summary and "1 skipped" in summary
    assert rows_of(local) == rows_of(on_ray)
    a, b = stored_vectors(local), stored_vectors(on_ray)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-5)
    assert not (on_ray / "ray-run").exists()  # the engine's folder goes after the commit

    # An update over Ray embeds only what changed, and queries answer as the local index does.
    make_image(photos / "new" / "one.png", size=(48, 48), seed=77)
    shutil.copy(photos / "new" / "one.png", photos / "new" / "two.png")
    run("index", photos, "--index", local)
    assert "2 added" in run("index", photos, "--index", on_ray, "--engine", "ray")
    query = photos / "new" / "one.png"
    answers = [
        json.loads(run("query", query, "-k", "4", "--index", d, "--json")) for d in (local, on_ray)
    ]
    assert [n["path"] for n in answers[0]["neighbors"]] == [
        n["path"] for n in answers[1]["neighbors"]
    ]


RAY_LINES = (
    "worker.py",
    "streaming_executor",
    "execution finished",
    "logging_progress",
    "core_worker.cc",
    "(raylet)",
    "Ray instance",
    "Running Dataset",
)


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float) -> str:
    """What a person would see: stdout and stderr on one pseudo-terminal, 120 columns."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    command = [sys.executable, "-c", "from retrieval.cli.main import cli; cli()", *args]
    process = subprocess.Popen(command, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's last writer closed
                break
            if not chunk:
                break
            seen += chunk
        process.wait(timeout=timeout)
    finally:
        process.kill()
        os.close(master)
    assert process.returncode == 0, seen.decode(errors="replace")
    return seen.decode(errors="replace")


def test_a_ray_run_shows_the_local_runs_bar_and_summary_and_keeps_rays_logs_in_a_file(
    photos: Path, tmp_path: Path, small_model: Path
) -> None:
    """On a terminal (where Ray Data would draw its own bars), a Ray run prints the progress
    bar and the summary; Ray's INFO lines and its C++ core worker's notices go to a log file,
    which -v names."""
    import os
    import re
    import tempfile

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # this run's Ray session, removed after
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"}
    try:
        args = ["-v", "index", str(photos), "--index", str(tmp_path / "ix")]
        args += ["--weights", str(small_model), "--engine", "ray"]
        seen = _on_a_terminal(args, env, timeout=180)
        assert re.search(r"indexing: 100%\|█+\| 12/12 ", seen), seen
        assert "12 added, 0 updated, 0 removed, 0 unchanged, 0 skipped" in seen
        lines = re.split(r"[\r\n]+", seen)
        assert not [line for line in lines if any(r in line for r in RAY_LINES)], seen
        [log_file] = re.findall(r"INFO: Ray's own logs: (\S+)", seen)
        assert Path(log_file).is_relative_to(temp)  # in the run's Ray session folder
        logged = Path(log_file).read_text()
        assert "Started a local Ray instance" in logged and "execution finished" in logged
        assert not ray_processes_under(temp)  # the driver stopped the cluster it started
    finally:
        shutil.rmtree(temp, ignore_errors=True)
