"""ORB keypoints of a working copy, their matches between two pictures, and the fits RANSAC
makes of them: a similarity (scale, turn, shift) or a stretch (each axis scaled apart). The
verifier's geometric test (``verify.py``) warps one picture onto the other with the fit it
finds here and judges the pixels there.
"""

from __future__ import annotations

import math

import numpy as np

from retrieval.devices import faiss_threads

KEYPOINTS = 600  # ORB keypoints per image


def _orb():
    import cv2

    return cv2.ORB_create(nfeatures=KEYPOINTS, fastThreshold=12)


def detected(image: np.ndarray) -> tuple[list, tuple[np.ndarray, np.ndarray] | None]:
    """The ORB keypoints of a working copy, and (points, descriptors) of them (None: fewer
    than 8)."""
    keypoints, descriptors = _orb().detectAndCompute(np.ascontiguousarray(image), None)
    if descriptors is None or len(keypoints) < 8:
        return list(keypoints), None
    return list(keypoints), (np.float32([k.pt for k in keypoints]), descriptors)


def mirrored(keypoints: list, width: int) -> list:
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


def described(image: np.ndarray | None, keypoints: list):
    """(points, ORB descriptors) of ``keypoints`` on ``image``; None when fewer than 8."""
    if image is None or len(keypoints) < 8:
        return None
    points, descriptors = _orb().compute(np.ascontiguousarray(image), keypoints)
    if descriptors is None or len(points) < 8:
        return None
    return np.float32([p.pt for p in points]), descriptors


def matches(found_a, found_b) -> tuple[np.ndarray, np.ndarray] | None:
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


def similarity(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int] | None:
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


def stretch(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int] | None:
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
