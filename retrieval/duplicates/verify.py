"""Is this pair one picture, edited? Each candidate pair is checked on its pixels, cheap test first.

1. **Same framing** (photometric edits, resizing, re-encoding, greyscale, flips, quarter turns):
   the pHashes agree under some isometry and the two pictures, turned alike and brought to one
   size, correlate at ``same_framing`` or more at up to 128 px. Normalised cross-correlation is
   blind to brightness and contrast, so an edit of those passes; a second shot of the same
   scene (the camera or the subject moved) does not, at that size.
2. **Geometry** (crops, borders, captions, screenshots): ORB keypoints matched both ways round
   (the second image mirrored too), a similarity transform fitted by RANSAC (or, where none
   verifies the pair, a stretch: each axis scaled apart, for a copy resized to another aspect
   ratio), the second image warped onto the first, and the correlation of the *overlap* at
   ``overlap`` or more. Enough inliers alone are not enough: a re-shoot of a building matches
   keypoints too, but its aligned pixels differ (parallax, light, people); an edited copy's
   do not.
3. **Second shots** (both tests): a re-shoot of a still scene can pass either test on its whole
   overlap, because the static part dominates the correlation, so each pair is also compared
   block by block (``second_shot.py``): an edited copy agrees everywhere but where something
   was painted on it; a second shot's blocks only roughly agree, or a patch of them differs.

Small pictures are weaker evidence: below COMPARE_SIDE the correlation bars close towards 1
in proportion and fewer pHash bits may differ (:func:`size_bar`, :func:`framing_bits`).

Every verdict carries its evidence: what was compared, the numbers, and what the edit looks like
("mirrored", "cropped to 64%", "border added", ...).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.duplicates import keypoints as orb
from retrieval.duplicates.second_shot import second_shot
from retrieval.errors import ImageReadError
from retrieval.images.decode import load_image
from retrieval.images.hashes import (
    ISOMETRIES,
    ImageSignature,
    best_isometry,
    correlation,
    orient,
)

WORK_SIDE = 512  # the geometric check's images: longer side at most this
EDGE = 3  # pixels of a margin next to the picture left out when judging it (blended there)
MIN_SHORT_SIDE = 256  # ... and smaller ones scaled up to this, so ORB finds corners
COMPARE_SIDE = 128  # correlations are taken at this size (fine detail, not noise)
UNREADABLE = "a file could not be read"  # a verdict's edits when one picture could not be opened


@dataclass(frozen=True)
class VerifyOptions:
    """The verifier's bars (see the module docstring)."""

    hash_bits: int = 16  # same framing: pHash bits apart, at most
    # same framing: correlation at COMPARE_SIDE, at least; compared smaller (a small picture),
    # the bar closes towards 1 in proportion (see `size_bar`; pHash bits: `framing_bits`)
    same_framing: float = 0.90
    thumbnail: float = 0.90  # same framing: correlation of the 32 px thumbnails, at least
    inliers: int = 15  # geometry: RANSAC inliers, at least
    # ... for a stretch, tried only after no similarity verified the pair: a second model gets
    # more chances to fit by luck, so it needs more support. On 3,000 Fashion-MNIST pictures
    # (28 px) two different garments of one kind met a stretch with 15-16 inliers and passed
    # the overlap bar; the golf-ball copy of Imagenette val aligns with 48-55.
    stretch_inliers: int = 30
    overlap: float = 0.80  # geometry: correlation of the aligned overlap, at least
    # geometry, when something is painted over part of it (a caption, a logo): this share of
    # the overlap's textured blocks correlate at `overlap`, with this many inliers at least
    blocks: float = 0.60
    painted_inliers: int = 100
    contained: float = 0.90  # geometry: one picture lies this much inside the other
    # second shots (both tests; numbers from bench/duplicates.py's 2,380 verified copies of nine
    # edits, the garbage truck of Imagenette val and 150 synthetic moved-object re-shoots):
    # the median correlation of blocks textured in both pictures is 0.89 or more for every
    # original-to-copy pair and 0.78 or more for every copy-to-copy pair accepted on its overlap
    # correlation; the truck's is 0.61-0.62 either way round. 0.75 lies between.
    block_median: float = 0.75
    # the largest connected patch of disagreeing blocks (of 144), edge bands peeled: at most 6
    # for any copy; 8 or more for 76% of the synthetic re-shoots (an object 22-40% of the
    # picture's side moved by 15-40% of its width). 8 keeps a margin above the copies.
    moved_blocks: int = 8


