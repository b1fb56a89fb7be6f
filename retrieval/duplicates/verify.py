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
   overlap, because the static part dominates the correlation. So each pair is also compared on
   a 12 x 12 grid of blocks (``_second_shot``): an edited copy agrees block by block everywhere
   except where something was painted on one of the two, which is a caption bar or a border
   along an edge (peeled off first) or a small logo; a second shot has either blocks that only
   roughly agree all over (the view moved: the median block correlation is low) or a connected
   patch of disagreeing blocks away from the edges (something in the scene moved).

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

from retrieval.devices import faiss_threads
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
KEYPOINTS = 600  # ORB keypoints per image
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
            entry["detected"], entry["points"] = ([], None) if grey is None else _detected(grey)
        if not mirrored:
            return entry["points"]
        if "mirrored" not in entry:
            grey = entry["grey"]
            flipped = _mirrored(entry["detected"], 0 if grey is None else grey.shape[1])
            entry["mirrored"] = _described(None if grey is None else grey[:, ::-1], flipped)
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
    for model in (_similarity, _stretch):
        for mirrored in (False, True):
            if mirrored not in matched:
                found_b = images.keypoints(path_b, mirrored)
                matched[mirrored] = None if found_b is None else _matches(found_a, found_b)
            least = (
                options.inliers
                if model is _similarity
                else max(options.inliers, options.stretch_inliers)
            )
            # a fit's inliers are some of the matches: too few matches, no fit worth the RANSAC
            pairs = matched[mirrored]
            if pairs is None or len(pairs[0]) < max(least, best.inliers + 1):
                continue
            fit = model(*pairs)
            if fit is None:
                continue
            matrix, inliers = fit
            if inliers < least or inliers <= best.inliers:
                continue
            b = images.grey(path_b)
            b_used = np.ascontiguousarray(b[:, ::-1]) if mirrored else b
            verdict = _aligned(a, b_used, matrix, inliers, mirrored, options, overlap_bar)
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


def _orb():
    import cv2

    return cv2.ORB_create(nfeatures=KEYPOINTS, fastThreshold=12)


def _detected(image: np.ndarray) -> tuple[list, tuple[np.ndarray, np.ndarray] | None]:
    """The ORB keypoints of a working copy, and (points, descriptors) of them (None: fewer
    than 8)."""
    keypoints, descriptors = _orb().detectAndCompute(np.ascontiguousarray(image), None)
    if descriptors is None or len(keypoints) < 8:
        return list(keypoints), None
    return list(keypoints), (np.float32([k.pt for k in keypoints]), descriptors)


def _mirrored(keypoints: list, width: int) -> list:
    """``keypoints`` of a picture ``width`` px wide, where they fall in its mirror image (a
    corner is a corner either way round, so the mirror needs no detection of its own: that
    is most of ORB's time)."""
    import cv2

    return [
        cv2.KeyPoint(
            width - 1 - k.pt[0], k.pt[1], k.size, (180 - k.angle) % 360, k.response, k.octave
        )
        for k in keypoints
    ]


def _described(image: np.ndarray | None, keypoints: list):
    """(points, ORB descriptors) of ``keypoints`` on ``image``; None when fewer than 8."""
    if image is None or len(keypoints) < 8:
        return None
    points, descriptors = _orb().compute(np.ascontiguousarray(image), keypoints)
    if descriptors is None or len(points) < 8:
        return None
    return np.float32([p.pt for p in points]), descriptors


def _matches(found_a, found_b) -> tuple[np.ndarray, np.ndarray] | None:
    """``b``'s and ``a``'s points of the descriptor matches that pass the ratio test: each of
    ``b``'s descriptors with its nearest two of ``a``'s, by exact Hamming distance in a faiss
    flat binary index. The ratio test keeps only a strictly nearest one, so these are the
    matches OpenCV's brute-force matcher finds, in a quarter of its time (no match objects)."""
    import faiss

    points_a, desc_a = found_a
    points_b, desc_b = found_b
    index = faiss.IndexBinaryFlat(8 * desc_a.shape[1])
    index.add(np.ascontiguousarray(desc_a))
    with faiss_threads(1):  # verification runs a thread per core already
        distances, nearest = index.search(np.ascontiguousarray(desc_b), 2)
    good = np.flatnonzero((nearest[:, 1] >= 0) & (distances[:, 0] < 0.8 * distances[:, 1]))
    if len(good) < 8:
        return None
    return points_b[good], points_a[nearest[good, 0]]


