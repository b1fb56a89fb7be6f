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
