"""`retrieve serve`'s duplicates and clusters views through Starlette's TestClient."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval import Index, IndexOptions
from retrieval.cli.main import cli
from retrieval.collection.near import NearOptions, TooManyPairs, near_pairs
from retrieval.collection.vectors import ArrayVectors
from retrieval.duplicates.calibration import Calibration
from retrieval.serve import collection as views
from tests.test_collection import make_collection, separating_threshold
from tests.test_serve import client_for

IMAGES = 18  # 16 distinct, an exact copy, an edited copy


def build(root: Path, small_model: Path) -> tuple[dict[str, Path], Path]:
    files = make_collection(root / "photos")
    Index.create(root / "idx", root / "photos", IndexOptions(weights=str(small_model))).close()
    return files, root / "idx"


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_model):
    return build(tmp_path_factory.mktemp("serve-collection"), small_model)


@pytest.fixture(scope="module")
def index(built):
    with Index.open(built[1]) as ix:
        yield ix


@pytest.fixture(scope="module")
def threshold(index) -> float:
    return separating_threshold(index)


@pytest.fixture
def client(index):
    with client_for(index) as c:  # a new app: its caches start empty
        yield c


def digests(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def strip_links(group: dict) -> dict:
    members = [{k: v for k, v in m.items() if k not in ("thumb_url", "image_url")} for m in group]
    return members


# -- duplicates ----------------------------------------------------------------------------------


def test_duplicates_finds_the_exact_copy_and_the_edited_copy_and_nothing_else(
    client, built, threshold, tmp_path
) -> None:
    files, _ = built
    before = digests(files["original"].parents[1])
    # The server is read-only: the CLI's action options mean nothing to it.
    answer = client.get(
        "/api/duplicates",
        params={"threshold": threshold, "action": "move", "to": str(tmp_path / "moved")},
    )
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["threshold"] == pytest.approx(threshold) and data["calibrated"] is False
    assert data["images"] == IMAGES and data["total"] == 2
    assert (data["exact_groups"], data["copy_groups"]) == (1, 1)
    exact, near = data["groups"]
    assert exact["kind"] == "exact" and {m["path"] for m in exact["members"]} == {
        str(files["original"]),
        str(files["copy"]),
    }
    assert near["kind"] == "copy" and {m["path"] for m in near["members"]} == {
        str(files["edited"]),
        str(files["edited_original"]),
    }
    assert near["representative"] == near["members"][0]["path"]
    assert near["members"][0]["distance"] == 0 and 0 < near["members"][1]["distance"] <= threshold
    for member in exact["members"] + near["members"]:
        assert member["thumb_url"] == f"/thumb/{member['id']}"
        assert client.get(member["thumb_url"]).headers["content-type"] == "image/jpeg"
    assert digests(files["original"].parents[1]) == before
    assert not (tmp_path / "moved").exists()


def test_duplicates_groups_are_what_retrieve_duplicates_json_prints(client, built, threshold):
    printed = CliRunner().invoke(
        cli,
        [
            "duplicates",
            "--index",
            str(built[1]),
            "--similar",
            "--threshold",
            str(threshold),
            "--json",
        ],
    )
    assert printed.exit_code == 0, printed.output
    expected = [json.loads(line) for line in printed.stdout.splitlines()]
    got = client.get("/api/duplicates", params={"threshold": str(threshold)}).json()["groups"]
    assert [{**g, "members": strip_links(g["members"])} for g in got] == expected


def test_duplicate_groups_page_by_offset_and_limit(client, threshold) -> None:
    params = {"threshold": threshold}
    first = client.get("/api/duplicates", params={**params, "limit": 1}).json()
    second = client.get("/api/duplicates", params={**params, "limit": 1, "offset": 1}).json()
    assert first["total"] == second["total"] == 2
    assert [g["group"] for g in first["groups"] + second["groups"]] == [1, 2]
    assert second["cached"] is True  # the same threshold: the pass ran once


def test_keep_picks_each_groups_lead_as_retrieve_duplicates_keep_does(
    client, built, threshold
) -> None:
    files, index_dir = built
    params = {"threshold": threshold}
    by_size = client.get("/api/duplicates", params=params).json()
    by_path = client.get("/api/duplicates", params={**params, "keep": "first"}).json()
    assert (by_size["keep"], by_path["keep"]) == ("best", "first")
    assert by_path["cached"] is False  # another question, not the largest-first answer again
    # The edited copy is a JPEG q50 of the same pixels: fewer bytes, but first by path.
    near_by_size, near_by_path = by_size["groups"][1], by_path["groups"][1]
    assert near_by_size["representative"] == str(files["edited_original"])
    assert near_by_path["representative"] == str(files["edited"])
    assert near_by_path["members"][0]["distance"] == 0
    arguments = ["--index", str(index_dir), "--similar", "--threshold", str(threshold)]
    arguments += ["--keep", "first"]
    printed = CliRunner().invoke(cli, ["duplicates", *arguments, "--json"])
    expected = [json.loads(line) for line in printed.stdout.splitlines()]
    assert [{**g, "members": strip_links(g["members"])} for g in by_path["groups"]] == expected


def test_a_distance_too_small_for_any_edit_leaves_no_similar_tier(client) -> None:
    data = client.get("/api/duplicates", params={"threshold": "0"}).json()
    # the verified copy stays (verification, not the distance, decides a copy); nothing similar
    assert [g["kind"] for g in data["groups"]] == ["exact", "copy"]


def test_without_a_threshold_the_calibrated_one_is_used_and_computed_once(
    client, index, monkeypatch
) -> None:
    calls = []
    real = views.calibrate

    def counted(ix, options):
        calls.append(options)
        result = real(ix, options)
        calls.append(result)
        return result

    monkeypatch.setattr(views, "calibrate", counted)
    first = client.get("/api/duplicates", params={"similar": "1"})
    assert first.status_code == 200, first.text
    data = first.json()
    calibration = calls[1]
    assert data["calibrated"] is True and data["cached"] is False
    assert data["threshold"] == pytest.approx(calibration.threshold)
    assert data["calibration"]["sampled"] == calibration.sampled == IMAGES
    assert calls[0].sample == 100 and calls[0].seed == 0  # as `retrieve duplicates`
    assert data["exact_groups"] == 1  # the exact tier does not depend on the threshold
    again = client.get("/api/duplicates", params={"similar": "1", "offset": 0}).json()
    assert again["cached"] is True and again["threshold"] == data["threshold"]
    assert len(calls) == 2


def test_concurrent_requests_share_one_calibration(client, monkeypatch) -> None:
    entered, release, calls = threading.Event(), threading.Event(), []

    def slow(ix, options):
        calls.append(1)
        entered.set()
        assert release.wait(60)
        empty = np.zeros(0, np.float32)
        return Calibration(0.0, 1.0, 0.0, empty, empty, empty, 3)

    monkeypatch.setattr(views, "calibrate", slow)
    answers = []
    asking = [
        threading.Thread(
            target=lambda: answers.append(client.get("/api/duplicates", params={"similar": "1"}))
        )
        for _ in range(3)
    ]
    asking[0].start()
    assert entered.wait(60)
    for thread in asking[1:]:
        thread.start()
    time.sleep(0.3)  # the other two are waiting on the first one's run (or about to)
    assert client.get("/api/info").status_code == 200  # the page is not blocked meanwhile
    release.set()
    for thread in asking:
        thread.join(60)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(calls) == 1 and {a.json()["threshold"] for a in answers} == {0.0}


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"threshold": "-1"}, "threshold"),
        ({"threshold": "near"}, "threshold"),
        ({"threshold": "nan"}, "threshold"),
        ({"threshold": "inf"}, "threshold"),
        ({"threshold": "1", "limit": "0"}, "limit"),
        ({"threshold": "1", "limit": "501"}, "limit"),
        ({"threshold": "1", "offset": "-1"}, "offset"),
        ({"threshold": "1", "keep": "newest"}, "keep"),
    ],
)
def test_bad_duplicate_parameters_get_422_with_a_message(client, params, word) -> None:
    answer = client.get("/api/duplicates", params=params)
    assert answer.status_code == 422 and word in answer.json()["error"]


def test_a_threshold_that_pairs_everything_is_refused_not_run(client, monkeypatch) -> None:
    monkeypatch.setattr(views, "MIN_PAIRS", 20)
    monkeypatch.setattr(views, "PAIRS_PER_IMAGE", 1)
    answer = client.get("/api/duplicates", params={"threshold": "1e6"})
    assert answer.status_code == 422 and "pairs" in answer.json()["error"]
    assert client.get("/api/duplicates", params={"threshold": "0"}).status_code == 200


@pytest.mark.parametrize("method", ["exact", "pca", "ivf"])
def test_near_pairs_stop_past_max_pairs(method) -> None:
    rng = np.random.default_rng(0)
    source = ArrayVectors(rng.normal(size=(300, 64)).astype(np.float32))
    options = NearOptions(method=method, dim=16, block=64, k=16)
    assert len(near_pairs(source, 1e6, options)) > 1000  # without the cap: every pair it sees
    with pytest.raises(TooManyPairs, match="more than 1,000 pairs"):
        near_pairs(source, 1e6, NearOptions(method=method, dim=16, block=64, max_pairs=1000))


def test_too_few_images_to_calibrate_is_422_naming_the_parameter(tmp_path, small_model) -> None:
    make_collection(tmp_path / "photos")
    for extra in sorted((tmp_path / "photos" / "album").iterdir())[2:]:
        extra.unlink()
    shutil.rmtree(tmp_path / "photos" / "backup")
    with (
        Index.create(
            tmp_path / "idx", tmp_path / "photos", IndexOptions(weights=str(small_model))
        ) as ix,
        client_for(ix) as c,
    ):
        answer = c.get("/api/duplicates", params={"similar": "1"})
        assert answer.status_code == 422 and "?threshold=" in answer.json()["error"]
        assert c.get("/api/duplicates", params={"threshold": "1"}).status_code == 200


# -- clusters ------------------------------------------------------------------------------------


def test_clusters_put_every_image_in_one_cluster_as_retrieve_cluster_does(client, built) -> None:
    answer = client.get("/api/clusters", params={"n": 3, "per": 100, "outliers": 4})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["k"] == 3 and data["images"] == IMAGES and len(data["clusters"]) == 3
    seen = [(m["id"], c["cluster"]) for c in data["clusters"] for m in c["members"]]
    assert len(seen) == IMAGES == len({i for i, _ in seen})  # every image once
    assert sum(c["size"] for c in data["clusters"]) == IMAGES
    printed = CliRunner().invoke(cli, ["cluster", "-n", "3", "--json", "--index", str(built[1])])
    assert printed.exit_code == 0, printed.output
    lines = [json.loads(line) for line in printed.stdout.splitlines()]
    assert dict(seen) == {line["id"]: line["cluster"] for line in lines}
    for cluster in data["clusters"]:
        distances = [m["distance"] for m in cluster["members"]]
        assert distances == sorted(distances)  # nearest the centroid first
        assert all(m["thumb_url"] == f"/thumb/{m['id']}" for m in cluster["members"])
    assert set(data["scores"]) == {"purity", "nmi"}  # folders album/ and backup/ are labels
    far = data["outliers"]
    assert len(far) == 4 and [m["distance"] for m in far] == sorted(
        (m["distance"] for m in far), reverse=True
    )
    assert all(dict(seen)[m["id"]] == m["cluster"] for m in far)


def test_clusters_show_only_the_nearest_per_cluster(client) -> None:
    data = client.get("/api/clusters", params={"n": 2, "per": 2}).json()
    assert all(len(c["members"]) == min(2, c["size"]) for c in data["clusters"])


@pytest.mark.parametrize("n", ["0", "-1", str(IMAGES + 1), "1001", "x", "2.5"])
def test_k_outside_one_to_the_number_of_images_gets_422(client, n) -> None:
    answer = client.get("/api/clusters", params={"n": n})
    assert answer.status_code == 422 and "n must be" in answer.json()["error"]


def test_bad_per_or_outliers_get_422(client) -> None:
    assert client.get("/api/clusters", params={"n": 2, "per": 0}).status_code == 422
    assert client.get("/api/clusters", params={"n": 2, "outliers": 101}).status_code == 422


# -- caching per generation ----------------------------------------------------------------------


def test_results_are_reused_and_computed_again_for_a_new_generation(tmp_path, small_model):
    files, index_dir = build(tmp_path, small_model)
    with Index.open(index_dir) as served, client_for(served, reload_every=0.1) as c:
        threshold = str(separating_threshold(served))
        dup = lambda: c.get("/api/duplicates", params={"threshold": threshold}).json()  # noqa: E731
        clu = lambda: c.get("/api/clusters", params={"n": 2}).json()  # noqa: E731
        first, clustered = dup(), clu()
        assert first["cached"] is False and clustered["cached"] is False
        assert dup()["cached"] is True and clu()["cached"] is True
        assert first["exact_groups"] == 1
        copy = files["original"].parents[1] / "backup" / "img07.png"
        shutil.copy(files["original"].parent / "img07.png", copy)  # a second exact copy
        with Index.open(index_dir) as writer:
            writer.update(files["original"].parents[1], IndexOptions(weights=str(small_model)))
        deadline = time.monotonic() + 10
        while c.get("/api/info").json()["count"] != IMAGES + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        after, reclustered = dup(), clu()
        assert after["cached"] is False and after["generation"] > first["generation"]
        assert after["images"] == IMAGES + 1 and after["exact_groups"] == 2
        assert str(copy) in {m["path"] for g in after["groups"] for m in g["members"]}
        assert reclustered["cached"] is False and reclustered["images"] == IMAGES + 1
