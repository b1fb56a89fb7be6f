"""The Ray engine against the local one, and its faults: a killed actor, a killed driver.

A local Ray cluster with 4 logical CPUs is started once for the module (with 2, a resumed run
deadlocks: the model actor and the decode tasks leave nothing for the rest). Each test has a hard
timeout: SIGALRM fails it, and faulthandler ends the process if even that cannot get through.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from retrieval.distributed import (  # noqa: E402
    RayOptions,
    Source,
    extract_locally,
    extract_with_ray,
)
from retrieval.errors import RetrieveError  # noqa: E402
from retrieval.indexes.shards import open_shards  # noqa: E402
from tests.corpus import make_labelled_folder  # noqa: E402

TEST_SECONDS = 240
OPTIONS = RayOptions(part_files=10, batch_size=4, actors=1, retries=3)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def _hard_timeout():
    def fail(signum, frame):
        raise TimeoutError(f"test ran past {TEST_SECONDS}s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(TEST_SECONDS)
    faulthandler.dump_traceback_later(TEST_SECONDS + 60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_labelled_folder(root, classes=3, per_class=6, size=48)
    (root / "circles" / "notes.jpg").write_bytes(b"a text file, not a JPEG")
    good = next((root / "squares").iterdir()).read_bytes()
    (root / "squares" / "cut.png").write_bytes(good[: len(good) // 2])
    return root


def _contents(folder: Path) -> tuple[np.ndarray, list[dict], list[dict]]:
    vectors, rows, skipped = [], [], []
    for shard in open_shards(folder):
        vectors.append(np.array(shard.vectors))
        rows.extend(shard.metadata.to_pylist())
        skipped.extend(shard.skipped.to_pylist())
    return np.concatenate(vectors), rows, skipped


def _assert_same(got: Path, want: Path) -> None:
    got_vectors, got_rows, got_skipped = _contents(got)
    want_vectors, want_rows, want_skipped = _contents(want)
    assert got_rows == want_rows
    assert got_skipped == want_skipped
    assert len({row["id"] for row in got_rows}) == len(got_rows)  # nothing twice
    # Same model, same crops: only the order of float additions may differ (batching).
    np.testing.assert_allclose(got_vectors, want_vectors, rtol=1e-5, atol=1e-6)


def _processes(title: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read()
            except OSError:
                continue
            if command.startswith(title.encode()):
                found.append(int(entry))
    return found


def test_ray_engine_gives_the_local_engines_vectors_rows_and_skips(
    cluster, collection: Path, small_model: Path, tmp_path: Path
) -> None:
    source = Source.parse(collection)
    local = extract_locally(source, str(small_model), tmp_path / "local", part_files=10)
    report = extract_with_ray(source, str(small_model), tmp_path / "ray", OPTIONS)
    assert report.parts_written == [0, 1] and report.images == 18 and report.skipped == 2
    assert (local.images, local.skipped) == (18, 2)
    _assert_same(tmp_path / "ray", tmp_path / "local")
    _, _, skipped = _contents(tmp_path / "ray")
    assert {row["reason"] for row in skipped} == {"not an image", "truncated"}
    # Which actor did the work, and for how long: every row once, by the one actor.
    [(name, work)] = report.actor_work.items()
    assert name.rsplit(":", 1)[1].isdigit() and work.rows == 20 and work.seconds > 0
    assert report.describe_actors().startswith("1 model actor: 20 rows (busy ")


def test_model_actor_killed_mid_run_loses_and_duplicates_nothing(
    cluster, collection: Path, small_model: Path, tmp_path: Path
) -> None:
    source = Source.parse(collection)
    extract_locally(source, str(small_model), tmp_path / "local", part_files=40)
    killed: list[int] = []

    def kill_actor_once(done: int, total: int) -> None:
        if done and not killed:  # after the first batch came back
            for pid in _processes("ray::MapWorker(MapBatches(Fc7Actor))"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    options = RayOptions(part_files=40, batch_size=2, actors=1, retries=3)
    report = extract_with_ray(
        source, str(small_model), tmp_path / "ray", options, progress=kill_actor_once
    )
    assert killed, "no model actor was found to kill"
    assert report.images == 18
    assert sum(w.rows for w in report.actor_work.values()) == 20  # a retried row counts once
    _assert_same(tmp_path / "ray", tmp_path / "local")


DRIVER = """
import sys
import ray
from retrieval.distributed import RayOptions, Source, extract_with_ray
ray.init(address=sys.argv[1], log_to_driver=False)
options = RayOptions(part_files=5, batch_size=4, actors=1, retries=3)
extract_with_ray(Source.parse(sys.argv[2]), sys.argv[3], sys.argv[4], options)
"""


def test_killed_driver_resumes_from_the_parts_it_finished(
    cluster, small_model: Path, tmp_path: Path
) -> None:
    collection = tmp_path / "many"
    make_labelled_folder(collection, classes=3, per_class=12, size=48)  # 8 parts of 5 (or 1)
    source = Source.parse(collection)
    extract_locally(source, str(small_model), tmp_path / "local", part_files=5)
    out = tmp_path / "ray"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster, str(collection), str(small_model), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = out / "fc7-00000.npy"
    try:
        while not first.exists():
            assert driver.poll() is None, "the driver ended before writing its first part"
            time.sleep(0.02)
    finally:
        driver.kill()
        driver.wait()
    written_before = sorted(p.name for p in out.glob("fc7-*.npy"))
    assert len(written_before) < 8, "the driver finished before it could be killed"
    stamp = first.stat().st_mtime_ns
    options = RayOptions(part_files=5, batch_size=4, actors=1, retries=3)
    report = extract_with_ray(source, str(small_model), out, options)
    assert report.parts_done_before == len(written_before)
    assert first.stat().st_mtime_ns == stamp  # a finished part is not done again
    _assert_same(out, tmp_path / "local")


def test_resuming_into_a_folder_of_another_source_is_refused(
    cluster, collection: Path, small_model: Path, tmp_path: Path
) -> None:
    extract_locally(Source.parse(collection), str(small_model), tmp_path / "out")
    other = tmp_path / "other"
    make_labelled_folder(other, classes=1, per_class=2, size=32)
    with pytest.raises(RetrieveError, match="another source or model"):
        extract_with_ray(Source.parse(other), str(small_model), tmp_path / "out", OPTIONS)


def test_tar_shards_give_the_vectors_of_the_unpacked_folder(
    cluster, collection: Path, small_model: Path, tmp_path: Path
) -> None:
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(p for p in collection.rglob("*") if p.is_file())
    for number, start in enumerate(range(0, len(files), 12)):
        with tarfile.open(shards / f"{number:05d}.tar", "w") as archive:
            for path in files[start : start + 12]:
                archive.add(path, arcname=path.relative_to(collection).as_posix())
    extract_locally(Source.parse(collection), str(small_model), tmp_path / "local", part_files=40)
    source = Source.parse(shards)
    assert source.kind == "tar"
    options = RayOptions(part_files=40, batch_size=4, actors=1, retries=3)
    extract_with_ray(source, str(small_model), tmp_path / "ray", options)
    got_vectors, got_rows, got_skipped = _contents(tmp_path / "ray")
    want_vectors, want_rows, want_skipped = _contents(tmp_path / "local")
    relative = [row["path"].split(".tar/", 1)[1] for row in got_rows]
    assert relative == [Path(r["path"]).relative_to(collection).as_posix() for r in want_rows]
    assert [r["label"] for r in got_rows] == [r["label"] for r in want_rows]
    assert [r["sha256"] for r in got_rows] == [r["sha256"] for r in want_rows]
    assert [r["reason"] for r in got_skipped] == [r["reason"] for r in want_skipped]
    np.testing.assert_allclose(got_vectors, want_vectors, rtol=1e-5, atol=1e-6)


def test_extract_command_writes_shards_and_resumes(
    collection: Path, small_model: Path, tmp_path: Path
) -> None:
    import json

    from click.testing import CliRunner

    from retrieval.cli.extract_cmds import extract_command

    out = tmp_path / "out"
    args = [str(collection), "--out", str(out), "--weights", str(small_model), "--json"]
    first = CliRunner().invoke(extract_command, [*args, "--part-files", "8"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["images"] == 18
    again = CliRunner().invoke(extract_command, [*args, "--part-files", "8"])
    summary = json.loads(again.output)
    assert (summary["parts_written"], summary["parts_done_before"]) == (0, 3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{collection / 'missing.jpg'}\n")
    other = CliRunner().invoke(
        extract_command,
        ["--files-from", str(listing), "--out", str(tmp_path / "x"), "--weights", str(small_model)],
    )
    assert other.exit_code == 0, other.output
    assert "0 images" in other.output and "1 skipped" in other.output


def test_an_index_from_ray_shards_answers_as_retrieve_index_of_the_folder(
    cluster, collection: Path, small_model: Path, tmp_path: Path
) -> None:
    """`retrieve index DIR --engine ray` is extract then --from-embeddings: the same answers."""
    import json

    from click.testing import CliRunner

    from retrieval import Index
    from retrieval.cli.main import cli

    def run(*args: object) -> str:
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    run("index", collection, "--index", tmp_path / "local", "--weights", small_model)
    extract_with_ray(Source.parse(collection), str(small_model), tmp_path / "shards", OPTIONS)
    run("index", "--from-embeddings", tmp_path / "shards", "--index", tmp_path / "ray")
    for query in sorted(collection.rglob("*.png"))[::5]:
        args = ("query", query, "-k", "5", "--json")
        a = json.loads(run(*args, "--index", tmp_path / "local"))["neighbors"]
        b = json.loads(run(*args, "--index", tmp_path / "ray"))["neighbors"]
        assert [(n["path"], n["label"]) for n in a] == [(n["path"], n["label"]) for n in b]
        np.testing.assert_allclose(
            [n["distance"] for n in a], [n["distance"] for n in b], rtol=1e-5
        )
    with Index.open(tmp_path / "local") as local, Index.open(tmp_path / "ray") as ray_index:
        assert ray_index.identity == local.identity


def test_retrieve_extract_on_ray_says_how_the_work_spread(
    cluster, collection: Path, small_model: Path, tmp_path: Path
) -> None:
    """The rows per model actor go to --json; the line a person reads goes to stderr."""
    import json

    from click.testing import CliRunner

    from retrieval.cli.main import cli

    args = ["extract", str(collection), "--engine", "ray", "--out", str(tmp_path / "shards")]
    args += ["--weights", str(small_model), "--actors", "1", "--batch-size", "4", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["skipped"]) == (18, 2)
    [work] = summary["actor_work"].values()
    assert work["rows"] == 20 and work["busy_seconds"] > 0
    assert "1 model actor: 20 rows (busy " in result.stderr


@pytest.mark.parametrize("use_ray", [False, True])
def test_shards_merged_on_disk_answer_as_the_same_ivf_filled_in_memory(
    cluster, tmp_path: Path, use_ray: bool
) -> None:
    import faiss

    from retrieval.distributed.ivf_merge import TRAINED, build_ivf_on_disk, open_merged
    from retrieval.indexes.shards import ShardRows, ShardWriter

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, 32)).astype(np.float32) * 4
    vectors = centres[rng.integers(0, 12, 900)] + rng.standard_normal((900, 32)).astype(np.float32)
    ids = np.arange(900) * 5 + 3
    with ShardWriter(tmp_path / "shards", {"source": "synthetic"}, 32, rows_per_shard=300) as w:
        n = len(ids)
        w.add(vectors, ShardRows(ids.tolist(), [f"{i}.jpg" for i in ids], ["x"] * n,
                                 [""] * n, [1] * n, [1] * n))  # fmt: skip
    report = build_ivf_on_disk(tmp_path / "shards", tmp_path / "ivf", "IVF16,Flat", use_ray=use_ray)
    assert (report.rows, report.shards) == (900, 3)
    merged = open_merged(report.index_path)
    in_memory = faiss.read_index(str(tmp_path / "ivf" / TRAINED))
    in_memory.add_with_ids(vectors, ids)
    merged.nprobe = in_memory.nprobe = 4
    queries = vectors[::37] + 0.05
    got_d, got_i = merged.search(queries, 8)
    want_d, want_i = in_memory.search(queries, 8)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-6)
    assert merged.ntotal == 900 and not list((tmp_path / "ivf").glob("block-*"))


def test_a_model_actor_refuses_weights_other_than_the_run_planned_with(small_model: Path) -> None:
    from retrieval.distributed.tasks import Fc7Actor
    from retrieval.errors import WeightsError

    with pytest.raises(WeightsError, match="every node must see the same weights file"):
        Fc7Actor(str(small_model), "0" * 64, "cpu", "fp32", 1)


def test_gpu_decode_sends_jpeg_bytes_to_the_actors_and_keeps_rows_and_skips(
    cluster, small_model: Path, tmp_path: Path
) -> None:
    """--gpu-decode on CPU actors (torchvision decodes with libjpeg-turbo there): the bytes
    path gives the local engine's rows and reasons, and fc7 within the tensor resize's
    rounding."""
    from tests.corpus import make_image

    root = tmp_path / "jpegs"
    for i in range(14):
        make_image(root / "a" / f"{i:02d}.jpg", size=(80 + 3 * i, 72), seed=i, quality=90)
    make_image(root / "a" / "progressive.jpg", size=(90, 80), seed=20, progressive=True)
    make_image(root / "b" / "flat.png", size=(70, 70), seed=21)
    good = (root / "a" / "00.jpg").read_bytes()
    (root / "b" / "cut.jpg").write_bytes(good[: len(good) // 2])
    source = Source.parse(root)
    extract_locally(source, str(small_model), tmp_path / "local", part_files=40)
    options = RayOptions(part_files=40, batch_size=6, actors=1, gpu_decode=True)
    extract_with_ray(source, str(small_model), tmp_path / "ray", options)
    got_vectors, got_rows, got_skipped = _contents(tmp_path / "ray")
    want_vectors, want_rows, want_skipped = _contents(tmp_path / "local")
    assert got_rows == want_rows and got_skipped == want_skipped
    assert [r["reason"] for r in got_skipped] == ["truncated"]
    relative = np.linalg.norm(got_vectors - want_vectors, axis=1) / np.linalg.norm(
        want_vectors, axis=1
    )
    # measured: 0.002-0.0035 for these small JPEGs (float resize against Pillow's fixed point)
    assert np.median(relative) <= 0.005 and relative.max() <= 0.05
    assert relative.max() > 0  # the JPEGs really took the other decoder


def test_a_part_reaches_the_decoders_in_blocks_not_whole(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrieval.distributed.tasks import read_part_lists

    part = tmp_path / "part-00000.parquet"
    rows = pa.table({"key": list(range(10)), "path": [f"{i}.jpg" for i in range(10)]})
    pq.write_table(rows, part)
    blocks = list(read_part_lists(pa.table({"part_list": [str(part)]}), rows_per_block=4))
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert pa.concat_tables(blocks).equals(rows)


def test_the_stderr_relay_sends_rays_cpp_lines_to_the_log_and_the_rest_to_the_terminal(
    tmp_path: Path,
) -> None:
    """A progress bar redraws its line without ending it, and its text holds "[": it reaches
    the terminal whole and at once; Ray's C++ lines, even right after a partial bar, the log."""
    from retrieval.distributed.ray_logs import _route

    cpp = b"[2026-12-07 08:14:42,403 E 27867 27867] core_worker.cc:2465: Actor ...\n"
    bar = "\rindexing:  50%|█    | 6/12 [00:01<00:01, 4.1img/s]".encode()
    terminal = tmp_path / "terminal"
    logged: list[str] = []
    with open(terminal, "wb") as handle:
        fd = handle.fileno()
        assert _route(bar, fd, logged.append, final=False) == b""  # nothing held back
        rest = _route(bar + cpp[:20], fd, logged.append, final=False)
        assert rest == cpp[:20]  # may be a C++ line: waits for its end
        assert _route(rest + cpp[20:] + b"INFO: done\n", fd, logged.append, final=False) == b""
        assert _route(b"[not a ray line", fd, logged.append, final=True) == b""
    assert logged == [cpp.decode()]
    assert terminal.read_bytes() == bar + bar + b"INFO: done\n" + b"[not a ray line"


def test_only_what_the_cluster_lost_gets_another_round_not_a_python_error() -> None:
    """A node's death (however Ray Data wraps it) is redone; an error of the code is not."""
    import ray.exceptions as rex

    from retrieval.distributed.engine import _lost_to_the_cluster

    def wrapped(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise RuntimeError("Ray Data: the dataset failed") from exc
        except RuntimeError as outer:
            return outer

    assert _lost_to_the_cluster(wrapped(rex.NodeDiedError("node 127.0.0.1 died")))
    assert _lost_to_the_cluster(wrapped(rex.ActorDiedError()))
    assert _lost_to_the_cluster(rex.WorkerCrashedError())
    assert not _lost_to_the_cluster(wrapped(ValueError("a bug")))
    assert not _lost_to_the_cluster(RetrieveError("bad weights"))
