"""A framed copy brought to another aspect ratio is a copy (issue 21): a print on a white mat
with a drop shadow, the whole resized to a square (as a thumbnailer or Imagenette's 224 x 224
release does), has no similarity that aligns it with the picture; the verifier fits a stretch
(each axis scaled apart) and accepts it, and still refuses a different picture framed alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter

from retrieval.duplicates.edits import encoded
from retrieval.duplicates.verify import ImageCache, verify_pair
from retrieval.images.signing import signature_of_file
from tests.corpus import scene


def saved(folder: Path, name: str, image: Image.Image) -> tuple[str, object]:
    path = folder / name
    path.write_bytes(encoded(image))
    return str(path), signature_of_file(str(path))


def framed(picture: Image.Image, mat: int = 16, shadow: int = 5) -> Image.Image:
    """``picture`` on a white mat, a soft grey shadow below and to the right of it."""
    width, height = picture.size
    canvas = Image.new("RGB", (width + 2 * mat + shadow, height + 2 * mat + shadow), "white")
    shade = Image.new("L", canvas.size, 0)
    box = (mat + shadow, mat + shadow, mat + shadow + width, mat + shadow + height)
    ImageDraw.Draw(shade).rectangle(box, fill=120)
    canvas.paste((110, 110, 110), (0, 0), shade.filter(ImageFilter.GaussianBlur(3)))
    canvas.paste(picture, (mat, mat))
    return canvas


def squared(image: Image.Image, side: int = 160) -> Image.Image:
    return image.resize((side, side), Image.Resampling.LANCZOS)


@pytest.mark.parametrize("seed", (0, 1))
def test_a_framed_copy_resized_to_a_square_is_a_copy(tmp_path, seed) -> None:
    images = ImageCache()
    picture = scene(seed, (150, 104))
    original = saved(tmp_path, "original.jpg", picture)
    copy = saved(tmp_path, "framed.jpg", squared(framed(picture)))
    for a, b in ((original, copy), (copy, original)):
        verdict = verify_pair(a, b, images)
        assert verdict.copy, verdict.evidence()
        assert verdict.test == "geometry"
        assert any(e.startswith("stretched") for e in verdict.edits), verdict.edits
    # framed and kept at its own aspect ratio: a similarity aligns it (as before the stretch)
    kept = saved(tmp_path, "kept.jpg", framed(picture))
    verdict = verify_pair(original, kept, images)
    assert verdict.copy and not any(e.startswith("stretched") for e in verdict.edits)
    # the picture squared too (both brought to 160 x 160 from their own aspect ratios)
    square = saved(tmp_path, "square.jpg", squared(picture))
    assert verify_pair(square, copy, images).copy


@pytest.mark.parametrize("seed", (0, 1))
def test_a_different_picture_framed_and_squared_is_not_a_copy(tmp_path, seed) -> None:
    images = ImageCache()
    picture = saved(tmp_path, "picture.jpg", scene(seed, (150, 104)))
    other = saved(tmp_path, "other.jpg", squared(framed(scene(seed + 20, (150, 104)))))
    for a, b in ((picture, other), (other, picture)):
        assert not verify_pair(a, b, images).copy


def test_a_second_shot_framed_and_squared_is_not_a_copy(tmp_path) -> None:
    """The stretch is one more freedom for the fit, not for the pixels: a re-shoot (every
    shape a few pixels off, other grain) framed and squared is still refused."""
    images = ImageCache()
    first = saved(tmp_path, "first.jpg", scene(3, (150, 104)))
    second = saved(tmp_path, "second.jpg", squared(framed(scene(3, (150, 104), moved=7))))
    for a, b in ((first, second), (second, first)):
        assert not verify_pair(a, b, images).copy


def test_a_stretch_needs_more_support_than_a_similarity(tmp_path) -> None:
    """A stretch is tried only after every similarity failed, a second chance to fit by luck:
    it needs ``stretch_inliers``, and never fewer than a similarity."""
    from retrieval.duplicates.verify import VerifyOptions

    picture = scene(0, (150, 104))
    original = saved(tmp_path, "original.jpg", picture)
    copy = saved(tmp_path, "framed.jpg", squared(framed(picture)))
    found = verify_pair(original, copy, ImageCache())
    assert found.copy and found.inliers >= VerifyOptions().stretch_inliers
    stricter = VerifyOptions(stretch_inliers=found.inliers + 1)
    assert not verify_pair(original, copy, ImageCache(), stricter).copy
    stricter = VerifyOptions(inliers=found.inliers + 1)  # and never less than a similarity's
    assert not verify_pair(original, copy, ImageCache(), stricter).copy


def margins(picture: Image.Image) -> dict[str, Image.Image]:
    """``picture`` with a margin of each kind, and what the evidence must call it."""
    width, height = picture.size
    border = Image.new("RGB", (width + 80, height + 80), "white")
    border.paste(picture, (40, 40))
    letterbox = Image.new("RGB", (width, height + 120), (20, 20, 20))
    letterbox.paste(picture, (0, 60))
    bar = Image.new("RGB", (width, height + 70), "black")
    bar.paste(picture, (0, 0))
    caption = Image.new("RGB", (width, height + 70), "white")
    caption.paste(picture, (0, 0))
    draw = ImageDraw.Draw(caption)
    for line in range(2):
        draw.text((20, height + 12 + 24 * line), "holiday snap " * 3, fill="black")
    return {"border": border, "letterbox": letterbox, "bar": bar, "caption": caption}


@pytest.mark.parametrize(
    ("kind", "says"),
    [("border", "border"), ("letterbox", "border"), ("bar", "bar"), ("caption", "caption")],
)
def test_a_margin_is_named_by_its_sides_and_marks(tmp_path, kind, says) -> None:
    """A plain margin all round (or above and below) is a border, on one side a bar, with
    writing on it a caption, at a photo's size too (where the picture's blended edge once
    made a plain white border read as a caption); seen from the framed side, it is removed."""
    picture = scene(11, (900, 600))
    original = saved(tmp_path, "original.jpg", picture)
    copy = saved(tmp_path, f"{kind}.jpg", margins(picture)[kind])
    added = verify_pair(original, copy, ImageCache())
    assert added.copy and f"{says} added" in added.edits, added.evidence()
    removed = verify_pair(copy, original, ImageCache())
    assert removed.copy and f"{says} removed" in removed.edits, removed.evidence()
