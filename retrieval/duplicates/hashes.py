"""Perceptual hashes of an image under its 8 isometries, and the tiny thumbnail they come from.

pHash (Zauner 2010, as imagehash computes it): the image in grey at 32 x 32, its 2-D DCT, the
8 x 8 lowest frequencies, each bit "above their median". A mirrored or quarter-turned copy has a
different pHash, so each image gets eight: one per flip / 90-degree rotation. They come from one
DCT: reversing a signal multiplies its DCT-II coefficient k by (-1)^k, and transposing the image
transposes its DCT, so the eight blocks are sign patterns and a transpose of one block.

A crop has none of its original's hashes, so each image also gets the pHash of 49 windows of 70%
of its width and height (a 7 x 7 grid of positions over a 128 px copy): an off-centre crop to about
70% lies within a few percent of one of them (on Imagenette crops to 65-75%: the original among the
crop's 10 nearest by window hash in every case, with untrained fc7 in 56%).

The 32 x 32 grey thumbnail is kept too: two photometric edits of one picture (re-encoded, resized,
brighter, greyscale) correlate near 1 there, which verifies such a pair without opening a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 32  # thumbnail side, pixels
LOW = 8  # the low-frequency block: 8 x 8 = 64 bits
WINDOW = 0.7  # a window's share of the width and of the height
GRID = 7  # windows per side
WINDOW_BASE = 128  # the copy windows are cut from, pixels (aspect ignored, as crops keep it)
WINDOWS = GRID * GRID

# The 8 isometries, in the order of :func:`isometry_blocks`. Each name says what was done to an
# image to turn it into the one whose hash sits at that position (checked in the tests).
ISOMETRIES = (
    "as is",
    "mirrored",
    "flipped upside down",
    "rotated 180°",
    "transposed",
    "rotated 90° clockwise",
    "rotated 90° anticlockwise",
    "transversed",
)


@dataclass(frozen=True)
class ImageSignature:
    """What the duplicates pass keeps of one image: hashes, thumbnail, size, colour."""

    hashes: np.ndarray  # (8,) uint64, one per isometry, ISOMETRIES order
    windows: np.ndarray  # (WINDOWS,) uint64, pHash of each 70% window, row by row
    thumb: np.ndarray  # (SIDE, SIDE) uint8, grey
    width: int
    height: int
    grey: bool  # no colour to speak of (a greyscale copy of a colour photo differs here)


def thumbnail(image) -> np.ndarray:
    """The grey SIDE x SIDE thumbnail (Lanczos, as imagehash's pHash takes it)."""
    from PIL import Image

    return np.asarray(image.convert("L").resize((SIDE, SIDE), Image.LANCZOS), dtype=np.uint8)


def is_grey(image) -> bool:
    """True when the picture carries no colour: mean chroma under 3 of 255 on a small copy."""
    if image.mode in ("L", "LA", "1", "I", "I;16", "F"):
        return True
    small = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.int16)
    chroma = small.max(axis=2) - small.min(axis=2)
    return float(chroma.mean()) < 3.0


def signature(image) -> ImageSignature:
    """An image's signature (a PIL image in any mode)."""
    thumb = thumbnail(image)
    return ImageSignature(
        isometry_hashes(thumb),
        window_hashes(image),
        thumb,
        int(image.width),
        int(image.height),
        is_grey(image),
    )


def window_hashes(image) -> np.ndarray:
    """pHash of each of the GRID x GRID windows of WINDOW x WINDOW of the picture."""
    from PIL import Image

    base = np.asarray(
        image.convert("L").resize((WINDOW_BASE, WINDOW_BASE), Image.BILINEAR), dtype=np.uint8
    )
    side = round(WINDOW_BASE * WINDOW)
    starts = np.round(np.linspace(0, WINDOW_BASE - side, GRID)).astype(int)
    out = []
    for top in starts:
        for left in starts:
            window = Image.fromarray(base[top : top + side, left : left + side])
            small = np.asarray(window.resize((SIDE, SIDE), Image.LANCZOS), dtype=np.uint8)
            out.append(hash_bits(low_frequencies(small)))
    return np.asarray(out, np.uint64)


def low_frequencies(thumb: np.ndarray) -> np.ndarray:
    """The LOW x LOW lowest 2-D DCT-II coefficients of a thumbnail."""
    from scipy.fft import dctn

    return dctn(thumb.astype(np.float64), type=2)[:LOW, :LOW]


def isometry_blocks(block: np.ndarray) -> list[np.ndarray]:
    """The low-frequency block of the image under each of the 8 isometries (ISOMETRIES order)."""
    rows = (-1.0) ** np.arange(LOW)[:, None]  # reversing the rows (upside down)
    cols = (-1.0) ** np.arange(LOW)[None, :]  # reversing the columns (mirror)
    out = []
    for base in (block, block.T):
        out += [base, base * cols, base * rows, base * rows * cols]
    return out


def hash_bits(block: np.ndarray) -> int:
    """64 bits: each coefficient above the block's median, row-major, first coefficient highest."""
    bits = (block > np.median(block)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def isometry_hashes(thumb: np.ndarray) -> np.ndarray:
    """pHash of the thumbnail's image under each of the 8 isometries."""
    return np.asarray([hash_bits(b) for b in isometry_blocks(low_frequencies(thumb))], np.uint64)


def orient(thumb: np.ndarray, isometry: int) -> np.ndarray:
    """The thumbnail turned by isometry ``isometry`` (the pixels behind hash ``isometry``)."""
    base = thumb.T if isometry >= 4 else thumb
    step = isometry % 4
    if step in (1, 3):
        base = base[:, ::-1]
    if step in (2, 3):
        base = base[::-1, :]
    return np.ascontiguousarray(base)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between 64-bit hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


def best_isometry(first: np.ndarray, second: np.ndarray) -> tuple[int, int]:
    """(bits apart, isometry): how ``second``'s picture is ``first``'s turned or flipped.

    Compares ``first`` as it is with every orientation of ``second``: isometry j means that
    ``second`` shows ``first`` after ISOMETRIES[j] (up to the inverse for the quarter turns,
    which :func:`inverse` gives)."""
    distances = hamming(first[0], second)
    j = int(np.argmin(distances))
    return int(distances[j]), inverse(j)


def inverse(isometry: int) -> int:
    """The isometry that undoes ``isometry`` (only the quarter turns are not their own)."""
    return {5: 6, 6: 5}.get(isometry, isometry)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two equal-shape arrays, in [-1, 1] (0 for a flat one):
    blind to brightness and contrast, which is what a photometric edit changes."""
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    x -= x.mean()
    y -= y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / norm) if norm > 0 else 0.0
