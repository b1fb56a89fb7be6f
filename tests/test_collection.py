"""retrieve duplicates: exact, copy and similar tiers, calibration, actions and their undo."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval import Index
from retrieval.build.options import IndexOptions
from retrieval.collection.near import NearOptions, near_pairs
from retrieval.collection.vectors import ArrayVectors
from retrieval.duplicates import actions
from retrieval.duplicates.calibration import (
    CalibrationOptions,
    calibrate,
    pick_threshold,
    precision_recall,
)
from retrieval.duplicates.edits import EDITS
from retrieval.duplicates.groups import DuplicateOptions, find_duplicates
from retrieval.duplicates.keep import representative_order
from tests.corpus import structured_rgb

DISTINCT = 16


def distinct_image(i: int, n: int = DISTINCT, size: int = 64) -> Image.Image:
    """Images unlike each other: own shapes and gradient (seed) and own hue (tint)."""
    rgb = structured_rgb((size, size), seed=i).astype(np.int16)
    hue = Image.new("HSV", (1, 1), (int(255 * i / n), 255, 255)).convert("RGB").getpixel((0, 0))
    return Image.fromarray(np.clip(rgb // 2 + np.array(hue, np.int16) // 2, 0, 255).astype("uint8"))


def make_collection(root: Path) -> dict[str, Path]:
    """16 distinct PNGs, a byte-for-byte copy of one (another folder) and a JPEG q50 of another
    (at 64 px a q20 copy is too degraded to verify: small pictures need near-identity)."""
    (root / "album").mkdir(parents=True)
    for i in range(DISTINCT):
        distinct_image(i).save(root / "album" / f"img{i:02d}.png")
    (root / "backup").mkdir()
    copy = root / "backup" / "img00.png"
    shutil.copy(root / "album" / "img00.png", copy)
    edited = root / "album" / "img05-small.jpg"
    distinct_image(5).save(edited, quality=50)
    return {
        "copy": copy,
        "original": root / "album" / "img00.png",
        "edited": edited,
        "edited_original": root / "album" / "img05.png",
    }


@pytest.fixture(scope="module")
def collection(tmp_path_factory, small_model):
    root = tmp_path_factory.mktemp("collection")
    files = make_collection(root / "photos")
    ix = Index.create(root / "idx", root / "photos", IndexOptions(weights=str(small_model)))
    yield ix, files, root
    ix.close()


def separating_threshold(ix: Index) -> float:
    """Just under the closest pair of different source images (so the test pins the grouping,
    not the quality of an untrained model)."""
    rows = [r for r in ix.rows(limit=None) if "album/img" in r.path and r.path.endswith(".png")]
    vectors = ix.vectors([r.id for r in rows])
    d = np.linalg.norm(vectors[:, None] - vectors[None], axis=2)
    np.fill_diagonal(d, np.inf)
    return float(d.min()) * 0.9


def test_exact_copy_is_exact_tier_edited_copy_copy_tier_distinct_apart(collection) -> None:
    ix, files, _ = collection
    threshold = separating_threshold(ix)
    report = find_duplicates(ix, DuplicateOptions(keep="first", similar_threshold=threshold))
    exact, near = report.of_kind("exact"), report.of_kind("copy")
    assert report.of_kind("similar") == []  # the only fc7-close pair is a verified copy
    assert [sorted(m.path for m in g.members) for g in exact] == [
        sorted([str(files["original"]), str(files["copy"])])
    ]
    assert exact[0].members[0].distance == 0.0
    assert len(near) == 1
    assert {m.path for m in near[0].members} == {
        str(files["edited"]),
        str(files["edited_original"]),
    }
    assert near[0].members[1].evidence["test"] == "same framing"
    in_groups = [m.path for g in report.groups for m in g.members]
    assert len(in_groups) == 4  # nothing else grouped


def test_keep_chooses_the_representative(collection) -> None:
    ix, files, _ = collection
    rows = ix.rows([ix.id_of(files["edited"]), ix.id_of(files["edited_original"])])
    # The q50 JPEG has as many pixels as its PNG original but fewer bytes.
    assert representative_order(rows, "largest")[0].path == str(files["edited_original"])
    assert representative_order(rows, "first")[0].path == min(r.path for r in rows)
    assert representative_order(rows, "oldest")[0] == min(rows, key=lambda r: r.mtime_ns)


def test_near_pass_pca_finds_the_exact_pairs_and_ivf_most() -> None:
    rng = np.random.default_rng(0)
    base = np.maximum(rng.normal(size=(3000, 256)), 0).astype(np.float32)
    twins = base[:300] + rng.normal(scale=0.05, size=(300, 256)).astype(np.float32)
    source = ArrayVectors(np.concatenate([base, twins]))
    exact = near_pairs(source, 1.5, NearOptions(method="exact", block=1000))
    pca = near_pairs(source, 1.5, NearOptions(method="pca", dim=32, block=1000))
    ivf = near_pairs(source, 1.5, NearOptions(method="ivf", dim=32, nprobe=8, block=1000))
    pairs = lambda p: set(zip(p.a.tolist(), p.b.tolist()))  # noqa: E731
    assert len(exact) >= 300 and all(a < b for a, b in pairs(exact))
    assert {(i, 3000 + i) for i in range(300)} <= pairs(exact)
    assert pairs(pca) == pairs(exact)
    assert pca.candidates >= len(pca)
    assert len(pairs(ivf) & pairs(exact)) >= 0.9 * len(exact) and pairs(ivf) <= pairs(exact)
    np.testing.assert_allclose(np.sort(pca.distance), np.sort(exact.distance), rtol=1e-3)


def test_threshold_rule_reaches_the_asked_precision() -> None:
    rng = np.random.default_rng(1)
    positives = rng.uniform(0, 1.0, 400)
    negatives = rng.uniform(0.8, 5.0, 4000)
    t = pick_threshold(positives, negatives, 0.99)
    precision, recall = precision_recall(positives, negatives, t)
    assert precision >= 0.99 and 0.8 < t < 1.2 and recall > 0.8
    assert precision_recall(positives, negatives, t * 1.5)[0] < 0.99
    # Four copies per image counting as one: a stricter threshold, never a looser one.
    assert pick_threshold(positives, negatives, 0.99, weight=0.25) <= t


def test_calibration_uses_the_collections_own_edited_copies(collection) -> None:
    ix, _, _ = collection
    result = calibrate(ix, CalibrationOptions(sample=12, negatives=6))
    assert result.sampled == 12 and len(result.positives) == 12 * len(EDITS)
    assert set(result.edits) == set(EDITS) == set(result.per_edit)
    assert all(t.copies == 12 and t.verified <= t.proposed <= 12 for t in result.per_edit.values())
    verified = sum(t.verified for t in result.per_edit.values())
    assert result.recall == verified / (12 * len(EDITS))
    assert result.negatives_checked > 0 and 0 <= result.false_copies <= result.negatives_checked
    # the similar tier's threshold keeps its own rule
    precision, _ = precision_recall(
        result.positives, result.negatives, result.threshold, 1 / len(EDITS)
    )
    assert precision >= 0.99
    assert [row[0] for row in result.table()] == sorted(row[0] for row in result.table())


def cli():
    import click

    from retrieval.cli import duplicates_cmds

    group = click.Group()
    duplicates_cmds.register(group)
    return group


def test_duplicates_json_is_one_group_per_line(collection) -> None:
    ix, _files, _ = collection
    result = CliRunner().invoke(
        cli(),
        [
            "duplicates",
            "--index",
            str(ix.directory),
            "--json",
            "--keep",
            "first",
        ],
    )
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["kind"] for g in groups] == ["exact", "copy"]
    for g in groups:
        assert set(g) == {"group", "kind", "size", "representative", "members"}
        assert g["size"] == len(g["members"]) and g["representative"] == g["members"][0]["path"]
    assert all(set(m) == {"path", "id", "distance"} for m in groups[0]["members"])
    evidence = groups[1]["members"][1]["evidence"]
    assert set(evidence) == {"test", "hash_bits", "correlation", "inliers", "edits"}
    assert evidence["correlation"] >= 0.9 and evidence["edits"]


def test_calibrate_prints_the_table_and_draws_the_histogram(collection, tmp_path) -> None:
    ix, _, _ = collection
    histogram = tmp_path / "hist.png"
    result = CliRunner().invoke(
        cli(),
        [
            "duplicates",
            "--index",
            str(ix.directory),
            "--calibrate",
            "--sample",
            "6",
            "--histogram",
            str(histogram),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "recall" in result.stdout and "precision" in result.stdout
    for edit in ("jpeg", "cropped", "mirrored", "rotated", "border", "caption"):
        assert edit in result.stdout
    assert Image.open(histogram).size[0] > 300


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.mark.parametrize("action", ["move", "symlink", "hardlink"])
def test_action_then_undo_restores_every_file_byte_for_byte(small_model, tmp_path, action) -> None:
    files = make_collection(tmp_path / "photos")
    before = tree_digest(tmp_path / "photos")
    Index.create(
        tmp_path / "idx", tmp_path / "photos", IndexOptions(weights=str(small_model))
    ).close()
    sheet = tmp_path / "sheet.png"
    args = [
        "duplicates",
        "--index",
        str(tmp_path / "idx"),
        "--keep",
        "first",
        "--action",
        action,
        "--to",
        str(tmp_path / "aside"),
        "-o",
        str(sheet),
    ]
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    assert Image.open(sheet).size[1] > 100
    moved = [files["copy"], files["edited_original"]]  # "first" keeps the other two
    for path in moved:
        if action == "move":
            assert not path.exists()
        elif action == "symlink":
            assert path.is_symlink() and path.read_bytes()  # still opens, as the representative
        else:
            assert path.stat().st_nlink == 2  # the representative's bytes, under both names
        assert actions.mirrored(tmp_path / "aside", str(path)).exists()
    log = next((tmp_path / "aside").glob("duplicates-*.log.jsonl"))
    undone = CliRunner().invoke(cli(), ["duplicates", "--undo", str(log)])
    assert undone.exit_code == 0, undone.output
    assert tree_digest(tmp_path / "photos") == before
    assert not any(p.is_symlink() for p in (tmp_path / "photos").rglob("*"))
    assert list((tmp_path / "aside").iterdir()) == [log]  # the folders the moves made are gone


def test_action_needs_a_target_and_never_deletes(collection) -> None:
    ix, _, _ = collection
    result = CliRunner().invoke(
        cli(), ["duplicates", "--index", str(ix.directory), "--threshold", "0", "--action", "move"]
    )
    assert result.exit_code == 2 and "--to" in result.output


def test_undo_leaves_a_file_that_appeared_since(tmp_path) -> None:
    (tmp_path / "photos").mkdir()
    original = tmp_path / "photos" / "a.png"
    distinct_image(1).save(original)
    from retrieval.duplicates.groups import Group, Member

    rep = tmp_path / "photos" / "rep.png"
    distinct_image(2).save(rep)
    group = Group(1, "copy", [Member(str(rep), 1, 0.0), Member(str(original), 2, 0.5)])
    report = actions.apply([group], "move", tmp_path / "aside")
    assert not original.exists()
    original.write_bytes(b"new file")
    undone = actions.undo(report.log)
    assert undone.problems and original.read_bytes() == b"new file"
    assert actions.mirrored(tmp_path / "aside", str(original)).exists()  # kept, not lost


def test_duplicates_are_never_moved_into_the_folders_they_come_from(tmp_path) -> None:
    """A --to inside the collection (or holding it) would leave the moved files where the
    next index finds them again: refused before anything moves."""
    from retrieval.duplicates.groups import Group, Member
    from retrieval.errors import RetrieveError

    album = tmp_path / "photos" / "album"
    album.mkdir(parents=True)
    rep, copy = album / "rep.png", album / "copy.png"
    distinct_image(2).save(rep)
    distinct_image(2).save(copy)
    group = Group(1, "copy", [Member(str(rep), 1, 0.0), Member(str(copy), 2, 0.5)])
    for target in (album / "aside", album, tmp_path / "photos"):
        with pytest.raises(RetrieveError, match="outside the collection"):
            actions.apply([group], "move", target)
        assert copy.exists() and not (album / "aside").exists()
    assert actions.apply([group], "move", tmp_path / "aside").done  # beside it: fine


def test_a_chain_is_split_into_components_of_the_remaining_positions() -> None:
    from retrieval.duplicates.groups import _components

    # 0 ~ 1 ~ 2 ~ 3 in a line: what is left of a chain after its representative's own members
    edges = {0: {1}, 1: {0, 2}, 2: {1, 3}, 3: {2}}
    assert _components(edges, {0, 1, 2, 3}) == [[0, 1, 2, 3]]
    assert _components(edges, {2, 3}) == [[2, 3]]
    assert _components(edges, {0, 2}) == []


def test_largest_means_most_pixels_before_most_bytes(tmp_path) -> None:
    from retrieval.indexes.rows import Row

    big, small = tmp_path / "big.jpg", tmp_path / "small.png"
    distinct_image(1, size=64).save(big, quality=10)
    distinct_image(1, size=32).save(small)
    rows = [
        Row(1, str(small), small.stat().st_size * 10, 0, "a", "x", "indexed"),
        Row(2, str(big), big.stat().st_size, 0, "b", "x", "indexed"),
    ]
    assert representative_order(rows, "largest")[0].path == str(big)