def _similarity(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int] | None:
    """A similarity taking ``b``'s points onto ``a``'s, and its RANSAC inlier count."""
    import cv2

    matrix, mask = cv2.estimateAffinePartial2D(
        source,
        target,
        method=cv2.RANSAC,
        ransacReprojThreshold=4.0,
        maxIters=2000,
        confidence=0.995,
    )
    if matrix is None or mask is None:
        return None
    scale = math.hypot(matrix[0, 0], matrix[1, 0])
    if not 0.05 < scale < 20:
        return None
    return matrix, int(mask.sum())


STRETCH_SEEDS = 256  # RANSAC draws for the stretch: two matches each
STRETCH_MAX = 2.5  # one axis scaled at most this much more than the other (4:3 <-> 1:1 is 1.33)


def _stretch(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int] | None:
    """A stretch (x and y scaled apart, then shifted; no turn, no shear) taking ``b``'s points
    onto ``a``'s, and its inlier count: RANSAC on two matches (each axis's scale and shift
    from their two coordinates), refitted by least squares on the inliers. None when the
    aspect ratio hardly changes (the similarity has judged that) or changes beyond reason."""
    rng = np.random.default_rng(len(source))  # seeded: one pair, one verdict
    first, second = rng.integers(0, len(source), (2, STRETCH_SEEDS))
    d_source = source[first] - source[second]
    d_target = target[first] - target[second]
    spread = np.abs(d_source).min(axis=1) >= 8  # both axes' scales measurable
    if not spread.any():
        return None
    scales = d_target[spread] / d_source[spread]  # (draws, 2)
    shifts = target[first[spread]] - scales * source[first[spread]]
    sane = (scales > 0.05).all(axis=1) & (scales < 20).all(axis=1)
    if not sane.any():
        return None
    scales, shifts = scales[sane], shifts[sane]
    moved = source[None] * scales[:, None] + shifts[:, None]  # (draws, matches, 2)
    errors = np.linalg.norm(moved - target[None], axis=2)
    counts = (errors < 4.0).sum(axis=1)
    inliers = errors[int(counts.argmax())] < 4.0
    if inliers.sum() < 4:
        return None
    rows = []
    for axis in (0, 1):
        design = np.stack([source[inliers, axis], np.ones(int(inliers.sum()))], axis=1)
        rows.append(np.linalg.lstsq(design, target[inliers, axis], rcond=None)[0])
    (scale_x, shift_x), (scale_y, shift_y) = rows
    if min(scale_x, scale_y) <= 0.05:
        return None
    ratio = abs(math.log(scale_x / scale_y))
    if ratio < 0.03 or ratio > math.log(STRETCH_MAX):
        return None
    matrix = np.array([[scale_x, 0.0, shift_x], [0.0, scale_y, shift_y]])
    errors = np.linalg.norm(source @ matrix[:, :2].T + matrix[:, 2] - target, axis=1)
    return matrix, int((errors < 4.0).sum())


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


SECOND_SHOT_GRID = 12  # blocks of about 10 x 10 px at COMPARE_SIDE: a moved object spans several
TEXTURED = 8.0  # a block's grey-level spread (std) from which it has something to compare
DISAGREE = 0.5  # a block pair correlating below this shows different things
# Bands along an edge where most blocks disagree are taken as painted (a caption bar over the
# picture: at most 22% of its height in bench/duplicates.py, so up to 3-4 lines of 12) and left
# out before looking for a moved object; a second shot whose difference lies only there passes.
EDGE_LINES = 4


