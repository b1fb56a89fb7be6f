"""Issue 7: every problem file a collection holds, kill -9 at any moment, readers during writes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval import IndexOptions
from retrieval.build.run import index_folder
from retrieval.cli.main import cli
from retrieval.indexes import generation, store
from retrieval.indexes.staging import STAGING, read_records
from tests.corpus import expected_walk_problems, make_image, make_problem_corpus
from tests.stored import search, stored_vectors


def test_problem_corpus_indexes_every_good_file_and_skips_every_bad_one(
    tmp_path: Path, small_model: Path
) -> None:
    root = tmp_path / "corpus"
    expected = make_problem_corpus(root)
    assert len(set(expected.values())) >= 5 and len(expected) >= 25
    index_dir = tmp_path / "idx"
    result = CliRunner().invoke(
        cli,
        ["index", str(root), "--index", str(index_dir), "--weights", str(small_model), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    snapshot = store.open_snapshot(index_dir)
    rows = {Path(r.path).relative_to(root).as_posix(): r for r in snapshot.iter_rows()}
    snapshot.close()
    assert set(rows) == set(expected)
    for name, reason in expected.items():
        row = rows[name]
        if reason is None:
            assert row.status == "indexed", (name, row.reason, row.detail)
        else:
            assert (row.status, row.reason) == ("skipped", reason), name
    good = sum(1 for r in expected.values() if r is None)
    assert report["added"] == good and report["skipped"] == len(expected) - good
    problems = {
        Path(p["path"]).relative_to(root).as_posix(): p["reason"] for p in report["walk_problems"]
    }
    assert problems == expected_walk_problems(root)
    again = CliRunner().invoke(
        cli, ["index", str(root), "--index", str(index_dir), "--weights", str(small_model)]
    )
    assert again.exit_code == 0, again.output
    still = len(expected) - good  # counted unchanged, so the line says they are still out
    assert f"{still} files skipped in an earlier run, unchanged since" in again.stdout

    strict = CliRunner().invoke(
        cli,
        [
            "index",
            str(root),
            "--index",
            str(tmp_path / "strict"),
            "--weights",
            str(small_model),
            "--strict",
        ],
    )
    assert strict.exit_code == 1 and "--strict" in strict.stderr


def test_unicode_names_round_trip_through_json(tmp_path, small_model) -> None:
    names = ["with space.png", "naïve café.png", "日本語.png", "line\nbreak.png", "emoji 🐈.png"]
    for i, name in enumerate(names):
        make_image(tmp_path / "imgs" / "x" / name, seed=i)
    index_dir = tmp_path / "idx"
    index_folder(tmp_path / "imgs", index_dir, IndexOptions(weights=str(small_model)))
    query = tmp_path / "imgs" / "x" / "line\nbreak.png"
    result = CliRunner().invoke(
        cli, ["query", str(query), "-k", "5", "--index", str(index_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    found = {os.path.basename(n["path"]) for n in data["neighbors"]}
    assert found == set(names)
    assert all(Path(n["path"]).exists() for n in data["neighbors"])


def _index_command(folder: Path, index_dir: Path, model: Path, *extra: str) -> list[str]:
    code = "from retrieval.cli.main import cli; cli()"
    return [
        sys.executable,
        "-c",
        code,
        "index",
        str(folder),
        "--index",
        str(index_dir),
        "--weights",
        str(model),
        "--workers",
        "0",
        "--batch-size",
        "8",
        *extra,
    ]


def _chunk_identities(index_dir: Path) -> dict[str, tuple[int, int]]:
    chunks = (index_dir / STAGING).glob("chunk-*.npz")
    return {c.name: (c.stat().st_ino, c.stat().st_mtime_ns) for c in chunks}


def _staged_keys(index_dir: Path) -> list[tuple]:
    keys = []
    for chunk in sorted((index_dir / STAGING).glob("chunk-*.npz")):
        keys += [r.key for r in read_records(chunk)]
    return keys


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, small_model: Path
) -> None:
    folder = tmp_path / "imgs"
    for i in range(240):
        make_image(folder / f"c{i % 4}" / f"{i:03d}.png", seed=i)
    reference = tmp_path / "reference"
    subprocess.run(_index_command(folder, reference, small_model), check=True, capture_output=True)

    index_dir = tmp_path / "idx"
    rng = random.Random(7)
    kills = 0
    for target_chunks in (1, rng.randint(2, 4), rng.randint(5, 7)):
        before, before_files = _staged_keys(index_dir), _chunk_identities(index_dir)
        process = subprocess.Popen(
            _index_command(folder, index_dir, small_model, "--chunk-size", "16"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            chunks = list((index_dir / STAGING).glob("chunk-*.npz"))
            if len(chunks) >= target_chunks:
                time.sleep(rng.uniform(0, 0.3))  # somewhere inside the next chunk
                break
            time.sleep(0.01)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        after = _staged_keys(index_dir)
        assert after[: len(before)] == before  # finished chunks survive the kill
        after_files = _chunk_identities(index_dir)
        assert {n: after_files.get(n) for n in before_files} == before_files  # never rewritten
        assert len(set(after)) == len(after)  # and nothing was extracted into two chunks
    assert kills >= 2
    assert not (index_dir / "manifest.json").exists()  # no half index was ever committed

    staged = len(_staged_keys(index_dir))
    final = subprocess.run(
        _index_command(folder, index_dir, small_model, "--json", "--chunk-size", "16"),
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads(final.stdout)
    assert report["resumed"] == staged and report["extracted"] == 240 - staged
    ours, theirs = stored_vectors(index_dir), stored_vectors(reference)
    assert sorted(ours) == sorted(theirs)
    for path in theirs:
        np.testing.assert_allclose(ours[path], theirs[path], atol=1e-4)
    assert not (index_dir / STAGING).exists()


@pytest.mark.slow
def test_sigkill_during_an_update_leaves_the_previous_index_usable(tmp_path, small_model) -> None:
    folder = tmp_path / "imgs"
    for i in range(60):
        make_image(folder / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    index_dir = tmp_path / "idx"
    subprocess.run(_index_command(folder, index_dir, small_model), check=True, capture_output=True)
    before = stored_vectors(index_dir)
    for i in range(60, 200):
        make_image(folder / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    for delay in (0.5, 2.0, 3.5):
        process = subprocess.Popen(
            _index_command(folder, index_dir, small_model, "--chunk-size", "16"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        current = stored_vectors(index_dir)  # opens cleanly: old or new, never a mix
        assert sorted(current) in (sorted(before), sorted(str(p) for p in folder.rglob("*.png")))
    subprocess.run(_index_command(folder, index_dir, small_model), check=True, capture_output=True)
    assert len(stored_vectors(index_dir)) == 200


@pytest.mark.slow
def test_queries_during_a_rebuild_always_see_a_whole_index(tmp_path, small_model) -> None:
    folder = tmp_path / "imgs"
    for i in range(48):
        make_image(folder / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    index_dir = tmp_path / "idx"
    index_folder(folder, index_dir, IndexOptions(weights=str(small_model)))
    query = sorted(folder.rglob("*.png"))[5]
    (expected,) = search(index_dir, [query], 5)
    want = [(n.path, round(n.distance, 3)) for n in expected.neighbors]

    stop = threading.Event()
    generations = []

    def rebuild() -> None:
        while not stop.is_set():
            subprocess.run(
                _index_command(folder, index_dir, small_model, "--rebuild"),
                check=True,
                capture_output=True,
            )
            generations.append(json.loads((index_dir / "manifest.json").read_text())["generation"])

    writer = threading.Thread(target=rebuild)
    writer.start()
    answered = 0
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline or len(generations) < 2:
            (result,) = search(index_dir, [query], 5)
            assert [(n.path, round(n.distance, 3)) for n in result.neighbors] == want
            answered += 1
            if time.monotonic() > deadline + 60:
                break
    finally:
        stop.set()
        writer.join()
    assert answered > 5 and len(generations) >= 2


def test_a_second_index_run_is_refused_while_one_writes(tmp_path, small_model) -> None:
    folder = tmp_path / "imgs"
    make_image(folder / "a" / "x.png", seed=1)
    index_dir = tmp_path / "idx"
    with generation.write_lock(index_dir):
        result = CliRunner().invoke(
            cli, ["index", str(folder), "--index", str(index_dir), "--weights", str(small_model)]
        )
    assert result.exit_code == 1
    assert "another `retrieve` is writing" in result.stderr
