"""Calibration on the collection itself: what the duplicates pass finds, measured, not assumed.

A seeded sample of the collection's own images is edited every way a copy drifts
(:mod:`retrieval.duplicates.edits`: re-encoded badly, shrunk, cropped off-centre, mirrored,
turned, bordered, greyscale, captioned, brightened), each copy written to a scratch folder and
put through the same signals and the same verifier as the collection's pairs:

- **recall per edit**: the share of copies that a signal proposes with their original, the
  screen passes (:mod:`retrieval.duplicates.screen`) *and* the verifier accepts;
- **precision**: the verifier is also run on each sampled image's nearest other images (by fc7,
  leaving out its nearest few, which may be its real duplicates); each one it accepts is a false
  copy (the verifier alone: the screen, which only drops pairs, is not given the chance to
  spare it a false one, so the figure errs low). Each image's edited copies count as one copy
  (a collection holds about one copy of an image, not nine), so precision is
  ``accepted copies / 9 / (that + false copies)``;
- the **similar tier's threshold**: the fc7 distance at which edited copies still make up
  ``precision`` of the pairs under it (each image's copies again weighing one), as before the
  verifier existed; it only bounds the unverified "similar" groups.

Nothing is reported that was not measured here: with few images the figures say how few.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from retrieval.collection.vectors import sample_positions
from retrieval.duplicates.candidates import CandidateOptions, backgrounds
from retrieval.duplicates.edits import EDITS, edited, encoded
from retrieval.duplicates.memory import DuplicatesMemory
from retrieval.duplicates.screen import ScreenOptions, screen_one
from retrieval.duplicates.signatures import signatures_for
from retrieval.duplicates.verify import ImageCache, VerifyOptions, verify_pair
from retrieval.errors import ImageReadError, RetrieveError
from retrieval.images.decode import load_image
from retrieval.images.hashes import best_isometry, hamming
from retrieval.images.signing import signature_of_file

if TYPE_CHECKING:
    from retrieval.search.index import Index

log = logging.getLogger(__name__)

WEIGHT = 1 / len(EDITS)  # the copies of one image count as one


@dataclass(frozen=True)
class CalibrationOptions:
    sample: int = 100
    precision: float = 0.99  # the similar tier's threshold
    skip_nearest: int = 3  # each sample's own nearest few, possibly its real duplicates
    negatives: int = 10  # neighbours per sample after those, verified as "different images"
    seed: int = 0
    candidates: CandidateOptions = field(default_factory=CandidateOptions)
    screen: ScreenOptions = field(default_factory=ScreenOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)


@dataclass
class EditRecall:
    copies: int = 0
    proposed: int = 0  # a signal paired the copy with its original and the screen passed it
    verified: int = 0  # ... and the verifier accepted the pair

    @property
    def recall(self) -> float:
        return self.verified / self.copies if self.copies else 0.0


@dataclass
class Calibration:
    threshold: float  # the similar tier's fc7 distance
    precision: float  # of verified copies, measured as the module docstring says
    recall: float  # of verified copies, over every edit
    positives: np.ndarray  # fc7: copy -> its original, one per sample and edit
    negatives: np.ndarray  # fc7: sample -> other images, beyond its nearest few
    nearest: np.ndarray  # fc7: sample -> its nearest other image (the histogram's third curve)
    sampled: int
    edits: dict[str, np.ndarray] = field(default_factory=dict)  # fc7 gaps per edit
    per_edit: dict[str, EditRecall] = field(default_factory=dict)
    false_copies: int = 0
    negatives_checked: int = 0

    def table(self, rows: int = 9) -> list[tuple[float, float, float]]:
        """(fc7 threshold, precision, recall) at even steps up to twice the similar threshold."""
        top = max(self.threshold * 2, 1e-6)
        return [
            (float(t), *precision_recall(self.positives, self.negatives, float(t), WEIGHT))
            for t in np.linspace(top / rows, top, rows)
        ]


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
    memory = DuplicatesMemory(index.directory)
    try:
        signatures = signatures_for(picked, memory)
    finally:
        memory.close()
    rng = np.random.default_rng(options.seed)
    per_edit = {name: EditRecall() for name in EDITS}
    gaps: dict[str, list[float]] = {name: [] for name in EDITS}
    images = ImageCache()
    k = min(len(rows) - 1, options.candidates.k)
    used = []
    with tempfile.TemporaryDirectory(prefix="retrieve-calibration-") as scratch:
        for n, row in enumerate(picked):
            try:
                image = load_image(row.path, mode="RGB")
            except ImageReadError as exc:
                log.warning("calibration: %s", exc)
                continue
            used.append(row.id)
            copies = []
            for name in EDITS:
                path = os.path.join(scratch, f"{n}-{name}.jpg")
                with open(path, "wb") as handle:
                    handle.write(encoded(edited(image, name, rng)))
                copies.append((name, path))
            features, records = index.embed([p for _, p in copies])
            good = [i for i, r in enumerate(records) if r.ok]
            original = index.vectors([row.id])[0]
            own = index.search_vectors(original[None], k + 1)[0][0]
            own_background = backgrounds(own[own > 0][None])[0] if k else 1.0
            found, ids = index.search_vectors(features, k + 1) if len(good) else (None, None)
            for j, i in enumerate(good):
                name, path = copies[i]
                gap = float(np.linalg.norm(features[j] - original))
                gaps[name].append(gap)
                tally = per_edit[name]
                tally.copies += 1
                background = max(backgrounds(found[j : j + 1, 1:])[0], own_background)
                by_fc7 = row.id in ids[j] and gap <= options.candidates.ratio * background
                copy = signature_of_file(path)
                if not _proposed(by_fc7, signatures.get(row.sha256), copy, options.candidates):
                    continue
                ratio = gap / max(background, 1e-12)
                if not screen_one(signatures.get(row.sha256), copy, ratio, options.screen):
                    continue
                tally.proposed += 1
                verdict = verify_pair(
                    (row.path, signatures.get(row.sha256)),
                    (path, copy),
                    images,
                    options.verify,
                )
                tally.verified += verdict.copy
            for i in set(range(len(copies))) - set(good):
                per_edit[copies[i][0]].copies += 1  # a copy that would not even embed: missed
            if progress:
                progress(n + 1, len(picked))
    if not used:
        raise RetrieveError("calibration could not read any sampled image")
    false_copies, checked, nearest, negatives = _negatives(index, rows, used, options, images)
    edits = {name: np.asarray(v, np.float32) for name, v in gaps.items()}
    all_positives = np.concatenate(list(edits.values()))
    threshold = pick_threshold(all_positives, negatives, options.precision, WEIGHT)
    copies = sum(t.copies for t in per_edit.values())
    verified = sum(t.verified for t in per_edit.values())
    true_copies = verified * WEIGHT
    precision = true_copies / (true_copies + false_copies) if true_copies + false_copies else 1.0
    return Calibration(
        threshold,
        precision,
        verified / copies if copies else 0.0,
        all_positives,
        negatives,
        nearest,
        len(used),
        edits,
        per_edit,
        false_copies,
        checked,
    )


def _proposed(by_fc7: bool, original, copy, options: CandidateOptions) -> bool:
    """Would a signal pair the copy with its original? (fc7 as the caller found it; hashes
    under the 8 isometries; the windows, both ways.)"""
    if by_fc7:
        return True
    if original is None:
        return False
    if best_isometry(original.hashes, copy.hashes)[0] <= options.radius:
        return True
    window = min(
        int(hamming(copy.hashes[0], original.windows).min()),
        int(hamming(original.hashes[0], copy.windows).min()),
    )
    return window <= options.window_bits


def _negatives(index, rows, used, options, images):
    """(false copies, pairs checked, nearest-other fc7 distances, fc7 negatives): each sampled
    image against its neighbours after the nearest few, through the verifier."""
    k = min(len(rows), 1 + options.skip_nearest + options.negatives)
    distances, ids = index.search_vectors(index.vectors(used), k)
    own = np.asarray(used)[:, None]
    distances = np.where(ids == own, np.inf, distances)  # the image itself, wherever it ranks
    order = np.argsort(distances, axis=1, kind="stable")
    distances = np.take_along_axis(distances, order, 1)[:, :-1] if k > 1 else distances
    ids = np.take_along_axis(ids, order, 1)[:, :-1] if k > 1 else ids
    nearest = distances[:, 0]
    skip = min(options.skip_nearest, max(0, distances.shape[1] - 1))
    negatives = distances[:, skip:].ravel()
    by_id = {r.id: r for r in rows}
    memory = DuplicatesMemory(index.directory)
    try:
        others = [by_id[int(i)] for i in ids[:, skip:].ravel() if int(i) in by_id]
        signatures = signatures_for([by_id[i] for i in used] + others, memory)
    finally:
        memory.close()
    false_copies = checked = 0
    for sample, neighbours in zip(used, ids[:, skip:]):
        first = by_id[sample]
        for other in neighbours.tolist():
            second = by_id.get(int(other))
            if second is None or second.sha256 == first.sha256:
                continue
            verdict = verify_pair(
                (first.path, signatures.get(first.sha256)),
                (second.path, signatures.get(second.sha256)),
                images,
                options.verify,
            )
            checked += 1
            false_copies += verdict.copy
    return (
        false_copies,
        checked,
        nearest[np.isfinite(nearest)],
        negatives[np.isfinite(negatives)],
    )
