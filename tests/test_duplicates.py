"""Duplicates you can trust: every edit verified with its evidence, a second shot and a different
photo refused, the three tiers, reference folders, the user's decisions, --keep best."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFilter

from retrieval import Index, IndexOptions
from retrieval.duplicates.edits import EDITS, edited, encoded
from retrieval.duplicates.keep import Ranking
from retrieval.duplicates.verify import ImageCache, verify_pair
from retrieval.images.hashes import ISOMETRIES, best_isometry, signature
from retrieval.images.signing import signature_of_file
from retrieval.indexes.rows import Row
from tests.corpus import scene

# What the verifier must say about each edit (one word of its evidence at least).
SAYS = {
    "jpeg": "re-encoded",
    "shrunk": "resized",
    "cropped": "cropped",
    "mirrored": "mirrored",
    "rotated": "rotated 90",
    "border": "border",
    "greyscale": "greyscale",
    "caption": "caption|painted over",
    "brightness": "brightness",
}


def saved(folder: Path, name: str, image: Image.Image) -> tuple[str, object]:
    path = folder / name
    path.write_bytes(encoded(image))
    return str(path), signature_of_file(str(path))


@pytest.mark.parametrize(
    "turn, name",
    [
        (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored"),
        (Image.Transpose.FLIP_TOP_BOTTOM, "flipped upside down"),
        (Image.Transpose.ROTATE_180, "rotated 180°"),
        (Image.Transpose.ROTATE_270, "rotated 90° clockwise"),
        (Image.Transpose.ROTATE_90, "rotated 90° anticlockwise"),
        (Image.Transpose.TRANSPOSE, "transposed"),
        (Image.Transpose.TRANSVERSE, "transversed"),
    ],
)
def test_the_eight_hashes_name_the_turn_or_flip(turn, name) -> None:
    picture = scene(1)
    bits, found = best_isometry(
        signature(picture).hashes, signature(picture.transpose(turn)).hashes
    )
    assert bits <= 2 and ISOMETRIES[found] == name


def test_the_as_is_hash_is_imagehash_phash() -> None:
    imagehash = pytest.importorskip("imagehash")
    picture = scene(2)
    assert f"{int(signature(picture).hashes[0]):016x}" == str(imagehash.phash(picture))


@pytest.mark.parametrize("edit", EDITS)
def test_every_edit_is_verified_and_its_evidence_names_it(tmp_path, edit) -> None:
    rng = np.random.default_rng(3)
    images = ImageCache()
    for seed in range(2):
        original = saved(tmp_path, f"o{seed}.jpg", scene(seed))
        copy = saved(tmp_path, f"c{seed}.jpg", edited(scene(seed), edit, rng))
        verdict = verify_pair(original, copy, images)
        assert verdict.copy, (edit, verdict.evidence())
        words = SAYS[edit].split("|")
        assert any(w in said for said in verdict.edits for w in words), verdict.edits
        assert verify_pair(copy, original, images).copy  # either way round


def test_a_caption_painted_over_the_picture_is_a_copy(tmp_path) -> None:
    from PIL import ImageDraw

    images = ImageCache()
    for seed in range(3):
        original = saved(tmp_path, f"o{seed}.jpg", scene(seed))
        meme = scene(seed)
        ImageDraw.Draw(meme).rectangle((0, 110, 192, 144), fill=(255, 255, 255))
        verdict = verify_pair(original, saved(tmp_path, f"m{seed}.jpg", meme), images)
        assert verdict.copy and any("painted over" in e for e in verdict.edits), verdict.evidence()


def test_two_overlapping_views_are_not_copies(tmp_path) -> None:
    images = ImageCache()
    wide = scene(5, (288, 144))
    left = saved(tmp_path, "left.jpg", wide.crop((0, 0, 192, 144)))
    right = saved(tmp_path, "right.jpg", wide.crop((96, 0, 288, 144)))
    assert not verify_pair(left, right, images).copy  # a pan: neither lies inside the other


def test_a_second_shot_and_a_different_photo_are_not_copies(tmp_path) -> None:
    images = ImageCache()
    for seed in range(3):
        original = saved(tmp_path, f"o{seed}.jpg", scene(seed))
        again = saved(tmp_path, f"again{seed}.jpg", scene(seed, moved=7 + seed))
        other = saved(tmp_path, f"other{seed}.jpg", scene(seed + 10))
        assert not verify_pair(original, again, images).copy
        assert not verify_pair(original, other, images).copy


def test_keep_best_prefers_pixels_then_sharpness(tmp_path) -> None:
    sharp, blurred, small = tmp_path / "sharp.png", tmp_path / "blurred.png", tmp_path / "s.png"
    scene(4, (256, 192)).save(sharp)
    scene(4, (256, 192)).filter(ImageFilter.GaussianBlur(2)).save(blurred)
    scene(4, (128, 96)).save(small)

    def row(i, path):
        return Row(i, str(path), path.stat().st_size, 0, f"h{i}", "x", "indexed")

    rows = [row(1, small), row(2, blurred), row(3, sharp)]
    ranking = Ranking("best", images=ImageCache())
    assert [r.path for r in ranking.order(rows)] == [str(sharp), str(blurred), str(small)]
    reference = Ranking("best", references=[str(tmp_path / "refs")], images=ImageCache())
    (tmp_path / "refs").mkdir()
    kept = tmp_path / "refs" / "kept.png"
    shutil.copy(small, kept)
    assert reference.order([*rows, row(4, kept)])[0].path == str(kept)


def test_keep_best_does_not_prefer_a_copy_that_lost_colour_or_gained_speckle(tmp_path) -> None:
    """A greyscale copy, a dithered GIF (its speckle reads as detail to a plain Laplacian) and a
    washed-out lossless copy of the same size never lead their original, and a link never
    leads the file it points to (moving that file would break the link)."""
    from PIL import ImageEnhance

    picture = scene(5, (256, 192))
    original = tmp_path / "original.jpg"
    original.write_bytes(encoded(picture))
    copies = {
        "grey": tmp_path / "grey.png",
        "dithered": tmp_path / "dithered.gif",
        "washed out": tmp_path / "washed.png",
    }
    picture.convert("L").save(copies["grey"])
    picture.convert("P", dither=Image.Dither.FLOYDSTEINBERG, palette=Image.Palette.WEB).save(
        copies["dithered"]
    )
    ImageEnhance.Contrast(picture).enhance(0.75).save(copies["washed out"])
    link = tmp_path / "a link.jpg"
    link.symlink_to(original)
    signatures = {}

    def row(i: int, path: Path) -> Row:
        signatures[f"h{i}"] = signature_of_file(str(path))
        return Row(i, str(path), path.stat().st_size, 0, f"h{i}", "x", "indexed")

    first = row(0, original)
    for i, (name, copy) in enumerate(copies.items(), 1):
        ranking = Ranking("best", signatures=signatures, images=ImageCache())
        assert ranking.order([row(i, copy), first])[0] is first, name
    for keep in ("best", "largest", "oldest", "first"):
        ranking = Ranking(keep, signatures=signatures, images=ImageCache())
        assert ranking.order([row(9, link), first])[0] is first, keep
    # an orientation tag alone is not a camera's metadata: a copy a viewer turned does not lead
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.save(turned, quality=80, exif=exif)  # smaller: only the EXIF step could pick it
    ranking = Ranking("best", signatures=signatures, images=ImageCache())
    assert ranking.order([row(12, turned), first])[0] is first
    # a drawing in a few colours is no reduced photo: its lossless palette file still leads
    drawing = Image.new("P", (256, 192), 0)
    drawing.putpalette([255, 255, 255, 200, 30, 30, 20, 60, 200, 0, 0, 0])
    for shape, colour in enumerate((1, 2, 3)):
        drawing.paste(colour, (20 + 70 * shape, 40, 80 + 70 * shape, 150))
    drawn, its_copy = tmp_path / "drawing.png", tmp_path / "drawing.jpg"
    drawing.save(drawn)
    its_copy.write_bytes(encoded(drawing.convert("RGB")))
    ranking = Ranking("best", signatures=signatures, images=ImageCache())
    assert ranking.order([row(10, its_copy), row(11, drawn)])[0].path == str(drawn)


def test_only_keep_best_opens_the_pictures(tmp_path) -> None:
    """Sharpness needs the pixels; largest, oldest and first go by the files' headers alone."""

    class Unopenable(ImageCache):
        def grey(self, path: str):
            raise AssertionError(f"{path} opened")

    paths = [tmp_path / f"{name}.png" for name in "ab"]
    for seed, path in enumerate(paths):
        scene(seed, (64, 48)).save(path)
    rows = [
        Row(i, str(p), p.stat().st_size, i, f"h{i}", "x", "indexed") for i, p in enumerate(paths)
    ]
    for keep in ("largest", "oldest", "first"):
        assert len(Ranking(keep, images=Unopenable()).order(rows)) == 2


