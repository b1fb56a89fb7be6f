"""Duplicate groups of a collection, in three tiers kept apart.

- **exact**: the same bytes (sha256, stored per row; no file is read).
- **copy**: the same picture up to an edit, each pair *verified* on its pixels
  (:mod:`retrieval.duplicates.verify`) after cheap signals proposed it
  (:mod:`retrieval.duplicates.candidates`) and its signatures showed a sign of a copy
  (:mod:`retrieval.duplicates.screen`); groups are the connected components of verified
  pairs. This is what ``retrieve duplicates`` reports by default.
- **similar**: fc7 within the calibrated near-duplicate distance but not verified: bursts,
  re-shoots, the same subject again. Shown only when asked for.

Each exact group takes part in the other tiers through its representative alone, so a file is in
at most one group of each tier. Pairs the user said are not duplicates are never proposed. A
member under a reference folder leads its group and is never moved or linked.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.collection.near import NearOptions, near_pairs
from retrieval.collection.vectors import IndexVectors
from retrieval.devices import usable_cores
from retrieval.duplicates.candidates import SIGNALS, CandidateOptions, candidate_pairs
from retrieval.duplicates.keep import KEEP, Ranking, under_reference
from retrieval.duplicates.memory import DuplicatesMemory
from retrieval.duplicates.screen import ScreenOptions, screen_pairs
from retrieval.duplicates.signatures import signatures_for
from retrieval.duplicates.verify import (
    UNREADABLE,
    ImageCache,
    Verdict,
    VerifyOptions,
    verify_pair,
)
from retrieval.images.hashes import SIDE, WINDOWS, ImageSignature
from retrieval.units import counted

if TYPE_CHECKING:
    from retrieval.indexes.rows import Row
    from retrieval.search.index import Index

log = logging.getLogger(__name__)

TIERS = ("exact", "copy", "similar")
DEFAULT_KEEP = "best"  # also the CLI's --keep default

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class DuplicateOptions:
    """What ``find_duplicates`` looks for and how it picks each group's representative."""

    keep: str = DEFAULT_KEEP
    references: tuple[str, ...] = ()  # folders whose files always lead and never move
    similar_threshold: float | None = None  # fc7 distance of the similar tier; None: no tier
    candidates: CandidateOptions = field(default_factory=CandidateOptions)
    screen: ScreenOptions = field(default_factory=ScreenOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    near: NearOptions = field(default_factory=NearOptions)  # the similar tier's pass
    # take the verdicts an earlier pass kept (same files, same verifier) instead of opening the
    # pictures again; new verdicts are kept either way
    remember: bool = True

    def __post_init__(self) -> None:
        if self.keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, not {self.keep!r}")


@dataclass
class Member:
    path: str
    id: int
    distance: float  # fc7 distance to the representative
    reference: bool = False
    evidence: dict[str, Any] | None = None  # how this member was verified (copy tier)


@dataclass
class Group:
    """One set of duplicates; ``members[0]`` is the representative (distance 0)."""

    number: int
    kind: str  # one of TIERS
    members: list[Member]

    @property
    def representative(self) -> str:
        return self.members[0].path

    def to_dict(self) -> dict[str, Any]:
        """Exactly what ``retrieve duplicates --json`` prints per line."""
        members = []
        for m in self.members:
            data: dict[str, Any] = {"path": m.path, "id": m.id, "distance": round(m.distance, 4)}
            if m.reference:
                data["reference"] = True
            if m.evidence is not None:
                data["evidence"] = m.evidence
            members.append(data)
        return {
            "group": self.number,
            "kind": self.kind,
            "size": len(self.members),
            "representative": self.representative,
            "members": members,
        }


@dataclass
class DuplicateReport:
    images: int
    groups: list[Group] = field(default_factory=list)
    candidates: int = 0  # pairs the signals proposed
    screened: int = 0  # of those, pairs verified on their pixels (the rest showed no sign)
    remembered: int = 0  # of those, verdicts an earlier pass gave (the pictures not opened)
    verified: int = 0  # pairs the verifier accepted
    decided: int = 0  # candidate pairs left out by the user's decisions
    signals: dict[str, int] = field(default_factory=dict)  # candidates per signal
    similar_threshold: float | None = None

    def of_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def summary(self) -> str:
        parts = []
        for kind, label in (("exact", "exact copies"), ("copy", "verified copies")):
            groups = self.of_kind(kind)
            files = sum(len(g.members) for g in groups)
            parts.append(f"{counted(len(groups), 'group')} of {label} ({counted(files, 'file')})")
        if self.similar_threshold is not None:
            groups = self.of_kind("similar")
            parts.append(
                f"{counted(len(groups), 'group')} of similar images "
                f"({counted(sum(len(g.members) for g in groups), 'file')}, fc7 within "
                f"{self.similar_threshold:.2f}, not verified)"
            )
        spare = sum(len(g.members) - 1 for g in self.groups if g.kind != "similar")
        remembered = (
            f" ({self.remembered} of them remembered from an earlier pass)"
            if self.remembered
            else ""
        )
        return (
            f"{counted(self.images, 'image')}: {'; '.join(parts)}; {counted(spare, 'file')} "
            f"beside their representatives ({counted(self.candidates, 'candidate pair')}, "
            f"{self.screened} compared on their pixels{remembered}, {self.verified} verified)"
        )


def find_duplicates(
    index: Index,
    options: DuplicateOptions = DuplicateOptions(),
    progress: Progress | None = None,
) -> DuplicateReport:
    """Exact, verified-copy and (when asked) similar groups of every indexed image."""
    rows = index.rows(limit=None)
    report = DuplicateReport(images=len(rows))
    memory = DuplicatesMemory(index.directory)
    try:
        _find(index, rows, memory, options, progress, report)
    finally:
        memory.close()
    return report


def _find(
    index: Index,
    rows: Sequence[Row],
    memory: DuplicatesMemory,
    options: DuplicateOptions,
    progress: Progress | None,
    report: DuplicateReport,
) -> None:
    """:func:`find_duplicates`' work, ``memory`` open throughout (signatures, verdicts and
    decisions)."""
    references = tuple(os.path.abspath(r) for r in options.references)
    stage = _stage(progress)
    signatures = signatures_for(rows, memory, stage("signatures"))
    decided = memory.not_duplicates()
    images = ImageCache()
    ranking = Ranking(options.keep, references, signatures, images)
    order = cache(lambda positions: tuple(ranking.order([rows[p] for p in positions])))
    stand_in = _exact_groups(rows, report, ranking, references)
    source = IndexVectors(index, rows)
    hashes, windows, thumbs, has = _signature_arrays(rows, signatures)
    found = candidate_pairs(source, hashes, windows, has, options.candidates, stage("candidates"))
    report.signals = {
        name: int((found.source & bit).astype(bool).sum()) for bit, name in SIGNALS.items()
    }
    verdicts: dict[tuple[int, int], Verdict] = {}
    shown = screen_pairs(
        found.a,
        found.b,
        found.ratio,
        thumbs,
        hashes,
        windows,
        has,
        options.screen,
        stage("screening"),
    )
    pairs, proposed = set(), set()
    for a, b, keep in zip(stand_in[found.a].tolist(), stand_in[found.b].tolist(), shown):
        if a == b:
            continue
        a, b = min(a, b), max(a, b)
        if tuple(sorted((rows[a].sha256, rows[b].sha256))) in decided:
            report.decided += 1
            continue
        proposed.add((a, b))
        if keep:
            pairs.add((a, b))
    pairs = sorted(pairs)
    report.candidates, report.screened = len(proposed), len(pairs)
    tick = stage("verifying")
    verifier = verifier_fingerprint(options.verify)

    def content(pair: tuple[int, int]) -> tuple[str, str]:
        return rows[pair[0]].sha256, rows[pair[1]].sha256

    known: dict[tuple[str, str], Verdict] = {}
    if options.remember:
        asked = [key for a, b in pairs for key in (content((a, b)), content((b, a)))]
        remembered = memory.verdicts(asked, verifier)  # both ways: groups tell some from b
        known = {key: Verdict(**fields) for key, fields in remembered.items()}
    report.remembered = sum(content(pair) in known for pair in pairs)
    fresh: dict[tuple[str, str], Verdict] = {}

    def verify(a: int, b: int) -> Verdict:
        """How ``b`` is a copy of ``a`` (or not): as remembered, else looked at."""
        key = content((a, b))
        verdict = known.get(key)
        if verdict is None:
            verdict = fresh[key] = verify_pair(
                (rows[a].path, signatures.get(rows[a].sha256)),
                (rows[b].path, signatures.get(rows[b].sha256)),
                images,
                options.verify,
            )
        return verdict

    padded: set[int] = set()  # positions verified to be another member plus a margin
    # Decoding, ORB and the matcher release the GIL: one thread per core verifies, a block of
    # pairs at a time (results in the pairs' order, so the groups do not depend on the threads).
    with ThreadPoolExecutor(max(1, usable_cores())) as pool:
        for start in range(0, len(pairs), 1024):
            block = pairs[start : start + 1024]
            for (a, b), verdict in zip(block, pool.map(lambda pair: verify(*pair), block)):
                if verdict.copy:
                    verdicts[(a, b)] = verdict
                    if verdict.padded:  # its extra pixels are a margin, not picture: never leads
                        padded.add(a if verdict.padded == "first" else b)
            if tick:
                tick(start + len(block), len(pairs))
    report.verified = len(verdicts)
    ranking.padded |= {rows[p].id for p in framed_alike(verdicts, padded)}
    copies = _copy_groups(rows, verdicts, order, source, references, verify)
    seen = {key: asdict(v) for key, v in fresh.items() if UNREADABLE not in v.edits}
    if seen:  # (a file that could not be opened may be readable next time)
        memory.keep_verdicts(seen, verifier)
    for members in copies:
        report.groups.append(Group(len(report.groups) + 1, "copy", members))
    if options.similar_threshold is not None:
        report.similar_threshold = float(options.similar_threshold)
        grouped = {m.id for g in report.groups for m in g.members}
        _similar_groups(
            rows,
            source,
            stand_in,
            grouped,
            decided,
            order,
            options,
            report,
            stage("similar"),
            references,
        )


def framed_alike(verdicts: dict[tuple[int, int], Verdict], padded: set[int]) -> set[int]:
    """``padded`` (positions verified to be another member plus a margin) and every position
    joined to one of them by a "same framing" verdict, transitively: a mirrored or re-encoded
    copy of a bordered picture has the border too, though it may have met the picture without
    the border only through its bordered twin."""
    alike: dict[int, set[int]] = defaultdict(set)
    for (a, b), verdict in verdicts.items():
        if verdict.test == "same framing":
            alike[a].add(b)
            alike[b].add(a)
    found, stack = set(padded), list(padded)
    while stack:
        for other in alike[stack.pop()] - found:
            found.add(other)
            stack.append(other)
    return found


def verifier_fingerprint(options: VerifyOptions) -> str:
    """Which verifier gave a verdict: the code a verdict depends on (the verifier, the hashes,
    the signing, the decoder), the libraries under it and its bars. A remembered verdict is used
    only under the same fingerprint, so changing any of them verifies again."""
    import cv2
    import PIL

    from retrieval.duplicates import verify
    from retrieval.images import decode, hashes, signing
    from retrieval.version import __version__

    digest = hashlib.sha256(repr(options).encode())
    for module in (verify, hashes, signing, decode):
        try:
            digest.update(Path(module.__file__).read_bytes())
        except (OSError, TypeError):  # no source beside the bytecode: the release stands in
            digest.update(f"{module.__name__} {__version__}".encode())
    digest.update(f"opencv {cv2.__version__} pillow {PIL.__version__}".encode())
    return digest.hexdigest()[:16]


def _stage(progress: Progress | None) -> Callable[[str], Callable[[int, int], None] | None]:
    def named(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(name, done, total)

    return named


def _signature_arrays(
    rows: Sequence[Row], signatures: dict[str, ImageSignature]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hashes N x 8, windows N x WINDOWS, thumbnails N x SIDE x SIDE, has N) by position."""
    hashes = np.zeros((len(rows), 8), np.uint64)
    windows = np.zeros((len(rows), WINDOWS), np.uint64)
    thumbs = np.zeros((len(rows), SIDE, SIDE), np.uint8)
    has = np.zeros(len(rows), bool)
    for position, row in enumerate(rows):
        found = signatures.get(row.sha256)
        if found is not None:
            hashes[position], windows[position] = found.hashes, found.windows
            thumbs[position], has[position] = found.thumb, True
    return hashes, windows, thumbs, has


def _exact_groups(
    rows: Sequence[Row], report: DuplicateReport, ranking: Ranking, references: tuple[str, ...]
) -> np.ndarray:
    """Adds the exact groups to ``report``; returns each position's stand-in (its exact group's
    representative, else itself)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        by_hash[row.sha256].append(position)
    stand_in = np.arange(len(rows))
    found = []
    for positions in by_hash.values():
        if len(positions) < 2:
            continue
        ordered = ranking.order([rows[p] for p in positions])
        by_id = {rows[p].id: p for p in positions}
        lead = by_id[ordered[0].id]
        stand_in[positions] = lead
        found.append([by_id[r.id] for r in ordered])
    found.sort(key=lambda positions: rows[positions[0]].path)
    for positions in found:
        members = [
            Member(rows[p].path, rows[p].id, 0.0, under_reference(rows[p].path, references))
            for p in positions
        ]
        report.groups.append(Group(len(report.groups) + 1, "exact", members))
    return stand_in


def _copy_groups(
    rows: Sequence[Row],
    verdicts: dict[tuple[int, int], Verdict],
    order: Callable[[tuple[int, ...]], tuple[Row, ...]],
    source: IndexVectors,
    references: tuple[str, ...],
    verify: Callable[[int, int], Verdict],
) -> list[list[Member]]:
    """Connected components of verified pairs; each member's evidence is the verified pair
    that joined it, walking out from the representative (breadth first), told from the side
    already in the group (verified again that way round when the pair was the other)."""
    edges: dict[int, dict[int, Verdict]] = defaultdict(dict)
    for (a, b), verdict in verdicts.items():
        edges[a][b] = verdict
        edges[b][a] = verdict
    seen: set[int] = set()
    groups = []
    for start in sorted(edges):
        if start in seen:
            continue
        component, stack = {start}, [start]
        while stack:
            for other in edges[stack.pop()]:
                if other not in component:
                    component.add(other)
                    stack.append(other)
        seen |= component
        positions = tuple(sorted(component))
        best = order(positions)[0]
        lead = next(p for p in positions if rows[p].id == best.id)
        joined: dict[int, tuple[int, Verdict]] = {}
        frontier = [lead]
        while frontier:
            following = []
            for p in frontier:
                for other, verdict in sorted(edges[p].items()):
                    if other != lead and other not in joined:
                        joined[other] = (p, verdict)
                        following.append(other)
            frontier = following
        others = sorted(joined, key=lambda p: rows[p].path)
        distances = _distances_to(source, lead, others)
        members = [
            Member(
                rows[lead].path, rows[lead].id, 0.0, under_reference(rows[lead].path, references)
            )
        ]
        for p, distance in zip(others, distances):
            via, verdict = joined[p]
            if p < via:  # the verdict says how ``via`` is a copy of ``p``: ask the other way
                again = verify(via, p)
                verdict = again if again.copy else verdict
            evidence = verdict.evidence()
            if via != lead:
                evidence["via"] = rows[via].path
            members.append(
                Member(
                    rows[p].path,
                    rows[p].id,
                    float(distance),
                    under_reference(rows[p].path, references),
                    evidence,
                )
            )
        members[1:] = sorted(members[1:], key=lambda m: (m.distance, m.path))
        groups.append(members)
    groups.sort(key=lambda members: members[0].path)
    return groups


def _similar_groups(
    rows, source, stand_in, grouped, decided, order, options, report, tick, references
) -> None:
    """Components of fc7 pairs within the similar threshold, among images in no other group;
    each member within the threshold of its representative (a chain is not a group)."""
    pairs = near_pairs(source, options.similar_threshold, options.near, tick)
    ids = np.asarray([r.id for r in rows])
    edges: dict[int, set[int]] = defaultdict(set)
    for a, b in zip(stand_in[pairs.a].tolist(), stand_in[pairs.b].tolist()):
        if a == b or ids[a] in grouped or ids[b] in grouped:
            continue
        if tuple(sorted((rows[a].sha256, rows[b].sha256))) in decided:
            continue
        edges[a].add(b)
        edges[b].add(a)
    pending = _components(edges, set(edges))
    while pending:
        positions = pending.pop(0)
        best = order(tuple(positions))[0]
        lead = next(p for p in positions if rows[p].id == best.id)
        others = sorted((p for p in positions if p != lead), key=lambda p: rows[p].path)
        distances = _distances_to(source, lead, others)
        inside = [
            (p, float(d)) for p, d in zip(others, distances) if d <= options.similar_threshold
        ]
        outside = {p for p, d in zip(others, distances) if d > options.similar_threshold}
        pending += _components(edges, outside)
        if not inside:
            continue
        members = [
            Member(
                rows[lead].path, rows[lead].id, 0.0, under_reference(rows[lead].path, references)
            )
        ]
        members += sorted(
            (
                Member(rows[p].path, rows[p].id, d, under_reference(rows[p].path, references))
                for p, d in inside
            ),
            key=lambda m: (m.distance, m.path),
        )
        report.groups.append(Group(len(report.groups) + 1, "similar", members))


def _components(edges: dict[int, set[int]], positions: set[int]) -> list[list[int]]:
    """Connected components (2 or more) of the pair graph restricted to ``positions``."""
    left, found = set(positions), []
    while left:
        start = left.pop()
        part, stack = [start], [start]
        while stack:
            for other in edges[stack.pop()] & left:
                left.discard(other)
                part.append(other)
                stack.append(other)
        if len(part) > 1:
            found.append(sorted(part))
    return sorted(found)


def _distances_to(source: IndexVectors, lead: int, others: list[int]) -> np.ndarray:
    if not others:
        return np.zeros(0, np.float32)
    vectors = source.take(np.asarray([lead, *others]))
    return np.linalg.norm(vectors[1:] - vectors[0], axis=1)
