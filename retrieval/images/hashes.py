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
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    small = np.asarray(rgb.resize((64, 64)))
    red, green, blue = small[..., 0], small[..., 1], small[..., 2]
    chroma = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return float(chroma.mean()) < 3.0


def signature(image) -> ImageSignature:
    """An image's signature (a PIL image in any mode)."""
    grey = image.convert("L")  # once, for the thumbnail and the windows
    thumb = thumbnail(grey)
    return ImageSignature(
        isometry_hashes(thumb),
        window_hashes(grey),
        thumb,
        int(image.width),
        int(image.height),
        is_grey(image),
    )


def window_hashes(image) -> np.ndarray:
    """pHash of each of the GRID x GRID windows of WINDOW x WINDOW of the picture.

    Each window would be cut, shrunk to SIDE px (Lanczos) and put through the DCT; both are
    linear, so one 8 x side matrix does the two at once (``_WINDOW_LOW``): 49 windows cost a
    few small products instead of 49 resizes and transforms."""
    from PIL import Image

    base = np.asarray(
        image.convert("L").resize((WINDOW_BASE, WINDOW_BASE), Image.BILINEAR), dtype=np.float64
    )
    side = _WINDOW_LOW.shape[1]
    blocks = []
    for top in WINDOW_STARTS:
        rows = _WINDOW_LOW @ base[top : top + side]  # 8 x WINDOW_BASE
        blocks += [rows[:, left : left + side] @ _WINDOW_LOW.T for left in WINDOW_STARTS]
    return hashes_of(np.stack(blocks))


def low_frequencies(thumb: np.ndarray) -> np.ndarray:
    """The LOW x LOW lowest 2-D DCT-II coefficients of a thumbnail (scipy's unnormalised
    type 2, as imagehash takes them)."""
    return _DCT_LOW @ thumb.astype(np.float64) @ _DCT_LOW.T


def isometry_blocks(block: np.ndarray) -> np.ndarray:
    """8 x LOW x LOW: the low-frequency block of the image under each of the 8 isometries
    (ISOMETRIES order)."""
    rows = (-1.0) ** np.arange(LOW)[:, None]  # reversing the rows (upside down)
    cols = (-1.0) ** np.arange(LOW)[None, :]  # reversing the columns (mirror)
    out = []
    for base in (block, block.T):
        out += [base, base * cols, base * rows, base * rows * cols]
    return np.stack(out)


def hash_bits(block: np.ndarray) -> int:
    """64 bits: each coefficient above the block's median, row-major, first coefficient highest."""
    return int(hashes_of(block[None])[0])


def hashes_of(blocks: np.ndarray) -> np.ndarray:
    """uint64 hashes of M x LOW x LOW blocks (:func:`hash_bits` of each)."""
    flat = blocks.reshape(len(blocks), -1)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def isometry_hashes(thumb: np.ndarray) -> np.ndarray:
    """pHash of the thumbnail's image under each of the 8 isometries."""
    return hashes_of(isometry_blocks(low_frequencies(thumb)))


def _dct_rows(size: int) -> np.ndarray:
    """LOW x size: the lowest LOW rows of the unnormalised DCT-II (scipy's type 2, norm None)."""
    k, n = np.arange(LOW)[:, None], np.arange(size)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * size))


def _lanczos_rows(size_in: int, size_out: int) -> np.ndarray:
    """size_out x size_in: Pillow's Lanczos (a = 3) shrink as a matrix (it agrees with
    ``Image.resize(..., LANCZOS)`` within its rounding to whole grey levels)."""
    scale = size_in / size_out
    support = 3 * max(scale, 1.0)
    out = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        low = int(max(0, np.floor(centre - support + 0.5)))
        high = int(min(size_in, np.floor(centre + support + 0.5)))
        x = (np.arange(low, high) - centre + 0.5) / max(scale, 1.0)
        weights = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
        out[i, low:high] = weights / weights.sum()
    return out


_DCT_LOW = _dct_rows(SIDE)
WINDOW_SIDE = round(WINDOW_BASE * WINDOW)
WINDOW_STARTS = np.round(np.linspace(0, WINDOW_BASE - WINDOW_SIDE, GRID)).astype(int)
_WINDOW_LOW = _DCT_LOW @ _lanczos_rows(WINDOW_SIDE, SIDE)  # shrink, then the DCT's low rows


def orient(thumb: np.ndarray, isometry: int) -> np.ndarray:
    """The thumbnail turned by isometry ``isometry`` (the pixels behind hash ``isometry``); a
    picture is its last two axes, so a stack of them turns alike."""
    base = np.swapaxes(thumb, -1, -2) if isometry >= 4 else thumb
    step = isometry % 4
    if step in (1, 3):
        base = base[..., ::-1]
    if step in (2, 3):
        base = base[..., ::-1, :]
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
