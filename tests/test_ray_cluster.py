"""`retrieve index --engine ray --address` on a two-node cluster: a node that dies, a driver that
dies.

The cluster is Ray's own test cluster (``ray.cluster_utils.Cluster``): a head and a second node,
4 logical CPUs each (with 2, a resumed Ray Data job deadlocks), both bound to 127.0.0.1, in a
private Ray temp folder (so no other Ray on this machine sees it or is seen). The driver is the
real command in a subprocess, with a hard timeout. Ray's health checks are fast here, so a
killed node is declared dead within seconds. Teardown stops the cluster and checks that no
process of it is left (not `ray stop`, which would stop every Ray of the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from tests.corpus import make_labelled_folder  # noqa: E402
from tests.stored import stored_vectors  # noqa: E402

RUN_SECONDS = 180  # one driver run; the whole test stays far below
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


def ray_processes_under(folder: str) -> list[int]:
    """Processes whose command line names ``folder`` (every Ray process of the cluster does)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if folder.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _children(parent: int) -> list[tuple[int, str]]:
    """(pid, process title) of ``parent``'s children: the workers a raylet started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            found.append((int(entry), title))
    return found


@pytest.fixture
def two_nodes(monkeypatch) -> Iterator[tuple[object, object]]:
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Ray turns 127.0.0.1 into the machine's address when it joins; keep the loopback.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    try:
        second = cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1")
        yield cluster, second
    finally:
        cluster.shutdown()
        deadline = time.monotonic() + 10
        while ray_processes_under(temp) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = ray_processes_under(temp)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        for _ in range(3):  # a Ray process that was ending may still have made a folder there
            shutil.rmtree(temp, ignore_errors=True)
            time.sleep(0.2)
        assert not left, f"Ray processes left behind: {left}"


def _retrieve(*args: object) -> list[str]:
    return [sys.executable, "-c", "from retrieval.cli.main import cli; cli()", *map(str, args)]


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        _retrieve(*args), capture_output=True, text=True, timeout=RUN_SECONDS, check=False
    )


def _index_locally(photos: Path, index_dir: Path, model: Path) -> None:
    from click.testing import CliRunner

    from retrieval.cli.main import cli

    args = ["index", str(photos), "--index", str(index_dir), "--weights", str(model)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _assert_same_index(got: Path, want: Path) -> None:
    """Same rows, and vectors equal to the bit (the mapper is batch-invariant)."""
    a, b = stored_vectors(got), stored_vectors(want)
    assert sorted(a) == sorted(b)
    for path in b:
        assert np.array_equal(a[path], b[path]), path


def test_a_node_killed_mid_run_has_its_work_redone_and_the_index_equals_the_local_one(
    two_nodes, small_model: Path, tmp_path: Path
) -> None:
    cluster, second = two_nodes
    photos = tmp_path / "photos"
    make_labelled_folder(photos, classes=3, per_class=16, size=40)
    _index_locally(photos, tmp_path / "local", small_model)
    args = ("index", photos, "--index", tmp_path / "ray", "--weights", small_model)
    args += ("--engine", "ray", "--address", cluster.address, "--batch-size", "2")
    driver = subprocess.Popen(
        _retrieve("-v", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    raylet = second.all_processes["raylet"][0].process
    started = time.monotonic()
    try:
        # The second node's model actor has loaded its model and works: kill the node.
        while True:
            titles = [title for _, title in _children(raylet.pid)]
            if any("Fc7Actor" in t and "__init__" not in t for t in titles):
                break
            assert driver.poll() is None, "the run ended before the second node held an actor"
            assert time.monotonic() - started < RUN_SECONDS, "no model actor on the second node"
            time.sleep(0.02)
        raylet.send_signal(signal.SIGKILL)
        out, err = driver.communicate(timeout=RUN_SECONDS)
    finally:
        driver.kill()
    if driver.returncode != 0:  # allowed: one line, and the next run resumes
        assert len(err.strip().splitlines()) == 1 and "run again" in err, err
        again = _run(*args)
        assert again.returncode == 0, again.stderr
        out = again.stdout
    assert "48 added" in out
    _assert_same_index(tmp_path / "ray", tmp_path / "local")
    assert not (tmp_path / "ray" / "ray-run").exists()


def test_a_driver_killed_mid_run_resumes_by_manifest_part(
    two_nodes, small_model: Path, tmp_path: Path
) -> None:
    cluster, _ = two_nodes
    photos = tmp_path / "photos"
    make_labelled_folder(photos, classes=3, per_class=8, size=40)  # 24 files: 4 parts of 6
    _index_locally(photos, tmp_path / "local", small_model)
    args = ("index", photos, "--index", tmp_path / "ray", "--weights", small_model)
    args += ("--engine", "ray", "--address", cluster.address, "--chunk-size", "6")
    args += ("--batch-size", "2")
    shards = tmp_path / "ray" / "ray-run" / "shards"
    first = shards / "fc7-00000.npy"
    driver = subprocess.Popen(
        _retrieve(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started = time.monotonic()
    try:
        while not first.exists():
            assert driver.poll() is None, "the driver ended before writing its first part"
            assert time.monotonic() - started < RUN_SECONDS, "no part written"
            time.sleep(0.02)
    finally:
        driver.kill()
        driver.wait()
    written = sorted(p.name for p in shards.glob("fc7-*.npy"))
    assert len(written) < 4, "the driver finished before it could be killed"
    again = _run("-v", *args)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(written)} of 4 parts already written" in again.stderr
    assert "stage busy times: not measured (the Ray cluster's workers" in again.stderr
    assert "24 added" in again.stdout
    _assert_same_index(tmp_path / "ray", tmp_path / "local")
    assert not shards.exists()  # committed: the engine's folder went
