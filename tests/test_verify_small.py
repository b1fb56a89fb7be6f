"""Small pictures are weaker evidence: look-alikes at 28 px (two garments of one kind) are not
copies, where at that size the framed correlation and the pHash bits of an old bar would have
called them so; the same picture mirrored, brightened or re-encoded still is."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from retrieval.duplicates.verify import (
    ImageCache,
    VerifyOptions,
    _same_framing,
    framing_bits,
    size_bar,
    verify_pair,
)
from retrieval.images.hashes import best_isometry
from retrieval.images.signing import signature_of_file


def trousers(seed: int) -> Image.Image:
    """A 28 px grey pair of trousers on black, its shades and grain chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (28, 28), 0)
    draw = ImageDraw.Draw(image)
    half = 9 + int(rng.integers(-1, 2))
    draw.rectangle((14 - half, 2, 14 + half, 8), fill=int(rng.integers(170, 230)))
    draw.rectangle((14 - half, 8, 13, 26), fill=int(rng.integers(170, 230)))
    draw.rectangle((15, 8, 14 + half, 26), fill=int(rng.integers(170, 230)))
    cloth = np.asarray(image) > 0
    pixels = np.asarray(image, np.float32) + rng.normal(0, 12, (28, 28)) * cloth
    grainy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return grainy.filter(ImageFilter.GaussianBlur(0.6))


def saved(folder: Path, name: str, image: Image.Image) -> tuple[str, object]:
    path = folder / name
    image.save(path)
    return str(path), signature_of_file(str(path))


@pytest.mark.parametrize("other", [2, 3, 5])
def test_small_look_alikes_are_not_copies(tmp_path: Path, other: int) -> None:
    first = saved(tmp_path, "a.png", trousers(0))
    second = saved(tmp_path, "b.png", trousers(other))
    cache = ImageCache()
    bits, turn = best_isometry(first[1].hashes, second[1].hashes)
    framed = _same_framing(cache.grey(first[0]), cache.grey(second[0]), turn, 28)
    options = VerifyOptions()
    # what the full-size bars alone would have accepted: the test is about the small ones
    assert framed[0] >= options.same_framing and bits <= options.hash_bits
    assert not verify_pair(first, second, cache).copy


def test_a_small_pictures_edited_copies_are_still_copies(tmp_path: Path) -> None:
    original = trousers(0)
    first = saved(tmp_path, "a.png", original)
    buffer = io.BytesIO()
    original.save(buffer, format="JPEG", quality=90)
    copies = {
        "mirrored": original.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "brighter": ImageEnhance.Brightness(original).enhance(1.3),
        "re-encoded": Image.open(io.BytesIO(buffer.getvalue())),
    }
    for name, copy in copies.items():
        assert verify_pair(first, saved(tmp_path, f"{name}.png", copy), ImageCache()).copy, name


def test_the_bars_rise_as_the_compared_side_shrinks() -> None:
    options = VerifyOptions()
    assert size_bar(options.same_framing, 128) == pytest.approx(0.90)
    assert size_bar(options.same_framing, 512) == pytest.approx(0.90)
    assert size_bar(options.same_framing, 28) == pytest.approx(1 - 0.1 * 28 / 128)
    assert framing_bits(128, options) == options.hash_bits and framing_bits(28, options) == 6
