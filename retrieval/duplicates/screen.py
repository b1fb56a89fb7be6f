"""Which candidate pairs are worth opening the files for: a screen on the signatures alone.

Verification decodes both pictures and matches keypoints (milliseconds a pair); most candidate
pairs are not copies (on the benchmark's collection 96% are not: an image's 10 nearest by fc7
and by window hash are mostly other photos). The screen keeps a pair when any sign of an edited
copy shows in what the signatures already hold, and drops it otherwise:

- **fc7 close for both images**: the pair's distance at most ``ratio`` of their background
  (photometric edits, resizes, borders and most captions sit far below it; other photos at 0.9
  and above);
- **the same framing**: the 32 px thumbnails correlate under some flip or quarter turn, over the
  whole picture or all but one band (a caption or a logo painted over a strip of it);
- **a crop**: one picture's pHash within ``window_bits`` of a 70% window of the other, and its
  thumbnail correlates with that window's part of the other's thumbnail;
- **a frame**: one thumbnail matches inside the other (normalised template matching at a few
  scales, batched as grouped convolutions): a border, a letterbox, a caption bar added, a
  picture inside a screenshot.

Correlations are normalised (blind to brightness and contrast). The bars are loose on purpose:
verification decides; the screen only spares it the pairs that show no sign of a copy. They were
set on bench/duplicates.py's 57,000 candidate pairs (docs/measurements.md): with untrained
weights and with a 2-minute model, every original-to-copy pair but 1 and 5 of about 1,190 passes,
and 4.5% of the other pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from retrieval.devices import torch_threads, usable_cores
from retrieval.images.hashes import (
    ISOMETRIES,
    SIDE,
    WINDOW_BASE,
    WINDOW_SIDE,
    WINDOW_STARTS,
    ImageSignature,
    orient,
)

# pairs a test takes at once: larger blocks run slower, their arrays outgrow the caches (on the
# bench's 57,353 real candidate pairs, one thread: the framing and banded tests 40 us a pair
# 8,192 at a time, 21 at 1,024)
BLOCK = 1024
BAND = SIDE // 4  # a painted-over strip: a quarter of the picture's height or width
# (width, height) of the smaller picture inside the larger, as shares of the larger's sides:
# borders and letterboxes (both sides, or one), caption bars added above or below
FRAME_SCALES = (
    (0.9, 0.9),
    (0.8, 0.8),
    (0.7, 0.7),
    (1.0, 0.9),
    (1.0, 0.8),
    (1.0, 0.7),
    (1.0, 0.6),
    (0.9, 1.0),
    (0.8, 1.0),
    (0.7, 1.0),
    (0.6, 1.0),
)


@dataclass(frozen=True)
class ScreenOptions:
    """The screen's bars (see the module docstring): loose, since verification follows."""

    ratio: float = 0.8  # fc7: distance / the pair's background, at most
    framing: float = 0.8  # thumbnails, whole picture, best isometry
    banded: float = 0.85  # thumbnails, all but one quarter band
    window_bits: int = 14  # crop: pHash bits to the nearest window, at most
    window: float = 0.6  # crop: correlation with that window's part of the thumbnail
    frame: float = 0.75  # frame: template match inside the other thumbnail
    frame_ratio: float = 1.1  # frame: only tried on pairs this close by fc7 (costly)


