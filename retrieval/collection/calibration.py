"""The near-duplicate threshold, calibrated on the collection itself instead of guessed.

A seeded sample of the collection's own images is edited the way copies of a photo drift
(JPEG re-encoded at quality 20, shrunk to half, the central 85% cropped, 20% brighter); each
copy is embedded with the index's own model and its distance to the original's stored vector is
a *positive*. *Negatives* are the distances from each sampled image to the collection's other
images, leaving out its own nearest few: a real collection already holds duplicates (a third of
one test set had one), and counting those as "different images" drags the threshold far down.
The threshold is the largest distance at which positives still make up ``precision`` of all the
pairs under it, each sampled image's four copies counting as one copy (weight 1/4): a
collection holds at most about one copy per image, not four, and counting all four overstated
precision (Imagenette bench: the threshold fell where 0.55 of the pairs were real, not 0.99).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageEnhance

from retrieval.collection.vectors import sample_positions
from retrieval.errors import ImageReadError, RetrieveError
from retrieval.images.decode import load_image

if TYPE_CHECKING:
    from retrieval.search.index import Index

log = logging.getLogger(__name__)

EDITS = ("jpeg-q20", "half-size", "crop-85", "brighter")
WEIGHT = 1 / len(EDITS)  # the copies of one image count as one


@dataclass(frozen=True)
class CalibrationOptions:
    sample: int = 300
    precision: float = 0.99
    skip_nearest: int = 3  # each sample's own nearest few, possibly its real duplicates
    negatives: int = 30  # neighbours per sample after those, as "different images"
    seed: int = 0
    batch: int = 32


@dataclass
class Calibration:
    threshold: float
    precision: float
    recall: float
    positives: np.ndarray  # copy -> its original, one per sample and edit
    negatives: np.ndarray  # sample -> other images, beyond its nearest few
    nearest: np.ndarray  # sample -> its nearest other image (the histogram's third curve)
    sampled: int
    edits: dict[str, np.ndarray] = field(default_factory=dict)

    def table(self, rows: int = 9) -> list[tuple[float, float, float]]:
        """(threshold, precision, recall) at even steps up to twice the chosen threshold."""
        top = max(self.threshold * 2, 1e-6)
        return [
            (float(t), *precision_recall(self.positives, self.negatives, float(t), WEIGHT))
            for t in np.linspace(top / rows, top, rows)
        ]


def edited_copies(image: Image.Image) -> dict[str, bytes]:
    """The four edits of one image, each encoded as a file would be."""
    width, height = image.size
    crop_w, crop_h = max(1, round(width * 0.85)), max(1, round(height * 0.85))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    versions = {
        "jpeg-q20": (image, 20),
        "half-size": (image.resize((max(1, width // 2), max(1, height // 2)), Image.LANCZOS), 95),
        "crop-85": (image.crop((left, top, left + crop_w, top + crop_h)), 95),
        "brighter": (ImageEnhance.Brightness(image).enhance(1.2), 95),
    }
    out = {}
    for name, (picture, quality) in versions.items():
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        out[name] = buffer.getvalue()
    return out


def precision_recall(
    positives: np.ndarray, negatives: np.ndarray, t: float, weight: float = 1.0
) -> tuple[float, float]:
    """(precision, recall) at distance ``t``; each positive counts ``weight`` pairs."""
    found = int((positives <= t).sum())
    tp, fp = found * weight, int((negatives <= t).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    return precision, found / max(1, len(positives))


def pick_threshold(
    positives: np.ndarray, negatives: np.ndarray, precision: float, weight: float = 1.0
) -> float:
    """The largest candidate distance whose precision is still >= ``precision``."""
    candidates = np.unique(np.concatenate([positives, negatives]))
    best = 0.0
    pos, neg = np.sort(positives), np.sort(negatives)
    tp = np.searchsorted(pos, candidates, side="right") * weight
    fp = np.searchsorted(neg, candidates, side="right")
    ok = (tp > 0) & (tp >= precision * (tp + fp))
    if ok.any():
        best = float(candidates[np.flatnonzero(ok)[-1]])
        # Halfway to the next distance that breaks it, so the rule is not on a knife's edge.
        later = neg[neg > best]
        if len(later):
            best = float((best + later[0]) / 2)
    return best


def calibrate(
    index: Index,
    options: CalibrationOptions = CalibrationOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Calibrate on ``options.sample`` images of ``index`` (see the module docstring)."""
    rows = index.rows(limit=None)
    if len(rows) < 3:
        raise RetrieveError("calibrating needs at least 3 indexed images; give --threshold")
    picked = [rows[p] for p in sample_positions(len(rows), options.sample, options.seed)]
    positives: dict[str, list[float]] = {name: [] for name in EDITS}
    used = []
    for start in range(0, len(picked), options.batch):
        batch = picked[start : start + options.batch]
        copies, owners, names = [], [], []
        for row in batch:
            try:
                image = load_image(row.path, mode="RGB")
            except ImageReadError as exc:
                log.warning("calibration: %s", exc)
                continue
            for name, data in edited_copies(image).items():
                copies.append(data)
                owners.append(row.id)
                names.append(name)
            used.append(row.id)
        if copies:
            features, records = index.embed(copies)
            good = [i for i, r in enumerate(records) if r.ok]
            originals = index.vectors([owners[i] for i in good])
            gaps = np.linalg.norm(features - originals, axis=1)
            for i, gap in zip(good, gaps):
                positives[names[i]].append(float(gap))
        if progress:
            progress(min(start + options.batch, len(picked)), len(picked))
    if not used:
        raise RetrieveError("calibration could not read any sampled image; give --threshold")
    k = min(len(rows), 1 + options.skip_nearest + options.negatives)
    distances, ids = index.search_vectors(index.vectors(used), k)
    own = np.asarray(used)[:, None]
    distances = np.where(ids == own, np.inf, distances)  # the image itself, wherever it ranks
    distances = np.sort(distances, axis=1)[:, :-1] if k > 1 else distances
    nearest = distances[:, 0]
    skip = min(options.skip_nearest, max(0, distances.shape[1] - 1))
    negatives = distances[:, skip:].ravel()
    negatives = negatives[np.isfinite(negatives)]
    edits = {name: np.asarray(v, np.float32) for name, v in positives.items()}
    all_positives = np.concatenate(list(edits.values()))
    threshold = pick_threshold(all_positives, negatives, options.precision, WEIGHT)
    precision, recall = precision_recall(all_positives, negatives, threshold, WEIGHT)
    return Calibration(
        threshold,
        precision,
        recall,
        all_positives,
        negatives,
        nearest[np.isfinite(nearest)],
        len(used),
        edits,
    )
