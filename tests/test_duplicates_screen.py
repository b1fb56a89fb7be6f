"""The screen before verification: every kind of edited copy passes it on its signatures alone,
a different picture does not (unless fc7 calls the pair close for both images), and the
duplicates pass verifies only what passed it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.duplicates.edits import EDITS, edited
from retrieval.duplicates.screen import ScreenOptions, screen_one, screen_pairs
from retrieval.images.hashes import signature
from tests.corpus import scene

FAR = 1.05  # an fc7 ratio no copy shortcut accepts: the thumbnails must show the copy


@pytest.mark.parametrize("edit", EDITS)
def test_every_edit_passes_the_screen_on_its_signature_alone(edit: str) -> None:
    for seed in range(4):
        original = scene(seed, (256, 192))
        copy = edited(original, edit, np.random.default_rng(seed))
        assert screen_one(signature(original), signature(copy), FAR), (edit, seed)


def test_different_pictures_are_screened_out_unless_fc7_calls_them_close() -> None:
    signatures = [signature(scene(seed, (256, 192))) for seed in range(12)]
    kept = [
        screen_one(signatures[i], signatures[j], FAR)
        for i in range(len(signatures))
        for j in range(i + 1, len(signatures))
    ]
    assert sum(kept) <= 2, f"{sum(kept)} of {len(kept)} pairs of different scenes kept"
    assert screen_one(signatures[0], signatures[1], ScreenOptions().ratio)


def test_a_pair_without_a_signature_is_kept_for_verification() -> None:
    assert screen_one(None, signature(scene(0)), FAR)


def three_scenes_and_their_mirrors() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thumbnails, hashes, windows) of three scenes, then of each mirrored."""
    originals = [scene(seed, (256, 192)) for seed in range(3)]
    mirrored = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in originals]
    signatures = [signature(image) for image in originals + mirrored]
    return (
        np.stack([s.thumb for s in signatures]),
        np.stack([s.hashes for s in signatures]),
        np.stack([s.windows for s in signatures]),
    )


def test_screen_pairs_masks_a_batch_in_order() -> None:
    thumbs, hashes, windows = three_scenes_and_their_mirrors()
    a = np.array([0, 1, 2, 0, 1])
    b = np.array([3, 4, 5, 1, 2])  # three copies, then two different scenes
    ratio = np.full(len(a), FAR, np.float32)
    kept = screen_pairs(a, b, ratio, thumbs, hashes, windows, np.ones(len(thumbs), bool))
    assert kept.tolist() == [True, True, True, False, False]


def test_batched_frame_scores_are_opencvs_template_match() -> None:
    """The frame test runs batched (grouped convolutions, integral images); each pair's score
    must be what OpenCV's TM_CCOEFF_NORMED gives, thumbnail by thumbnail and scale by scale."""
    import cv2

    from retrieval.duplicates.screen import FRAME_SCALES, frame_scores
    from retrieval.images.hashes import SIDE

    thumbs = np.stack([signature(scene(seed, (160, 120))).thumb for seed in range(6)])
    framed = np.full((SIDE, SIDE), 250, np.uint8)  # thumbnail 0 inside a white border
    framed[3:29, 3:29] = cv2.resize(thumbs[0], (26, 26), interpolation=cv2.INTER_AREA)
    grain = np.random.default_rng(0).integers(126, 131, (2, SIDE, SIDE)).astype(np.uint8)
    thumbs = np.concatenate([thumbs, framed[None], grain])  # grain: too flat to match on
    first, second = np.array([0, 0, 1, 2, 3, 4, 5, 0, 7]), np.array([6, 1, 2, 3, 4, 5, 6, 7, 8])

    def reference(big: np.ndarray, small: np.ndarray) -> float:
        best = -1.0
        for width, height in FRAME_SCALES:
            size = (max(4, round(SIDE * width)), max(4, round(SIDE * height)))
            template = cv2.resize(small.astype(np.float32), size, interpolation=cv2.INTER_AREA)
            if cv2.meanStdDev(template)[1][0, 0] >= 2:
                match = cv2.matchTemplate(big.astype(np.float32), template, cv2.TM_CCOEFF_NORMED)
                best = max(best, float(match.max()))
        return best

    expected = [
        max(reference(thumbs[i], thumbs[j]), reference(thumbs[j], thumbs[i]))
        for i, j in zip(first, second)
    ]
    got = frame_scores(thumbs, first, second)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert got[0] > 0.9 and got[1:].max() < 0.9  # the framed copy, and nothing else
    assert got[-1] == -1.0  # two flat pictures: no score at all