def screen_pairs(
    a: np.ndarray,
    b: np.ndarray,
    ratio: np.ndarray,
    thumbs: np.ndarray,
    hashes: np.ndarray,
    windows: np.ndarray,
    has: np.ndarray,
    options: ScreenOptions = ScreenOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """A mask over the pairs ``(a[i], b[i])``: True where verification should look.

    ``thumbs`` (N x SIDE x SIDE uint8), ``hashes`` (N x 8), ``windows`` (N x WINDOWS) and
    ``has`` (N) come from the images' signatures; a pair with an image lacking one is kept.
    Blocks of pairs are screened a core each (numpy and torch release the GIL)."""
    keep = ~(has[a] & has[b]) | (ratio <= options.ratio)

    def screen(start: int) -> int:
        part = slice(start, start + BLOCK)
        todo = np.flatnonzero(~keep[part]) + start
        if len(todo):
            x, y = thumbs[a[todo]], thumbs[b[todo]]
            score, isometry = framing(x, y)
            passed = score >= options.framing
            passed |= banded(x, y, isometry) >= options.banded
            passed |= _crop(a[todo], b[todo], thumbs, hashes, windows, options)
            passed |= _crop(b[todo], a[todo], thumbs, hashes, windows, options)
            keep[todo[passed]] = True
            todo = todo[~passed & (ratio[todo] <= options.frame_ratio)]  # the costly test last
            if len(todo):
                keep[todo[_frame_block(thumbs, a[todo], b[todo]) >= options.frame]] = True
        return min(start + BLOCK, len(a))

    with torch_threads(1), ThreadPoolExecutor(max(1, usable_cores())) as pool:
        for done in pool.map(screen, range(0, len(a), BLOCK)):
            if progress:
                progress(done, len(a))
    return keep


def screen_one(
    first: ImageSignature | None,
    second: ImageSignature | None,
    ratio: float,
    options: ScreenOptions = ScreenOptions(),
) -> bool:
    """:func:`screen_pairs` for one pair of signatures (calibration's edited copies)."""
    if first is None or second is None:
        return True
    one = np.zeros(1, np.int64)
    return bool(
        screen_pairs(
            one,
            one + 1,
            np.asarray([ratio], np.float32),
            np.stack([first.thumb, second.thumb]),
            np.stack([first.hashes, second.hashes]),
            np.stack([first.windows, second.windows]),
            np.ones(2, bool),
            options,
        )[0]
    )


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (any trailing shape) made zero-mean and unit-norm over their last two axes."""
    x = x.astype(np.float32)
    x -= x.mean(axis=(-2, -1), keepdims=True)
    norm = np.sqrt((x * x).sum(axis=(-2, -1), keepdims=True))
    return x / np.maximum(norm, 1e-6)


def framing(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair (``x``, ``y``: M x S x S): the best correlation of ``x`` under an isometry
    with ``y``, and that isometry."""
    xn, yn = _normalised(x), _normalised(y).reshape(len(y), -1, 1)
    scores = np.concatenate(
        [
            np.matmul(orient(xn, turn).reshape(len(x), 1, -1), yn)[:, :, 0]
            for turn in range(len(ISOMETRIES))
        ],
        axis=1,
    )
    return scores.max(axis=1), scores.argmax(axis=1)


def banded(x: np.ndarray, y: np.ndarray, isometry: np.ndarray) -> np.ndarray:
    """Per pair: the best correlation of ``x`` (turned by ``isometry``) with ``y`` leaving out
    one quarter band (top, bottom, left or right), from the sums over each band."""
    turned = np.empty_like(x)
    for turn in np.unique(isometry):
        turned[isometry == turn] = orient(x[isometry == turn], int(turn))
    first, second = turned.astype(np.int32), y.astype(np.int32)  # exact sums below
    left = SIDE * SIDE - BAND * SIDE  # pixels outside the band
    sums = []  # per quantity: (4, M) sums over what each of the four bands leaves
    for value in (first, second, first * first, second * second, first * second):
        by_row, by_col = value.sum(axis=2), value.sum(axis=1)
        bands = [by_row[:, :BAND], by_row[:, -BAND:], by_col[:, :BAND], by_col[:, -BAND:]]
        total = by_row.sum(axis=1)
        sums.append(np.stack([total - band.sum(axis=1) for band in bands]).astype(np.float64))
    sx, sy, sxx, syy, sxy = sums
    spread = np.maximum(sxx - sx * sx / left, 0) * np.maximum(syy - sy * sy / left, 0)
    with np.errstate(all="ignore"):
        score = np.where(spread > 1e-6, (sxy - sx * sy / left) / np.sqrt(spread), 0.0)
    return score.max(axis=0).astype(np.float32)


def _window_grid() -> tuple[np.ndarray, np.ndarray]:
    """For each window, where its SIDE x SIDE samples fall in a SIDE px thumbnail (y, x)."""
    starts = WINDOW_STARTS * SIDE / WINDOW_BASE
    step = (np.arange(SIDE) + 0.5) * (WINDOW_SIDE * SIDE / WINDOW_BASE) / SIDE - 0.5
    ys = np.stack([top + step for top in starts for _ in starts])
    xs = np.stack([left + step for _ in starts for left in starts])
    return ys, xs


WINDOW_YS, WINDOW_XS = _window_grid()


def _sample(thumbs: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of each thumbnail on its own grid: thumbs M x S x S, ys / xs M x S."""
    ys, xs = np.clip(ys, 0, SIDE - 1), np.clip(xs, 0, SIDE - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, SIDE - 1), np.minimum(x0 + 1, SIDE - 1)
    wy, wx = (ys - y0)[:, :, None], (xs - x0)[:, None, :]
    rows = np.arange(len(thumbs))[:, None, None]
    t = thumbs.astype(np.float32)

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return t[rows, yy[:, :, None], xx[:, None, :]]

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def _crop(
    whole: np.ndarray,
    part: np.ndarray,
    thumbs: np.ndarray,
    hashes: np.ndarray,
    windows: np.ndarray,
    options: ScreenOptions,
) -> np.ndarray:
    """Per pair: is ``part`` a crop of ``whole``? Its pHash near one of ``whole``'s windows and
    its thumbnail like that window's part of ``whole``'s (the nearest two windows tried)."""
    bits = np.bitwise_count(windows[whole] ^ hashes[part, :1])
    found = np.zeros(len(whole), bool)
    for nearest in np.argsort(bits, axis=1, kind="stable")[:, :2].T:
        close = bits[np.arange(len(whole)), nearest] <= options.window_bits
        if not close.any():
            continue
        rows = np.flatnonzero(close)
        region = _sample(thumbs[whole[rows]], WINDOW_YS[nearest[rows]], WINDOW_XS[nearest[rows]])
        score = (_normalised(region) * _normalised(thumbs[part[rows]])).sum(axis=(1, 2))
        found[rows[score >= options.window]] = True
    return found


def frame_scores(thumbs: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per pair: the best normalised match (OpenCV's TM_CCOEFF_NORMED) of either thumbnail,
    shrunk by each of FRAME_SCALES (area averaging), inside the other, both as they are (a frame
    keeps the picture's orientation). Batched: each scale is one grouped convolution over a
    block of pairs, the windows' spreads from integral images.

    A block a core, each on one torch thread: torch's own threads wait for each other at every
    small op, and lose most of their speed when another process wants a core (8,192 real pairs,
    this 2-core Xeon: 2 torch threads 178 us a pair quiet, 623 beside a busy process; 2 blocks
    at once on 1 thread each, 132 and 174)."""
    starts = range(0, len(first), BLOCK)

    def block(start: int) -> np.ndarray:
        part = slice(start, start + BLOCK)
        return _frame_block(thumbs, first[part], second[part])

    with torch_threads(1), ThreadPoolExecutor(max(1, usable_cores())) as pool:
        return np.concatenate([np.zeros(0, np.float32), *pool.map(block, starts)])


def _frame_block(thumbs: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """:func:`frame_scores` of one block of pairs, on the calling thread."""
    x, y = thumbs[first], thumbs[second]
    both = _frames_inside(np.concatenate([x, y]), np.concatenate([y, x]))
    return np.maximum(both[: len(x)], both[len(x) :])


def _frames_inside(big: np.ndarray, small: np.ndarray) -> np.ndarray:
    """Per picture (M x S x S uint8): the best match of ``small`` shrunk by each of
    FRAME_SCALES inside ``big``; -1 where every shrunk copy is flat (any match would be noise)."""
    import torch
    import torch.nn.functional as F

    count = len(big)
    wide = big.astype(np.int32)
    integrals = [_integral(wide), _integral(wide * wide)]  # exact sums of pixels and squares
    pictures = torch.from_numpy(big.astype(np.float32))
    smalls = torch.from_numpy(small.astype(np.float32))
    best = torch.full((count,), -1.0)
    narrow: dict[int, torch.Tensor] = {}  # ``small`` shrunk across to each width
    for width, height in FRAME_SCALES:
        w, h = max(4, round(SIDE * width)), max(4, round(SIDE * height))
        if w not in narrow:  # area averaging is linear and separable: two products
            narrow[w] = smalls if w == SIDE else smalls @ _shrink(w).T
        template = narrow[w] if h == SIDE else _shrink(h) @ narrow[w]
        template = template - template.mean(dim=(1, 2), keepdim=True)
        energy = template.pow(2).sum(dim=(1, 2))
        product = F.conv2d(pictures[None], template[:, None], groups=count)[0]
        total, squares = (_box(integral, h, w) for integral in integrals)
        total = total.astype(np.float64)  # its square outgrows int32
        spread = torch.from_numpy((squares - total * total / (h * w)).astype(np.float32))
        match = product / torch.sqrt(spread * energy[:, None, None]).clamp_min(1e-6)
        match = torch.where(spread > 1e-3, match, 0.0).amax(dim=(1, 2))  # flat window: 0
        match[energy / (h * w) < 4.0] = -1.0  # the template's standard deviation under 2
        best = torch.maximum(best, match)
    return best.numpy()


def _integral(values: np.ndarray) -> np.ndarray:
    """Integral images (M x (S+1) x (S+1), int32: a 32 px picture's squares sum under 2^31)."""
    out = np.zeros((len(values), SIDE + 1, SIDE + 1), np.int32)
    np.cumsum(values, axis=1, dtype=np.int32, out=out[:, 1:, 1:])
    np.cumsum(out[:, 1:, 1:], axis=2, out=out[:, 1:, 1:])
    return out


def _box(integral: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums over every h x w window, from an integral image (M x (S+1) x (S+1))."""
    return integral[:, h:, w:] - integral[:, :-h, w:] - integral[:, h:, :-w] + integral[:, :-h, :-w]


@functools.cache
def _shrink(size: int):
    """size x SIDE: the rows of cv2.resize's area averaging from SIDE to ``size`` pixels (it is
    linear and separable, so resizing the identity gives its matrix)."""
    import cv2
    import torch

    identity = np.eye(SIDE, dtype=np.float32)
    return torch.from_numpy(cv2.resize(identity, (SIDE, size), interpolation=cv2.INTER_AREA))
