"""Duplicate groups of a collection, in two tiers kept apart.

**exact**: files with the same sha256 (stored per row; no file is read). **near**: fc7 within a
threshold (:mod:`retrieval.collection.near`), grouped by connected components, each exact group
taking part through its representative only, so one file is in at most one group of each tier.
Every group has a representative chosen by ``keep``; members carry their distance to it.

A component can chain (a ~ b ~ c with a and c far apart: a burst of shots, a slow pan), so each
is split until every member is within the threshold of its representative: the members too far
from it form their own components again. On the Imagenette bench this raised the precision of
the pairs inside groups from 0.61 towards the 0.84 of the direct pairs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.collection.near import NearOptions, Pairs, near_pairs
from retrieval.collection.vectors import IndexVectors

if TYPE_CHECKING:
    from retrieval.indexes.rows import Row
    from retrieval.search.index import Index

KEEP = ("largest", "oldest", "first")
DEFAULT_KEEP = "largest"  # also the CLI's --keep default


@dataclass
class Member:
    path: str
    id: int
    distance: float


@dataclass
class Group:
    """One set of duplicates; ``members[0]`` is the representative (distance 0)."""

    number: int
    kind: str  # "exact" | "near"
    members: list[Member]

    @property
    def representative(self) -> str:
        return self.members[0].path

    def to_dict(self) -> dict[str, Any]:
        """Exactly what ``retrieve duplicates --json`` prints per line."""
        return {
            "group": self.number,
            "kind": self.kind,
            "size": len(self.members),
            "representative": self.representative,
            "members": [
                {"path": m.path, "id": m.id, "distance": round(m.distance, 4)} for m in self.members
            ],
        }


@dataclass
class DuplicateReport:
    threshold: float
    images: int
    groups: list[Group] = field(default_factory=list)
    method: str = "exact"
    candidates: int = 0

    def of_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def summary(self) -> str:
        exact, near = self.of_kind("exact"), self.of_kind("near")
        spare = sum(len(g.members) - 1 for g in self.groups)
        return (
            f"{self.images} images: {len(exact)} groups of exact copies "
            f"({sum(len(g.members) for g in exact)} files), {len(near)} groups of near duplicates "
            f"({sum(len(g.members) for g in near)} files) within fc7 distance "
            f"{self.threshold:.2f}; {spare} files beside their representatives"
        )


def representative_order(
    rows: Sequence[Row], keep: str, pixel_count: Callable[[str], int] | None = None
) -> list[Row]:
    """Rows best first by ``keep``: largest (most pixels, then most bytes: a half-size copy
    re-encoded at high quality can outweigh its original in bytes), oldest mtime, or first
    path; ties by path. ``pixel_count`` (default :func:`pixels`) can be a cached one."""
    if keep == "largest":
        count = pixel_count or pixels
        return sorted(rows, key=lambda r: (-count(r.path), -r.size, r.path))
    if keep == "oldest":
        return sorted(rows, key=lambda r: (r.mtime_ns, r.path))
    if keep == "first":
        return sorted(rows, key=lambda r: r.path)
    raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")


def pixels(path: str) -> int:
    """Width x height from the file's header (0 when it cannot be read any more)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # any unreadable file simply ranks last
        return 0
    return width * height


def find_duplicates(
    index: Index,
    threshold: float,
    *,
    keep: str = DEFAULT_KEEP,
    near: NearOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DuplicateReport:
    """Exact and near duplicate groups of every indexed image (exact groups first)."""
    near = near or NearOptions()
    # A chain of near pairs is split again and again, each time ranking its members: read each
    # file's header once, not once per split.
    order = partial(representative_order, keep=keep, pixel_count=cache(pixels))
    rows = index.rows(limit=None)
    source = IndexVectors(index, rows)
    report = DuplicateReport(threshold=float(threshold), images=len(rows))
    by_hash: dict[str, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        by_hash[row.sha256].append(position)
    # Each exact group enters the near pass as its representative alone.
    stand_in = np.arange(len(rows))
    exact_sets = []
    for positions in by_hash.values():
        if len(positions) > 1:
            ordered = order([rows[p] for p in positions])
            best = ordered[0].id
            lead = next(p for p in positions if rows[p].id == best)
            stand_in[positions] = lead
            exact_sets.append([lead] + [p for p in positions if p != lead])
    exact_sets.sort(key=lambda s: rows[s[0]].path)
    for positions in exact_sets:
        members = [Member(rows[p].path, rows[p].id, 0.0) for p in positions]
        report.groups.append(Group(len(report.groups) + 1, "exact", members))
    pairs = near_pairs(source, threshold, near, progress)
    report.method, report.candidates = pairs.method, pairs.candidates
    edges = _adjacency(pairs, stand_in)
    pending = components(pairs, stand_in)
    while pending:
        positions = pending.pop(0)
        best = order([rows[p] for p in positions])[0]
        lead = next(p for p in positions if rows[p].id == best.id)
        others = sorted((p for p in positions if p != lead), key=lambda p: rows[p].path)
        distances = _distances_to(source, lead, others)
        inside = [(p, float(d)) for p, d in zip(others, distances) if d <= threshold]
        outside = {p for p, d in zip(others, distances) if d > threshold}
        pending += _split(outside, edges)
        if not inside:
            continue
        members = [Member(best.path, best.id, 0.0)] + [
            Member(rows[p].path, rows[p].id, d) for p, d in inside
        ]
        members[1:] = sorted(members[1:], key=lambda m: (m.distance, m.path))
        report.groups.append(Group(len(report.groups) + 1, "near", members))
    return report


def _adjacency(pairs: Pairs, stand_in: np.ndarray) -> dict[int, set[int]]:
    edges: dict[int, set[int]] = defaultdict(set)
    for a, b in zip(stand_in[pairs.a].tolist(), stand_in[pairs.b].tolist()):
        if a != b:
            edges[a].add(b)
            edges[b].add(a)
    return edges


def _split(positions: set[int], edges: dict[int, set[int]]) -> list[list[int]]:
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


def components(pairs: Pairs, stand_in: np.ndarray) -> list[list[int]]:
    """Connected components (2 or more positions) of the pair graph, after mapping each
    position to its stand-in; components in order of their smallest position."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(stand_in[pairs.a].tolist(), stand_in[pairs.b].tolist()):
        if a != b:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = defaultdict(list)
    for x in parent:
        groups[root(x)].append(x)
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) > 1]


def _distances_to(source: IndexVectors, lead: int, others: list[int]) -> np.ndarray:
    if not others:
        return np.zeros(0, np.float32)
    vectors = source.take(np.asarray([lead, *others]))
    return np.linalg.norm(vectors[1:] - vectors[0], axis=1)