def test_the_inverted_hamming_index_finds_near_codes_as_the_exact_one_does() -> None:
    """Above EXACT_UP_TO images the Hamming searches probe an inverted file: a copy's hash a few
    bits from its original's must still be found (against the exact index's answer)."""
    from retrieval.duplicates.candidates import _codes, hamming_index

    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**63, 30_000, dtype=np.uint64)
    flips = np.packbits(rng.random((2_000, 64)) < 0.05, axis=1).view(">u8")[:, 0]
    queries = _codes(words[:2_000] ^ flips.astype(np.uint64))
    exact = hamming_index(_codes(words), exact=True, nprobe=1)
    inverted = hamming_index(_codes(words), exact=False, nprobe=32)
    assert inverted.nlist > 100 and inverted.nprobe == 32
    _, truth = exact.search(queries, 1)
    _, found = inverted.search(queries, 1)
    assert np.mean(found[:, 0] == truth[:, 0]) >= 0.95
    # Few queries against many codes (the window index): fewer, longer lists, found as well
    sized = hamming_index(_codes(words), exact=False, nprobe=32, queries=len(queries))
    assert sized.nlist < inverted.nlist / 2
    _, found = sized.search(queries, 1)
    assert np.mean(found[:, 0] == truth[:, 0]) >= 0.95


def test_retrieve_index_signs_new_images_unless_told_not_to(tmp_path, small_model) -> None:
    """The first duplicates pass finds the signatures ready: `retrieve index` signs each new
    image (by content, beside the index); --no-signatures leaves that to the first pass."""
    import json

    from click.testing import CliRunner

    from retrieval import Index
    from retrieval.cli.main import cli
    from retrieval.duplicates.memory import DuplicatesMemory
    from retrieval.images.hashes import signature

    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        scene(seed, (96, 72)).save(folder / f"scene{seed}.png")

    def index(name: str, *extra: str) -> dict:
        args = ["index", str(folder), "--index", str(tmp_path / name)]
        result = CliRunner().invoke(cli, [*args, "--weights", str(small_model), *extra, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert index("plain", "--no-signatures")["signed"] == 0
    assert index("signed")["signed"] == 3
    with Index.open(tmp_path / "signed") as opened:
        rows = opened.rows(limit=None)
    for directory, expected in (("plain", 0), ("signed", 3)):
        memory = DuplicatesMemory(tmp_path / directory)
        kept = memory.signatures(r.sha256 for r in rows)
        memory.close()
        assert len(kept) == expected
    first = next(r for r in rows if r.path.endswith("scene0.png"))
    assert np.array_equal(kept[first.sha256].hashes, signature(scene(0, (96, 72))).hashes)
    (folder / "scene3.png").write_bytes((folder / "scene0.png").read_bytes())
    assert index("signed")["signed"] == 0  # the same bytes: already signed


def test_screen_pairs_keeps_each_pairs_verdict_across_blocks() -> None:
    """Pairs are screened a block at a time (a block a core): the mask must come back in the
    pairs' order however many blocks they fill."""
    thumbs, hashes, windows = three_scenes_and_their_mirrors()
    a = np.tile([0, 1, 2, 0, 1], 601)  # 3,005 pairs: three blocks and a part
    b = np.tile([3, 4, 5, 1, 2], 601)
    ratio = np.full(len(a), FAR, np.float32)
    kept = screen_pairs(a, b, ratio, thumbs, hashes, windows, np.ones(len(thumbs), bool))
    assert kept.tolist() == [True, True, True, False, False] * 601


def test_the_inverted_hamming_index_built_a_part_a_core_is_the_one_built_at_once(
    monkeypatch,
) -> None:
    """The inverted file is built in parts, a core each, then joined: it must answer exactly as
    one built in a single add (the same lists, in the same order)."""
    import faiss

    from retrieval.duplicates import candidates
    from retrieval.duplicates.candidates import _codes, hamming_index

    monkeypatch.setattr(candidates, "usable_cores", lambda: 3)  # three parts, whatever the CPU
    rng = np.random.default_rng(1)
    codes = _codes(rng.integers(0, 2**63, 30_001, dtype=np.uint64))
    built = hamming_index(codes, exact=False, nprobe=32)
    whole = faiss.IndexBinaryIVF(built.keep, 64, built.nlist)  # the same centroids
    whole.is_trained = True
    whole.add(codes)
    whole.nprobe = built.nprobe
    queries = codes[::7]
    assert built.ntotal == whole.ntotal == len(codes)
    got, want = built.search(queries, 10), whole.search(queries, 10)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
