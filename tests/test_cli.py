"""Every command through click's CliRunner, plus real runs of the installed `retrieve`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval.cli.main import cli
from retrieval.units import counted
from tests.corpus import make_image


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture
def indexed(photos: Path, in_tmp: Path, small_model: Path) -> Path:
    """./images indexed into ./.retrieve, as in the README."""
    shutil.copytree(photos, in_tmp / "images")
    run("index", "images", "--weights", small_model)
    return in_tmp / "images"


def test_index_prints_a_summary_on_stdout(photos, in_tmp, small_model) -> None:
    shutil.copytree(photos, in_tmp / "images")
    result = run("index", "images", "--weights", small_model)
    assert "12 added" in result.stdout and "holds 12 images" in result.stdout
    again = run("index", "images")
    assert "0 added" in again.stdout and "12 unchanged" in again.stdout


def test_index_json_summary(photos, in_tmp, small_model) -> None:
    shutil.copytree(photos, in_tmp / "images")
    (in_tmp / "images" / "junk.jpg").write_text("not an image")
    data = json.loads(run("index", "images", "--weights", small_model, "--json").stdout)
    assert data["added"] == 12 and data["skipped"] == 1
    assert data["skip_reasons"] == {"not an image": 1}
    assert data["decoded"] == {"gpu": 0, "cpu": 12, "cpu_after_gpu_failure": 0, "skipped": 1}


def test_query_lists_k_neighbours_nearest_first(indexed) -> None:
    query = sorted(indexed.rglob("*.png"))[0]
    lines = run("query", query, "-k", "6").stdout.splitlines()
    assert lines[0] == str(query.relative_to(indexed.parent))
    assert len(lines) == 7
    distances = [float(line.split()[1]) for line in lines[1:]]
    assert distances == sorted(distances) and distances[0] < 1e-3


def test_query_json_is_one_object_per_query_with_absolute_paths(indexed) -> None:
    queries = sorted(indexed.rglob("*.png"))[:2]
    lines = run("query", *queries, "-k", "3", "--json").stdout.splitlines()
    assert len(lines) == 2
    for line, query in zip(lines, queries):
        data = json.loads(line)
        assert data["query"] == str(query.resolve())
        assert [n["rank"] for n in data["neighbors"]] == [1, 2, 3]
        for neighbor in data["neighbors"]:
            assert Path(neighbor["path"]).is_absolute() and Path(neighbor["path"]).exists()
            assert set(neighbor) >= {"rank", "path", "distance", "label"}


def test_query_a_folder_answers_every_image(indexed) -> None:
    lines = run("query", indexed, "-k", "2", "--json").stdout.splitlines()
    assert len(lines) == 12


def test_grid_writes_a_png_with_one_row_per_query(indexed, in_tmp) -> None:
    result = run("grid", indexed, "-o", "grid.png", "-k", "6", "--n", "3", "--tile", "64")
    assert "grid.png" in result.stdout
    with Image.open(in_tmp / "grid.png") as image:
        width, height = image.size
    assert width > 7 * 64 and height > 3 * 64


def test_info_describes_the_index(indexed) -> None:
    text = run("info").stdout
    assert "12 indexed" in text and "fc7" in text and "Flat" in text
    data = json.loads(run("info", "--json").stdout)
    assert data["count"] == 12 and data["dim"] == 4096 and data["layer"] == "fc7"


def test_remove_then_query_no_longer_finds_the_file(indexed) -> None:
    victim = sorted(indexed.rglob("*.png"))[0]
    assert "removed 1 image" in run("remove", victim).stdout
    again = run("remove", victim, ok=False)  # gone already: said, and a failing exit, as rm does
    assert again.exit_code == 1 and "not in the index" in again.stderr
    data = json.loads(run("query", victim, "-k", "11", "--json").stdout)
    assert all(Path(n["path"]).resolve() != victim.resolve() for n in data["neighbors"])


def test_evaluate_retrieval_reports_precision_and_map(indexed) -> None:
    data = json.loads(run("evaluate", indexed, "--retrieval", "-k", "3", "--json").stdout)
    assert 0 <= data["precision@3"] <= 1 and 0 <= data["mean_average_precision"] <= 1
    text = run("evaluate", indexed, "--retrieval", "-k", "3").stdout
    assert text.startswith("12 queries against 12 indexed images: precision@3 ")
    assert f"precision@3 {data['precision@3']:.3f}, mAP " in text and "(full ranking)" in text


def test_evaluate_with_an_index_and_no_classifier_evaluates_retrieval(indexed) -> None:
    asked = json.loads(run("evaluate", indexed, "--retrieval", "-k", "3", "--json").stdout)
    implied = run("evaluate", indexed, "--index", ".retrieve", "-k", "3", "--json")
    untimed = {key: value for key, value in asked.items() if key != "seconds"}
    assert {
        key: value for key, value in json.loads(implied.stdout).items() if key != "seconds"
    } == untimed
    neither = run("evaluate", indexed, ok=False)
    assert neither.exit_code == 2 and "--weights CHECKPOINT" in neither.output


def test_recall_compares_an_approximate_index_with_the_exact_one(indexed, small_model) -> None:
    run("index", "images", "--index", "hnsw", "--index-type", "HNSW32", "--weights", small_model)
    data = json.loads(
        run(
            "recall",
            "--index",
            "hnsw",
            "--against",
            ".retrieve",
            "-k",
            "5",
            "--queries",
            "12",
            "--json",
        ).stdout
    )
    assert data["queries"] == 12 and data["recall_at_k"] >= 0.9
    assert (
        "recall@5" in run("recall", "--index", "hnsw", "--against", ".retrieve", "-k", "5").stdout
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["index", "no-such-folder"], 2, "does not exist"),
        (["query", "missing.jpg"], 2, "does not exist"),
        (["query", "q.png", "-k", "0"], 2, "-k"),
        (["query", "q.png"], 1, "no index"),
        (["info"], 1, "no index"),
        (["index", "images", "--weights", "missing.pt"], 1, "not found"),
        (["index", "images", "--weights", "corrupt.pt"], 1, "cannot read weights"),
        (["index", "q.png"], 2, "is a file"),
        (["index", "empty"], 1, "no images"),
        (["index", "images", "--index", "q.png/index"], 1, "q.png/index: not a directory"),
    ],
)
def test_user_mistakes_get_one_line_and_an_exit_code(photos, in_tmp, args, code, message) -> None:
    shutil.copytree(photos, in_tmp / "images")
    shutil.copy(sorted(photos.rglob("*.png"))[0], in_tmp / "q.png")
    (in_tmp / "corrupt.pt").write_bytes(b"garbage")
    (in_tmp / "empty").mkdir()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_closed_pipe_ends_quietly_and_other_os_errors_are_one_line() -> None:
    from retrieval.cli.main import RetrieveGroup

    group = RetrieveGroup()

    @group.command("piped")
    def piped() -> None:
        raise BrokenPipeError(32, "Broken pipe")  # `retrieve query ... | head` once head is done

    @group.command("full")
    def full() -> None:
        raise OSError(28, "No space left on device", "out/grid.png")

    cut = CliRunner().invoke(group, ["piped"])
    assert cut.exit_code == 141 and cut.stderr == ""
    disk = CliRunner().invoke(group, ["full"])
    assert disk.exit_code == 1 and disk.stderr == "Error: out/grid.png: no space left on device\n"


def test_k_larger_than_the_index_answers_with_all_it_holds_and_says_so(indexed) -> None:
    """k is a most: the default 6 on a collection of 3 is not a user's mistake."""
    query = str(sorted(indexed.rglob("*.png"))[0])
    result = CliRunner().invoke(cli, ["query", query, "-k", "50", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["neighbors"]) == 12
    assert "only 12 neighbours of the 50 asked: the index holds 12 images" in result.stderr
    grid = CliRunner().invoke(cli, ["grid", query, "-k", "50", "-o", "g.png", "--tile", "32"])
    assert grid.exit_code == 0, grid.output
    assert "(1 query x 11 neighbours)" in grid.stdout  # the query itself left out
    with Image.open("g.png") as image:
        assert image.width < 14 * 36  # 11 columns drawn, not 50


def test_an_approximate_search_finding_fewer_than_k_says_so(indexed, small_model) -> None:
    run("index", "images", "--index", "ivf", "--index-type", "IVF4,Flat", "--weights", small_model)
    query = str(sorted(indexed.rglob("*.png"))[0])
    result = run("query", query, "--index", "ivf", "-k", "12", "--nprobe", "1", "--json")
    found = len(json.loads(result.stdout)["neighbors"])
    assert found < 12  # one of four lists probed
    said = f"only {counted(found, 'neighbour')} of the 12 asked: the approximate search"
    assert said in result.stderr


def test_an_index_of_no_images_says_so_instead_of_searching(in_tmp, small_model) -> None:
    (in_tmp / "bad").mkdir()
    (in_tmp / "bad" / "x.jpg").write_text("not a picture")
    run("index", "bad", "--weights", str(small_model))
    make_image(in_tmp / "q.png")
    for command in (["query", "q.png"], ["grid", "q.png"], ["cluster"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1, result.output
        assert "holds no images yet" in result.stderr and "Traceback" not in result.output


def _retrieve() -> str:
    found = shutil.which("retrieve", path=os.path.dirname(sys.executable))
    assert found, "the retrieve console script is not installed"
    return found


def test_installed_retrieve_answers_help() -> None:
    # That it answers without importing torch is pinned in test_startup.py (no timing here).
    result = subprocess.run([_retrieve(), "--help"], capture_output=True, text=True, check=True)
    for command in ("index", "query", "grid", "info", "train"):
        assert command in result.stdout


def test_installed_retrieve_indexes_and_queries_as_the_readme_says(photos, in_tmp, small_model):
    shutil.copytree(photos, in_tmp / "images")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    index = subprocess.run(
        [_retrieve(), "index", "./images", "--weights", str(small_model)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert index.returncode == 0, index.stderr
    query = sorted(Path("images").rglob("*.png"))[0]
    result = subprocess.run(
        [_retrieve(), "query", str(query), "-k", "6"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[2] == str(query)
    bad = subprocess.run(
        [_retrieve(), "query", str(query), "-k", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_index_names_the_files_of_other_types_it_did_not_read(photos, in_tmp, small_model) -> None:
    shutil.copytree(photos, in_tmp / "images")
    for name in ("a.cr2", "b.cr2", "clip.mov"):
        (in_tmp / "images" / name).write_bytes(b"x")
    result = run("index", "images", "--weights", small_model)
    assert "12 added" in result.stdout
    assert "3 files of other types: .cr2 (2), .mov (1)" in result.stdout