@dataclass
class Verdict:
    """What the verifier found for one pair: a copy or not, and why."""

    copy: bool
    test: str  # "same framing" | "geometry" | "none passed"
    hash_bits: int
    correlation: float
    inliers: int = 0
    edits: list[str] = field(default_factory=list)
    padded: str | None = None  # "first" / "second": that picture is the other plus a margin

    def evidence(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "hash_bits": self.hash_bits,
            "correlation": round(self.correlation, 3),
            "inliers": self.inliers,
            "edits": self.edits,
        }


class ImageCache:
    """Each image's grey working copy and its keypoints (as it is and mirrored), computed once
    per pass and kept in a small LRU (pairs come sorted by their first image). Threads share
    it: the LRU's bookkeeping under a lock, decoding outside it (two threads that want one
    new image may both decode it; the first to finish is kept)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._kept: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _entry(self, path: str) -> dict[str, Any]:
        with self._lock:
            entry = self._kept.pop(path, None)
            if entry is not None:
                self._kept[path] = entry
                return entry
        made = {"grey": _working_image(path)}
        with self._lock:
            entry = self._kept.setdefault(path, made)
            while len(self._kept) > self.size:
                self._kept.pop(next(iter(self._kept)))
        return entry

    def grey(self, path: str) -> np.ndarray | None:
        return self._entry(path)["grey"]

    def keypoints(self, path: str, mirrored: bool = False):
        """ORB keypoints and descriptors of the working copy (None: too few, or unreadable);
        mirrored, the same keypoints mirrored, described again on the mirrored copy."""
        entry = self._entry(path)
        if "points" not in entry:
            grey = entry["grey"]
            entry["detected"], entry["points"] = ([], None) if grey is None else orb.detected(grey)
        if not mirrored:
            return entry["points"]
        if "mirrored" not in entry:
            grey = entry["grey"]
            flipped = orb.mirrored(entry["detected"], 0 if grey is None else grey.shape[1])
            entry["mirrored"] = orb.described(None if grey is None else grey[:, ::-1], flipped)
        return entry["mirrored"]


def _working_image(path: str) -> np.ndarray | None:
    import cv2

    try:
        image = load_image(path, mode="L", draft_size=MIN_SHORT_SIDE)
    except (ImageReadError, OSError):
        return None
    pixels = np.asarray(image, np.uint8)
    height, width = pixels.shape
    scale = min(WORK_SIDE / max(height, width), 1.0)
    if min(height, width) * scale < MIN_SHORT_SIDE:
        scale = min(MIN_SHORT_SIDE / min(height, width), 4.0)
    if abs(scale - 1.0) > 1e-3:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        method = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        pixels = cv2.resize(pixels, size, interpolation=method)
    return pixels


def verify_pair(
    first: tuple[str, ImageSignature | None],
    second: tuple[str, ImageSignature | None],
    images: ImageCache,
    options: VerifyOptions = VerifyOptions(),
) -> Verdict:
    """Verify that ``second`` (path, signature) is an edited copy of ``first`` or the reverse."""
    (path_a, sig_a), (path_b, sig_b) = first, second
    bits, turn = (
        (64, 0) if sig_a is None or sig_b is None else best_isometry(sig_a.hashes, sig_b.hashes)
    )
    grey_a, grey_b = images.grey(path_a), images.grey(path_b)
    if grey_a is None or grey_b is None:
        return Verdict(False, "none passed", bits, 0.0, edits=[UNREADABLE])
    if sig_a is not None and sig_b is not None and bits <= options.hash_bits:
        thumbs = correlation(orient(sig_a.thumb, turn), sig_b.thumb)
        if thumbs >= options.thumbnail:
            smallest = min(sig_a.width, sig_a.height, sig_b.width, sig_b.height)
            framed = _same_framing(grey_a, grey_b, turn, smallest)
            side = 0 if framed is None else framed[1].shape[0]
            if (
                framed is not None
                and framed[0] >= size_bar(options.same_framing, side)
                and (bits <= framing_bits(side, options))
            ):
                x, y = framed[1], framed[2]
                second = _second_shot(x, y, np.ones(x.shape, bool), options)
                if second is None:
                    edits = _framing_edits(sig_a, sig_b, turn)
                    return Verdict(True, "same framing", bits, framed[0], edits=edits)
    known = sig_a is not None and sig_b is not None
    side = min(COMPARE_SIDE, sig_a.width, sig_a.height, sig_b.width, sig_b.height) if known else 0
    verdict = _geometry(path_a, path_b, images, options, side or COMPARE_SIDE)
    verdict.hash_bits = bits
    if verdict.copy and known and sig_a.grey != sig_b.grey:
        verdict.edits.append("greyscale")
    return verdict


def size_bar(bar: float, side: int) -> float:
    """A correlation bar for pictures compared at ``side`` px: ``bar`` at COMPARE_SIDE and more,
    closer to 1 in proportion below. Fewer pixels are weaker evidence: at 28 px two different
    garments of one kind (Fashion-MNIST) correlate at 0.91-0.97 framed alike, where their edited
    copies reach 0.96-1.00; at 128 px and more, other photos stay under the bars. So the same
    framing's 0.90 becomes 0.95 at 64 px and 0.978 at 28; the overlap's 0.80, 0.956 at 28."""
    return 1.0 - (1.0 - bar) * min(1.0, side / COMPARE_SIDE)


def framing_bits(side: int, options: VerifyOptions) -> int:
    """The pHash bits apart a pair compared at ``side`` px may be, at most: ``hash_bits`` at
    COMPARE_SIDE and more, fewer for smaller pictures, never under 6. At 28 px the garments'
    look-alikes lie 12 bits apart (half of them; 5% within 6) and their edited copies 0-4."""
    return max(6, round(options.hash_bits * min(1.0, side / COMPARE_SIDE)))


def _same_framing(
    a: np.ndarray, b: np.ndarray, turn: int, smallest: int
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """Correlation of ``a`` turned by ``turn`` and ``b``, both at one size (at most the
    smaller picture's own shorter side: detail it never had is not compared), and the two at
    that size; None when their shapes (after the turn) differ by more than 3% in aspect (not
    the same framing)."""
    import cv2

    turned = orient(a, turn)
    ratio_a = turned.shape[1] / turned.shape[0]
    ratio_b = b.shape[1] / b.shape[0]
    if abs(math.log(ratio_a / ratio_b)) > 0.03:
        return None
    side = max(8, min(COMPARE_SIDE, smallest, *turned.shape, *b.shape))
    size = (side, side)
    x = cv2.resize(turned, size, interpolation=cv2.INTER_AREA)
    y = cv2.resize(b, size, interpolation=cv2.INTER_AREA)
    return correlation(x, y), x, y


def _framing_edits(a: ImageSignature, b: ImageSignature, turn: int) -> list[str]:
    edits = [] if turn == 0 else [ISOMETRIES[turn]]
    pixels_a, pixels_b = a.width * a.height, b.width * b.height
    if pixels_a and pixels_b and abs(math.log(pixels_b / pixels_a)) > 0.05:
        edits.append(
            f"resized to {math.sqrt(min(pixels_a, pixels_b) / max(pixels_a, pixels_b)):.0%}"
        )
    if a.grey != b.grey:
        edits.append("greyscale")
    edits += _tone_edits(a.thumb, b.thumb)
    return edits or ["re-encoded"]


def _tone_edits(a: np.ndarray, b: np.ndarray) -> list[str]:
    mean_a, mean_b = float(a.mean()), float(b.mean())
    std_a, std_b = float(a.std()), float(b.std())
    if abs(mean_a - mean_b) > 8 or (std_a > 1 and abs(math.log(max(std_b, 1) / std_a)) > 0.12):
        return ["brightness/contrast changed"]
    return []


def _geometry(
    path_a: str, path_b: str, images: ImageCache, options: VerifyOptions, side: int
) -> Verdict:
    """Keypoints, RANSAC fits (``b`` as it is and mirrored), overlap correlation (its bar
    raised for small pictures: ``side`` is the smaller one's shorter side, up to COMPARE_SIDE).
    A similarity first; where it fails, a stretch (each axis scaled apart, no turn): a copy
    resized to another aspect ratio (a thumbnail squashed to a square, a framed print scanned
    to a page) has no similarity that aligns it, and the best one RANSAC finds is turned."""
    overlap_bar = size_bar(options.overlap, side)
    best = Verdict(False, "none passed", 64, 0.0)
    found_a = images.keypoints(path_a)
    if found_a is None:
        return best
    a = images.grey(path_a)
    matched: dict[bool, tuple[np.ndarray, np.ndarray] | None] = {}
    # both similarities before either stretch: a pair a similarity verifies is judged as before
    for model in (orb.similarity, orb.stretch):
        for flip in (False, True):
            if flip not in matched:
                found_b = images.keypoints(path_b, flip)
                matched[flip] = None if found_b is None else orb.matches(found_a, found_b)
            least = (
                options.inliers
                if model is orb.similarity
                else max(options.inliers, options.stretch_inliers)
            )
            # a fit's inliers are some of the matches: too few matches, no fit worth the RANSAC
            pairs = matched[flip]
            if pairs is None or len(pairs[0]) < max(least, best.inliers + 1):
                continue
            fit = model(*pairs)
            if fit is None:
                continue
            matrix, inliers = fit
            if inliers < least or inliers <= best.inliers:
                continue
            b = images.grey(path_b)
            b_used = np.ascontiguousarray(b[:, ::-1]) if flip else b
            verdict = _aligned(a, b_used, matrix, inliers, flip, options, overlap_bar)
            if verdict.copy:
                return verdict
            best = verdict
    best.test = "none passed"
    return best


def _aligned(
    a: np.ndarray,
    b: np.ndarray,
    matrix: np.ndarray,
    inliers: int,
    mirrored: bool,
    options: VerifyOptions,
    overlap_bar: float,
) -> Verdict:
    """The verdict on ``b`` warped onto ``a`` by ``matrix``: its overlap correlation, whether
    one lies inside the other, and no sign of a second shot."""
    overlap, agree, cover_a, cover_b, uncovered_a, outside_b, compared = _overlap(a, b, matrix)
    verdict = Verdict(False, "geometry", 64, overlap, inliers)
    painted = inliers >= options.painted_inliers and agree >= options.blocks
    # Two pictures each partly outside the other are two views (a pan, a second shot),
    # not a copy: a copy is the picture, or a part of it, or it inside a larger frame.
    inside = max(cover_a, cover_b) >= options.contained
    if not (inside and (overlap >= overlap_bar or painted)) or compared is None:
        return verdict
    second = _second_shot(*compared, options, painted=painted)
    if second is not None:
        verdict.edits = [second]
        return verdict
    verdict.copy = True
    verdict.edits, verdict.padded = _geometry_edits(
        matrix, mirrored, (cover_a, uncovered_a, a), (cover_b, outside_b, b)
    )
    if overlap < overlap_bar:
        kept = [e for e in verdict.edits if e != "re-encoded"]
        verdict.edits = [*kept, f"painted over ({1 - agree:.0%} of it differs)"]
    return verdict


def _overlap(a: np.ndarray, b: np.ndarray, matrix: np.ndarray):
    """(correlation of the overlap, the share of its textured blocks that agree, share of ``a``
    it covers, share of ``b`` it covers, the mask of ``a``'s pixels ``b`` does not cover, the
    mask of ``b``'s pixels that fall outside ``a``, the two overlaps as compared and the mask
    of the compared pixels (None when they hardly overlap))."""
    import cv2

    height, width = a.shape
    warped = cv2.warpAffine(b, matrix, (width, height), flags=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.full(b.shape, 255, np.uint8), matrix, (width, height))
    mask = cv2.erode((inside == 255).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    cover_a = float(mask.mean())
    back = cv2.invertAffineTransform(matrix)
    lands = cv2.warpAffine(np.full(a.shape, 255, np.uint8), back, (b.shape[1], b.shape[0]))
    outside = lands < 255
    cover_b = 1.0 - float(outside.mean())
    if mask.sum() < 64:
        return 0.0, 0.0, cover_a, cover_b, ~mask, outside, None
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    scale = min(1.0, COMPARE_SIDE / max(bottom - top, right - left))
    size = (max(8, round((right - left) * scale)), max(8, round((bottom - top) * scale)))
    x = cv2.resize(a[top:bottom, left:right], size, interpolation=cv2.INTER_AREA)
    y = cv2.resize(warped[top:bottom, left:right], size, interpolation=cv2.INTER_AREA)
    keep = cv2.resize(mask[top:bottom, left:right].astype(np.uint8), size) > 0
    agree = _blocks_agreeing(x, y, keep)
    overlap = correlation(x[keep], y[keep])
    return overlap, agree, cover_a, cover_b, ~mask, outside, (x, y, keep)


def _blocks_agreeing(x: np.ndarray, y: np.ndarray, keep: np.ndarray, grid: int = 6) -> float:
    """The share of a grid's textured blocks (inside the overlap) where the two correlate at
    0.8 or more: a caption or a logo painted over part of a copy spoils a few blocks, not all."""
    rows = np.array_split(np.arange(x.shape[0]), grid)
    cols = np.array_split(np.arange(x.shape[1]), grid)
    agree = counted = 0
    for r in rows:
        for c in cols:
            inside = keep[np.ix_(r, c)]
            if inside.mean() < 0.9:
                continue
            bx, by = x[np.ix_(r, c)][inside], y[np.ix_(r, c)][inside]
            if bx.std() < 4 and by.std() < 4:
                continue  # flat: says nothing
            counted += 1
            agree += correlation(bx, by) >= 0.8
    return agree / counted if counted >= grid else 0.0


def _second_shot(
    x: np.ndarray, y: np.ndarray, keep: np.ndarray, options: VerifyOptions, painted: bool = False
) -> str | None:
    """``second_shot`` at ``options``' bars."""
    return second_shot(
        x,
        y,
        keep,
        block_median=options.block_median,
        moved_blocks=options.moved_blocks,
        painted=painted,
    )


def _margin(image: np.ndarray, outside: np.ndarray) -> str | None:
    """What ``image`` has beyond the other picture, in whole rows or columns along its edges: a
    plain "border" (on two or more sides) or "bar" (on one), a "caption" (one colour with
    marks on it), or None when it is picture (the other one is then a crop of it). The few
    pixels next to the picture are left out: resampling and JPEG ringing blend the two there."""
    import cv2

    band = outside & (outside.all(axis=1)[:, None] | outside.all(axis=0)[None, :])
    if band.sum() < 0.6 * outside.sum() or not band.any():
        return None  # not along whole edges: the other picture was cut out of this one
    clear = cv2.erode(band.astype(np.uint8), np.ones((2 * EDGE + 1, 2 * EDGE + 1), np.uint8))
    margin = image[clear > 0] if clear.any() else image[band]
    plain = float((np.abs(margin.astype(np.int16) - np.median(margin)) < 16).mean())
    if plain < 0.75:
        return None  # picture, not a margin
    if plain < 0.99:
        return "caption"
    rows, columns = band.all(axis=1), band.all(axis=0)
    thick = 2 * EDGE  # a side's margin is wider than the blend along the picture's own edges
    sides = sum(
        bool(lines.all())
        for lines in (rows[:thick], rows[-thick:], columns[:thick], columns[-thick:])
    )
    return "border" if sides >= 2 else "bar"


def _geometry_edits(matrix, mirrored, first, second) -> tuple[list[str], str | None]:
    """(what the second picture is of the first, which of the two has a margin added)."""
    (cover_a, uncovered_a, a), (cover_b, outside_b, b) = first, second
    edits = ["mirrored"] if mirrored else []
    angle = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    quarter = round(angle / 90) * 90
    if abs(angle - quarter) <= 3:
        if quarter % 360:
            edits.append(f"rotated {abs(quarter) % 360}°")
    else:
        edits.append(f"rotated {abs(angle):.0f}°")
    # the second's height over width, relative to the first's (the matrix takes it onto the first)
    taller = math.hypot(matrix[0, 0], matrix[1, 0]) / math.hypot(matrix[0, 1], matrix[1, 1])
    if abs(math.log(taller)) >= 0.03:
        way = f"{taller:.2f}x taller" if taller > 1 else f"{1 / taller:.2f}x wider"
        edits.append(f"stretched {way}")
    padded = None
    if cover_a < 0.9 and cover_b >= 0.9:
        margin = _margin(a, uncovered_a)
        if margin is None:
            edits.append(f"cropped to {cover_a:.0%} of the area")
        else:
            edits.append(f"{margin} removed")
            padded = "first"
    elif cover_b < 0.9 and cover_a >= 0.9:
        margin = _margin(b, outside_b)
        edits.append(f"{margin} added" if margin else "framed in a larger picture")
        padded = "second" if margin else None
    elif cover_a < 0.9 and cover_b < 0.9:
        edits.append(f"overlapping crops ({cover_a:.0%} and {cover_b:.0%})")
    return edits or ["re-encoded"], padded
