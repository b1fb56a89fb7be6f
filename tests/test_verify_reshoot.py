"""A second shot of a still scene is not a copy (issue 21): one object moved on the same
background, or the view shifted a little, is refused, while every edit of one shot (a caption
painted over, a border, a crop, brightness and contrast) is still verified as a copy."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from retrieval.duplicates.edits import encoded
from retrieval.duplicates.verify import ImageCache, VerifyOptions, _second_shot, verify_pair
from retrieval.images.signing import signature_of_file
from tests.corpus import scene

# seeds where the verifier before this check called the moved object a copy both ways round
SEEDS = (0, 1, 3)


def saved(folder: Path, name: str, image: Image.Image) -> tuple[str, object]:
    path = folder / name
    path.write_bytes(encoded(image))
    return str(path), signature_of_file(str(path))


def shot(seed: int, at: tuple[int, int]) -> Image.Image:
    """A still background with one textured object (a ball of another scene) at ``at``."""
    picture = scene(seed)
    thing = scene(seed + 50, (60, 52))
    mask = Image.new("L", thing.size, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, 59, 51), fill=255)
    picture.paste(thing, at, mask)
    return picture


@pytest.mark.parametrize("seed", SEEDS)
def test_an_object_moved_on_a_still_background_is_not_a_copy(tmp_path, seed) -> None:
    images = ImageCache()
    first = saved(tmp_path, "first.jpg", shot(seed, (20, 20)))
    second = saved(tmp_path, "second.jpg", shot(seed, (110, 70)))
    for a, b in ((first, second), (second, first)):
        verdict = verify_pair(a, b, images)
        assert not verdict.copy, verdict.evidence()
        assert any("something moved" in e for e in verdict.edits), verdict.edits


@pytest.mark.parametrize("seed", SEEDS)
def test_edits_of_one_shot_are_still_copies(tmp_path, seed) -> None:
    images = ImageCache()
    base = shot(seed, (20, 20))
    original = saved(tmp_path, "original.jpg", base)
    caption = base.copy()
    draw = ImageDraw.Draw(caption)
    draw.rectangle((0, 114, 192, 144), fill=(255, 255, 255))
    draw.text((8, 118), "when we were there", fill=(0, 0, 0))
    edits = {
        "caption": caption,
        "border": ImageOps.expand(base, 14, (0, 0, 0)),
        "crop": base.crop((50, 36, 184, 137)),  # off centre, 70% of each side
        "tone": ImageEnhance.Contrast(ImageEnhance.Brightness(base).enhance(1.3)).enhance(0.7),
    }
    for name, image in edits.items():
        copy = saved(tmp_path, f"{name}.jpg", image)
        for a, b in ((original, copy), (copy, original)):
            verdict = verify_pair(a, b, images)
            assert verdict.copy, (name, verdict.evidence())


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((128, 96), Image.Resampling.BOX), np.uint8)


def test_blocks_that_only_roughly_agree_are_a_second_shot() -> None:
    """The view moved a little (parallax): every part is a few pixels off, so the whole
    correlates well but block by block it does not; the same picture agrees everywhere."""
    x = _grey(scene(2))
    height, width = x.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    flow_x = 3 * np.sin(xs / width * 9.4) * np.cos(ys / height * 6.3)
    flow_y = 3 * np.cos(xs / width * 6.3 + 1) * np.sin(ys / height * 9.4)
    y = cv2.remap(x, xs + flow_x, ys + flow_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    keep = np.ones(x.shape, bool)
    options = VerifyOptions()
    said = _second_shot(x, y, keep, options)
    assert said is not None and "roughly agree" in said
    assert _second_shot(x, x, keep, options) is None
    # a copy accepted as painted over is not asked for overall agreement again
    painted = _second_shot(x, y, keep, options, painted=True)
    assert painted is None or "roughly" not in painted