# -- the whole pass, through the CLI and the Index ---------------------------------------------


def make_photos(root: Path) -> dict[str, Path]:
    """6 scenes; a mirrored, a cropped and a captioned copy; an exact copy in a reference
    folder; a second shot."""
    album, refs = root / "album", root / "refs"
    album.mkdir(parents=True)
    refs.mkdir()
    rng = np.random.default_rng(0)
    for seed in range(6):
        scene(seed).save(album / f"scene{seed}.png")
    files = {
        "mirrored": album / "scene0-mirrored.jpg",
        "cropped": album / "scene1-cropped.jpg",
        "captioned": album / "scene2-captioned.jpg",
        "again": album / "scene3-again.png",
        "reference": refs / "scene4.png",
    }
    files["mirrored"].write_bytes(encoded(edited(scene(0), "mirrored", rng)))
    files["cropped"].write_bytes(encoded(edited(scene(1), "cropped", rng)))
    files["captioned"].write_bytes(encoded(edited(scene(2), "caption", rng)))
    scene(3, moved=11).save(files["again"])
    shutil.copy(album / "scene4.png", files["reference"])
    return files


def cli():
    import click

    from retrieval.cli import duplicates_cmds

    group = click.Group()
    duplicates_cmds.register(group)
    return group


def run(*args: str) -> list[dict]:
    result = CliRunner().invoke(cli(), ["duplicates", *args, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, small_model):
    root = tmp_path_factory.mktemp("dups")
    files = make_photos(root / "photos")
    Index.create(root / "idx", root / "photos", IndexOptions(weights=str(small_model))).close()
    return root, files


def as_sets(groups: list[dict], kind: str) -> list[set[str]]:
    return [
        {os.path.basename(m["path"]) for m in g["members"]} for g in groups if g["kind"] == kind
    ]


def test_the_tiers_through_the_cli(photos) -> None:
    root, files = photos
    groups = run("--index", str(root / "idx"), "--reference", str(root / "photos" / "refs"))
    assert as_sets(groups, "exact") == [{"scene4.png"}]  # one name, two folders
    assert sorted(map(sorted, as_sets(groups, "copy"))) == [
        ["scene0-mirrored.jpg", "scene0.png"],
        ["scene1-cropped.jpg", "scene1.png"],
        ["scene2-captioned.jpg", "scene2.png"],
    ]
    exact = next(g for g in groups if g["kind"] == "exact")
    assert exact["representative"] == str(files["reference"])  # the reference leads
    assert exact["members"][0]["reference"] is True
    said = {
        min(os.path.basename(m["path"]) for m in g["members"]): " ".join(
            " ".join(m["evidence"]["edits"]) for m in g["members"][1:]
        )
        for g in groups
        if g["kind"] == "copy"
    }
    assert "mirrored" in said["scene0-mirrored.jpg"]
    assert "cropped" in said["scene1-cropped.jpg"]
    assert (
        "caption" in said["scene2-captioned.jpg"] or "painted over" in said["scene2-captioned.jpg"]
    )
    # the second shot is no copy; it may only ever be "similar"
    assert not any("scene3-again.png" in s for s in as_sets(groups, "copy"))


def test_the_same_groups_through_the_library(photos) -> None:
    from retrieval.duplicates.groups import DuplicateOptions, find_duplicates

    root, _ = photos
    with Index.open(root / "idx") as ix:
        report = find_duplicates(ix, DuplicateOptions(keep="first"))
    cli_groups = run("--index", str(root / "idx"), "--keep", "first")
    assert [g.to_dict() for g in report.groups] == cli_groups
    assert report.verified >= 3 and report.candidates >= report.verified


def test_a_second_pass_takes_the_verdicts_the_first_kept(tmp_path, small_model, monkeypatch):
    """Verdicts are kept by content beside the index: a second pass opens no picture and gives
    the same groups; --reverify, or another verifier (other bars), looks at the pictures again."""
    from retrieval.duplicates import groups as groups_module
    from retrieval.duplicates.groups import DuplicateOptions, find_duplicates
    from retrieval.duplicates.verify import VerifyOptions

    make_photos(tmp_path / "photos")
    index_dir = tmp_path / "idx"
    Index.create(index_dir, tmp_path / "photos", IndexOptions(weights=str(small_model))).close()
    opened: list[tuple] = []
    looking = groups_module.verify_pair

    def counted(*args, **kwargs):
        opened.append(args)
        return looking(*args, **kwargs)

    monkeypatch.setattr(groups_module, "verify_pair", counted)
    with Index.open(index_dir) as ix:
        first = find_duplicates(ix)
        assert first.screened >= 3 and first.remembered == 0 and len(opened) >= first.screened
        opened.clear()
        second = find_duplicates(ix)
        assert opened == [] and second.remembered == second.screened == first.screened
        assert [g.to_dict() for g in second.groups] == [g.to_dict() for g in first.groups]
        again = find_duplicates(ix, DuplicateOptions(remember=False))
        assert again.remembered == 0 and len(opened) >= first.screened
        opened.clear()
        other = find_duplicates(ix, DuplicateOptions(verify=VerifyOptions(inliers=16)))
        assert other.remembered == 0 and len(opened) >= first.screened
    # the CLI says so, and --reverify looks again (the verifier is the default one again, whose
    # verdicts the last pass forgot: this pass keeps them anew)
    said = CliRunner().invoke(cli(), ["duplicates", "--index", str(index_dir)]).output
    assert "remembered from an earlier pass" not in said
    said = CliRunner().invoke(cli(), ["duplicates", "--index", str(index_dir)]).output
    assert f"({first.screened} of them remembered from an earlier pass)" in said
    said = CliRunner().invoke(cli(), ["duplicates", "--index", str(index_dir), "--reverify"]).output
    assert "remembered" not in said


def test_a_pair_whose_file_could_not_be_read_is_not_remembered(tmp_path, small_model) -> None:
    """A file gone (or unreadable) during a pass gets no lasting verdict: once it is back, the
    next pass looks at it and finds its copy."""
    from retrieval.duplicates.groups import find_duplicates

    files = make_photos(tmp_path / "photos")
    Index.create(
        tmp_path / "idx", tmp_path / "photos", IndexOptions(weights=str(small_model))
    ).close()
    mirrored = files["mirrored"]
    kept = mirrored.read_bytes()
    mirrored.unlink()
    with Index.open(tmp_path / "idx") as ix:
        assert not any(
            m.path == str(mirrored) for g in find_duplicates(ix).groups for m in g.members
        )
        mirrored.write_bytes(kept)
        found = find_duplicates(ix)
    assert any(
        g.kind == "copy" and str(mirrored) in {m.path for m in g.members} for g in found.groups
    )


def test_a_reference_file_leads_and_is_never_moved(tmp_path, small_model) -> None:
    files = make_photos(tmp_path / "photos")
    album_copy = tmp_path / "photos" / "album" / "scene4.png"
    Index.create(
        tmp_path / "idx", tmp_path / "photos", IndexOptions(weights=str(small_model))
    ).close()
    args = ["--index", str(tmp_path / "idx"), "--reference", str(tmp_path / "photos" / "refs")]
    result = CliRunner().invoke(
        cli(), ["duplicates", *args, "--action", "move", "--to", str(tmp_path / "aside")]
    )
    assert result.exit_code == 0, result.output
    assert files["reference"].exists() and not album_copy.exists()
    assert (tmp_path / "aside" / album_copy.relative_to(album_copy.anchor)).exists()


def test_not_duplicate_is_remembered_across_a_rename_and_a_reindex(tmp_path, small_model) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    scene(0).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(encoded(edited(scene(0), "mirrored", np.random.default_rng(0))))
    index_dir = tmp_path / "idx"
    Index.create(index_dir, folder, IndexOptions(weights=str(small_model))).close()
    assert len(as_sets(run("--index", str(index_dir)), "copy")) == 1
    said = CliRunner().invoke(
        cli(),
        [
            "duplicates",
            "--index",
            str(index_dir),
            "--not-duplicate",
            str(folder / "a.png"),
            str(folder / "b.jpg"),
        ],
    )
    assert said.exit_code == 0 and "remembered" in said.output
    assert as_sets(run("--index", str(index_dir)), "copy") == []
    (folder / "b.jpg").rename(folder / "renamed.jpg")  # moved: its bytes are what was decided
    Index.create(index_dir, folder, IndexOptions(weights=str(small_model))).close()
    assert as_sets(run("--index", str(index_dir)), "copy") == []
    forgot = CliRunner().invoke(
        cli(), ["duplicates", "--index", str(index_dir), "--forget-decisions"]
    )
    assert forgot.exit_code == 0 and "forgot 1 not-duplicate decision\n" in forgot.output
    assert len(as_sets(run("--index", str(index_dir)), "copy")) == 1


def test_same_bytes_cannot_be_declared_not_duplicates(tmp_path, small_model) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    scene(0).save(folder / "a.png")
    shutil.copy(folder / "a.png", folder / "b.png")
    Index.create(tmp_path / "idx", folder, IndexOptions(weights=str(small_model))).close()
    said = CliRunner().invoke(
        cli(),
        [
            "duplicates",
            "--index",
            str(tmp_path / "idx"),
            "--not-duplicate",
            str(folder / "a.png"),
            str(folder / "b.png"),
        ],
    )
    assert said.exit_code == 2 and "same bytes" in said.output
    (folder / "notes.txt").write_text("not a picture")
    pair = [str(folder / "a.png"), str(folder / "notes.txt")]
    said = CliRunner().invoke(
        cli(), ["duplicates", "--index", str(tmp_path / "idx"), "--not-duplicate", *pair]
    )
    assert said.exit_code == 2 and "not an image file" in said.output


def test_similar_needs_asking_and_threshold_needs_similar(photos) -> None:
    root, _ = photos
    refused = CliRunner().invoke(
        cli(), ["duplicates", "--index", str(root / "idx"), "--threshold", "1"]
    )
    assert refused.exit_code == 2 and "--similar" in refused.output
    plain = run("--index", str(root / "idx"))
    assert all(g["kind"] in ("exact", "copy") for g in plain)
    # a distance far beyond any pair: everything not grouped otherwise is "similar"
    wide = run("--index", str(root / "idx"), "--similar", "--threshold", "1e6")
    similar = as_sets(wide, "similar")
    assert similar and all(g["kind"] in ("exact", "copy", "similar") for g in wide)
    grouped = set().union(*as_sets(plain, "exact"), *as_sets(plain, "copy"))
    assert not any(name in grouped for s in similar for name in s if name != "scene4.png")


def test_a_copy_framed_like_a_bordered_picture_does_not_lead_either() -> None:
    """The border marks every copy framed like the bordered picture (a mirrored or re-encoded
    twin), though the twin met the unbordered picture only through it; other edits do not."""
    from retrieval.duplicates.groups import framed_alike
    from retrieval.duplicates.verify import Verdict

    same = Verdict(True, "same framing", 4, 0.97)
    moved = Verdict(True, "geometry", 30, 0.9, 80)
    # 0: the picture; 1: it with a border (verified); 2: 1 mirrored; 3: 2 re-encoded; 4: a crop
    verdicts = {(0, 1): moved, (1, 2): same, (2, 3): same, (0, 4): moved}
    assert framed_alike(verdicts, {1}) == {1, 2, 3}
    assert framed_alike(verdicts, set()) == set()


def test_candidate_pairs_carry_full_vector_distances_and_step_times() -> None:
    """fc7's pairs keep the distance their search measured, the hash and window pairs are read
    for theirs: every pair's distance is its vectors' full Euclidean distance."""
    from retrieval.collection.vectors import ArrayVectors
    from retrieval.duplicates.candidates import FROM_FC7, candidate_pairs

    rng = np.random.default_rng(0)
    vectors = rng.random((300, 64), dtype=np.float32)
    vectors[150:] = vectors[:150] + 0.01 * rng.random((150, 64), dtype=np.float32)
    hashes = rng.integers(0, 2**63, (300, 8), dtype=np.uint64)
    windows = rng.integers(0, 2**63, (300, 49), dtype=np.uint64)
    hashes[7] = hashes[250]  # a hash pair fc7 does not propose
    found = candidate_pairs(ArrayVectors(vectors), hashes, windows, np.ones(300, bool))
    wanted = np.linalg.norm(vectors[found.a] - vectors[found.b], axis=1)
    assert np.allclose(found.distance, wanted, rtol=1e-5, atol=1e-6)
    assert ((found.source & FROM_FC7) == 0).any() and ((found.source & FROM_FC7) > 0).any()
    assert set(found.seconds) == {"fc7", "hash", "window", "distances"}


def test_window_pairs_keep_each_images_first_k_other_images_nearest_first() -> None:
    """The window search's hits, reduced to images: each query's first k distinct other
    images, nearest window first (a query's own windows and far windows left out)."""
    from retrieval.duplicates.candidates import _first_images

    rng = np.random.default_rng(3)
    count, per, k, max_bits = 50, 7, 3, 10
    positions = np.sort(rng.choice(200, count, replace=False))
    chunk = positions[rng.choice(count, 20, replace=False)]
    labels = rng.integers(-1, count * per, (20, 30))
    labels[:, 0] = np.searchsorted(positions, chunk) * per  # each query's own window first
    bits = np.sort(rng.integers(0, 16, (20, 30)), axis=1)
    own, other = _first_images(chunk, labels, bits, positions, per, k, max_bits)
    wanted = []  # the plain loop the vectorised one replaced
    for query, got, apart in zip(chunk, labels, bits):
        images = positions[got[(got >= 0) & (apart <= max_bits)] // per]
        images = list(dict.fromkeys(i for i in images.tolist() if i != query))[:k]
        wanted += [(int(query), i) for i in images]
    assert list(zip(own.tolist(), other.tolist())) == wanted
    assert len(wanted) > 20  # queries with several images to choose among
