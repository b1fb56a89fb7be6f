"""The verifier's keypoint matching: the matches OpenCV's brute-force matcher gives (nearest two
by Hamming distance, Lowe's ratio test), found with faiss on the calling thread alone."""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from retrieval.devices import faiss_threads
from retrieval.duplicates import keypoints as orb
from retrieval.duplicates.edits import edited
from tests.corpus import scene


def opencv_matches(found_a, found_b):
    """What the verifier matched with before: cv2.BFMatcher's knnMatch and the ratio test."""
    import cv2

    points_a, desc_a = found_a
    points_b, desc_b = found_b
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(desc_b, desc_a, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < 0.8 * m[1].distance]
    if len(good) < 8:
        return None
    return points_b[[m.queryIdx for m in good]], points_a[[m.trainIdx for m in good]]


def as_rows(matches) -> np.ndarray:
    """The matches as (x_b, y_b, x_a, y_a) rows in one order, whatever order they came in."""
    rows = np.hstack(matches)
    return rows[np.lexsort(rows.T[::-1])]


def keypoints(image: Image.Image, mirrored: bool = False):
    grey = np.asarray(image.convert("L"))
    points, found = orb.detected(grey)
    if not mirrored:
        return found
    return orb.described(grey[:, ::-1], orb.mirrored(points, grey.shape[1]))


def test_matches_are_opencvs_brute_force_matches() -> None:
    compared = 0
    for seed in range(6):
        original = scene(seed, (320, 240))
        found_a = keypoints(original)
        for other, mirrored in (
            (edited(original, "cropped", np.random.default_rng(seed)), False),
            (edited(original, "border", np.random.default_rng(seed)), False),
            (original, True),
            (scene(seed + 100, (320, 240)), False),  # a different picture: few or no matches
        ):
            found_b = keypoints(other, mirrored)
            ours, theirs = orb.matches(found_a, found_b), opencv_matches(found_a, found_b)
            assert (ours is None) == (theirs is None), (seed, mirrored)
            if ours is not None:
                assert np.array_equal(as_rows(ours), as_rows(theirs)), (seed, mirrored)
                compared += 1
    assert compared >= 12  # the copies matched (a test of matching, not of None == None)


def test_faiss_threads_sets_the_calling_threads_setting_and_puts_it_back() -> None:
    """Verification calls faiss from a thread per core, each asking for one OpenMP thread:
    that must neither leak into other threads nor outlive the call."""
    import faiss

    before = faiss.omp_get_max_threads()
    wanted = before + 1
    seen: dict[str, int] = {}

    def worker() -> None:
        with faiss_threads(wanted):
            seen["inside"] = faiss.omp_get_max_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["inside"] == wanted
    assert faiss.omp_get_max_threads() == before  # another thread's setting left this alone
    with faiss_threads(wanted):
        assert faiss.omp_get_max_threads() == wanted
    assert faiss.omp_get_max_threads() == before
