"""One file's signature (:mod:`retrieval.images.hashes`), decoded the one way that gives it.

A signature is made from the file decoded in RGB, upright, with JPEGs at the draft scale that
keeps a DRAFT px shorter side, so it is the same bit for bit whoever makes it: the duplicates
pass from the file, or the index build from the image it has just decoded for the model. The
build's image serves when it *is* that decode (decoded in RGB at the same draft scale: every
JPEG whose shorter side is under 256 px or at least 2,048, and every other format, for the
model's 256 px resize);
otherwise the file's bytes, already in memory, are decoded again at the signature's scale.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from retrieval.images.decode import load_image
from retrieval.images.hashes import WINDOW_BASE, ImageSignature, signature

if TYPE_CHECKING:
    from PIL import Image

DRAFT = WINDOW_BASE  # decode JPEGs at the smallest DCT scale that keeps this shorter side

_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def signature_of_file(path: str) -> ImageSignature:
    """The signature of one file; ImageReadError when it cannot be decoded any more."""
    image = load_image(path, mode="RGB", draft_size=DRAFT)
    with open(path, "rb") as handle:
        return _sized(signature(image), _header(handle)[0])


def signature_of_decoded(
    data: bytes | bytearray, image: Image.Image, mode: str, draft_size: int | None
) -> ImageSignature:
    """The signature of a file whose bytes ``data`` were just decoded into ``image`` by
    ``load_image(data, mode=mode, draft_size=draft_size)``: the same as
    :func:`signature_of_file` gives, from ``image`` itself when that decode is the signature's
    own, else from ``data`` decoded again."""
    size, drafts, stored = _header(io.BytesIO(data))
    same = mode == "RGB" and (
        not drafts or jpeg_draft_scale(stored, draft_size) == jpeg_draft_scale(stored, DRAFT)
    )
    if not same:
        image = load_image(bytes(data), mode="RGB", draft_size=DRAFT)
    return _sized(signature(image), size)


def jpeg_draft_scale(size: tuple[int, int], side: int | None) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's JPEG draft picks to keep ``side`` px on both sides
    of a ``size`` picture (as stored, before any EXIF turn); 1 with no draft asked."""
    if side is None:
        return 1
    fits = min(size[0] // side, size[1] // side)
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def _header(stream) -> tuple[tuple[int, int], bool, tuple[int, int]]:
    """(upright width and height, whether Pillow decodes it at a draft scale, size as stored)
    from the file's header alone. Draft scales are JPEG's, and so MPO's too (a phone's JPEG
    with a second picture in it, which Pillow opens as a JPEG of another format name)."""
    from PIL import ExifTags, Image, JpegImagePlugin

    with warnings.catch_warnings():  # the decode that came first has checked the size
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(stream)
    with image:
        stored = image.size
        width, height = stored
        try:
            if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
                width, height = height, width
        except Exception:  # a broken EXIF block costs the turn, as the decoder treats it
            pass
        return (width, height), isinstance(image, JpegImagePlugin.JpegImageFile), stored


def _sized(small: ImageSignature, size: tuple[int, int]) -> ImageSignature:
    """``small`` with the picture's full upright size (a draft decode is smaller)."""
    return ImageSignature(small.hashes, small.windows, small.thumb, size[0], size[1], small.grey)