def _second_shot(
    x: np.ndarray, y: np.ndarray, keep: np.ndarray, options: VerifyOptions, painted: bool = False
) -> str | None:
    """Why two aligned pictures are two shots of one scene rather than one picture edited, or
    None when they look like one picture. ``painted``: the pair is accepted as painted over
    (a caption on a textureless picture can be most of its texture), so the blocks' overall
    agreement is not asked again; a moved patch still is."""
    import cv2

    grid = SECOND_SHOT_GRID
    corr, spread_x, spread_y = _block_statistics(x, y, keep, grid)
    # flat in both says nothing; textured in one only counts (an object moved over a clear sky
    # is flat there), textured in both is what the overall agreement is judged on
    corr[np.maximum(spread_x, spread_y) < TEXTURED] = np.nan
    both = ~np.isnan(corr) & (np.minimum(spread_x, spread_y) >= TEXTURED)
    textured = ~np.isnan(corr)
    if not painted and both.sum() >= grid:
        median = float(np.median(corr[both]))
        if median < options.block_median:
            return f"a second shot: its blocks only roughly agree (median {median:.2f})"
    differ = textured & (np.nan_to_num(corr, nan=1.0) < DISAGREE)
    differ &= ~_painted_bands(textured, differ)
    count, labels = cv2.connectedComponents(differ.astype(np.uint8), connectivity=4)
    largest = max((int((labels == n).sum()) for n in range(1, count)), default=0)
    if largest >= options.moved_blocks:
        return f"a second shot: something moved ({largest} of {grid * grid} blocks differ)"
    return None


def _block_statistics(
    x: np.ndarray, y: np.ndarray, keep: np.ndarray, grid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of a ``grid`` x ``grid`` split (numpy's array_split): the correlation of ``x``
    and ``y`` over the kept pixels (NaN where under 90% of the block is kept) and each one's
    standard deviation, from block sums in one pass instead of a loop over the blocks."""
    splits = [np.array_split(np.arange(n), grid) for n in x.shape]
    starts = [np.array([part[0] if len(part) else 0 for part in split]) for split in splits]
    sizes = [np.array([len(part) for part in split]) for split in splits]

    def sums(values: np.ndarray) -> np.ndarray:
        out = np.add.reduceat(np.add.reduceat(values, starts[0], axis=0), starts[1], axis=1)
        out[sizes[0] == 0, :] = 0  # reduceat gives a lone element for an empty slice
        out[:, sizes[1] == 0] = 0
        return out

    k = keep.astype(np.float64)
    a, b = x.astype(np.float64) * k, y.astype(np.float64) * k
    count = sums(k)
    area = np.outer(sizes[0], sizes[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a, mean_b = sums(a) / count, sums(b) / count
        var_a = np.maximum(sums(a * a) / count - mean_a**2, 0)
        var_b = np.maximum(sums(b * b) / count - mean_b**2, 0)
        cov = sums(a * b) / count - mean_a * mean_b
        norm = np.sqrt(var_a * var_b)
        corr = np.where(norm > 0, cov / np.where(norm > 0, norm, 1), 0.0)
        corr[(area == 0) | (count < 0.9 * area)] = np.nan
    return corr, np.sqrt(var_a), np.sqrt(var_b)


def _painted_bands(textured: np.ndarray, differ: np.ndarray) -> np.ndarray:
    """The blocks of the lines along each edge, up to EDGE_LINES deep, in which most textured
    blocks differ: where a caption bar or a band painted over the picture lies."""
    band = np.zeros(differ.shape, bool)
    for grid_t, grid_d, out in ((textured, differ, band), (textured.T, differ.T, band.T)):
        for order in (range(len(grid_t)), range(len(grid_t) - 1, -1, -1)):
            for depth, line in enumerate(order):
                if depth >= EDGE_LINES:
                    break
                seen = grid_t[line]
                if not seen.any():
                    continue  # nothing there to judge (a flat strip): look one line further in
                if grid_d[line][seen].mean() < 0.5:
                    break
                out[line] = True
    return band


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
