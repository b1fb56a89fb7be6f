"""The duplicates and clusters views of ``retrieve serve``: the whole collection, read-only.

``GET /api/duplicates`` answers with the groups ``retrieve duplicates --json`` prints (verified
copies; ``similar=1`` adds the similar tier), ``POST /api/not-duplicate`` remembers the user's
"these two are not duplicates" as ``retrieve duplicates --not-duplicate`` does, and
``GET /api/clusters`` with the seeded k-means of ``retrieve cluster``. Both are whole-collection
passes (the calibration alone embeds 1,200 edited copies: a minute on 2 cores), so each result
is computed in a worker thread, at most once at a time per question (a second request for the
same one waits for the first), one heavy pass at a time in all, and kept for the generation it
was computed on: a new generation from ``retrieve index`` makes the next request compute again.
Nothing here moves or links a file; the CLI's ``--action`` has no counterpart over HTTP. A
decision is written beside the index (``duplicates.sqlite``), never to the user's files.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
from anyio import to_thread

from retrieval.collection.clusters import ClusterReport, cluster_index, default_cluster_count
from retrieval.collection.near import NearOptions, TooManyPairs
from retrieval.duplicates.calibration import Calibration, CalibrationOptions, calibrate
from retrieval.duplicates.groups import (
    DEFAULT_KEEP,
    DuplicateOptions,
    DuplicateReport,
    find_duplicates,
)
from retrieval.duplicates.keep import KEEP
from retrieval.duplicates.memory import DuplicatesMemory
from retrieval.errors import RetrieveError
from retrieval.serve.params import Refused, int_param

if TYPE_CHECKING:
    from retrieval.search.index import Index

MAX_K = 1000  # clusters
MAX_GROUPS_PAGE = 500
MAX_SHOWN = 100  # members per cluster, outliers
KEPT = 16  # results kept per generation (thresholds, Ks)
# The near pass in small blocks, stopped past this many pairs per image: a threshold so large it
# pairs everything is refused (422) instead of filling memory.
BLOCK = 1024
PAIRS_PER_IMAGE = 50
MIN_PAIRS = 10_000


class Results:
    """Results by key, each computed once in a worker thread; concurrent askers share one run.

    Keys start with the index generation; results of older generations are dropped."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self.done: OrderedDict[Hashable, Any] = OrderedDict()
        self.running: dict[Hashable, asyncio.Future] = {}

    async def get(self, key: tuple, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(the result, whether it was already there)."""
        for old in [k for k in self.done if k[0] != key[0]]:
            del self.done[old]
        if key in self.done:
            self.done.move_to_end(key)
            return self.done[key], True
        task = self.running.get(key)
        if task is None:
            task = asyncio.ensure_future(to_thread.run_sync(compute))
            self.running[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        # shield: a client that goes away does not cancel the run the others wait for
        return await asyncio.shield(task), False

    def _finished(self, key: Hashable, task: asyncio.Future) -> None:
        self.running.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return  # not kept: the next request tries again
        self.done[key] = task.result()
        while len(self.done) > self.kept:
            self.done.popitem(last=False)


class CollectionViews:
    """The two endpoints over one open :class:`Index` (which the caller owns)."""

    def __init__(self, index: Index, calibration: CalibrationOptions | None = None) -> None:
        self.index = index
        self.calibration = calibration or CalibrationOptions()  # as `retrieve duplicates`
        self.results = Results()
        self.decisions = 0  # decisions recorded by this server: part of the results' key
        self._heavy = threading.Lock()  # one whole-collection pass at a time

    def _run(self, work: Callable[[], Any]) -> Callable[[], tuple[int, Any]]:
        """``work`` under the heavy lock, again if a new generation arrived meanwhile (its rows
        and vectors must come from one generation); returns (generation, result)."""

        def run() -> tuple[int, Any]:
            with self._heavy:
                for _ in range(3):
                    generation = self.index.generation
                    try:
                        result = work()
                    except KeyError:  # a row the newer generation removed
                        if self.index.generation == generation:
                            raise
                        continue
                    if self.index.generation == generation:
                        break
                return generation, result

        return run

    # -- duplicates ----------------------------------------------------------------------------

    async def duplicates(self, params: Any) -> dict[str, Any]:
        started = time.perf_counter()
        threshold = _threshold(params.get("threshold"))
        # A threshold is the similar tier's distance: giving one asks for that tier.
        similar = params.get("similar", "") in ("1", "true", "yes") or threshold is not None
        offset = int_param(params.get("offset"), "offset", 0, 0, None)
        limit = int_param(params.get("limit"), "limit", 50, 1, MAX_GROUPS_PAGE)
        keep = _keep(params.get("keep"))
        generation = self.index.generation
        calibration: Calibration | None = None
        cached = True
        if similar and threshold is None:
            (_, calibration), cached = await self.results.get(
                (generation, "calibration"), self._run(self._calibrate)
            )
            threshold = calibration.threshold
        if not similar:
            threshold = None
        (generation, report), found = await self.results.get(
            (generation, "duplicates", self.decisions, threshold, keep),
            self._run(lambda: self._find(threshold, keep)),
        )
        return _duplicates_json(
            report, calibration, generation, offset, limit, keep, cached and found, started
        )

    def _calibrate(self) -> Calibration:
        try:
            return calibrate(self.index, self.calibration)
        except RetrieveError as error:
            message = str(error).replace("give --threshold", "give ?threshold=D")
            raise Refused(422, message) from None

    def _find(self, threshold: float | None, keep: str) -> DuplicateReport:
        count = self.index.count
        near = NearOptions(block=BLOCK, max_pairs=max(MIN_PAIRS, PAIRS_PER_IMAGE * count))
        options = DuplicateOptions(keep=keep, similar_threshold=threshold, near=near)
        try:
            return find_duplicates(self.index, options)
        except TooManyPairs as error:
            raise Refused(422, str(error)) from None

    async def not_duplicate(self, first: int, second: int) -> dict[str, Any]:
        """Remember that rows ``first`` and ``second`` are not duplicates (by content)."""
        found = {r.id: r for r in self.index.rows([first, second])}
        if first not in found or second not in found:
            raise Refused(404, "no such image in the index")
        a, b = found[first], found[second]
        memory = DuplicatesMemory(self.index.directory)
        try:
            if memory.in_memory:
                raise Refused(503, "the index directory cannot be written: nothing remembered")
            if not memory.record_not_duplicate((a.sha256, a.path), (b.sha256, b.path)):
                raise Refused(422, "those two files have the same bytes: they are exact copies")
        finally:
            memory.close()
        self.decisions += 1  # the next /api/duplicates computes again, without this pair
        return {"remembered": [a.path, b.path]}

    # -- clusters ------------------------------------------------------------------------------

    async def clusters(self, params: Any) -> dict[str, Any]:
        started = time.perf_counter()
        count = self.index.count
        top = max(1, min(count, MAX_K))
        k = int_param(params.get("n"), "n", default_cluster_count(count), 1, top)
        per = int_param(params.get("per"), "per", 8, 1, MAX_SHOWN)
        outliers = int_param(params.get("outliers"), "outliers", 8, 0, MAX_SHOWN)
        generation = self.index.generation
        (generation, report), cached = await self.results.get(
            (generation, "clusters", k), self._run(lambda: self._cluster(k))
        )
        return _clusters_json(report, k, generation, per, outliers, cached, started)

    def _cluster(self, k: int) -> ClusterReport:
        try:
            return cluster_index(self.index, k)
        except RetrieveError as error:  # fewer images than asked (a generation removed some)
            raise Refused(422, str(error).replace("-n", "n")) from None


def _threshold(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise Refused(422, f"threshold must be a number, not {text[:40]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise Refused(422, f"threshold must be a distance of 0 or more, not {text[:40]}")
    return value


def _keep(text: str | None) -> str:
    """Which member leads a group, as ``retrieve duplicates --keep``."""
    if text is None or text == "":
        return DEFAULT_KEEP
    if text not in KEEP:
        raise Refused(422, f"keep must be one of {', '.join(KEEP)}, not {text[:40]!r}")
    return text


def links(row_id: int) -> dict[str, str]:
    return {"thumb_url": f"/thumb/{row_id}", "image_url": f"/image/{row_id}"}


def _duplicates_json(
    report: DuplicateReport,
    calibration: Calibration | None,
    generation: int,
    offset: int,
    limit: int,
    keep: str,
    cached: bool,
    started: float,
) -> dict[str, Any]:
    groups = []
    for group in report.groups[offset : offset + limit]:
        data = group.to_dict()  # exactly a line of `retrieve duplicates --json`
        for member in data["members"]:
            member.update(links(member["id"]))
        groups.append(data)
    return {
        "generation": generation,
        "images": report.images,
        "threshold": report.similar_threshold,
        "calibrated": calibration is not None,
        "calibration": None
        if calibration is None
        else {
            "precision": calibration.precision,
            "recall": calibration.recall,
            "sampled": calibration.sampled,
        },
        "candidates": report.candidates,
        "screened": report.screened,
        "remembered": report.remembered,
        "verified": report.verified,
        "keep": keep,
        "summary": report.summary(),
        "total": len(report.groups),
        "exact_groups": len(report.of_kind("exact")),
        "copy_groups": len(report.of_kind("copy")),
        "similar_groups": len(report.of_kind("similar")),
        "offset": offset,
        "limit": limit,
        "groups": groups,
        "cached": cached,
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def _member(row, distance: float, cluster: int | None = None) -> dict[str, Any]:
    data = {"id": row.id, "path": row.path, "label": row.label, "distance": round(distance, 4)}
    if cluster is not None:
        data["cluster"] = cluster
    return {**data, **links(row.id)}


def _clusters_json(
    report: ClusterReport,
    k: int,
    generation: int,
    per: int,
    outliers: int,
    cached: bool,
    started: float,
) -> dict[str, Any]:
    clustering, rows = report.clustering, report.rows
    clusters = []
    for c in range(len(clustering.centroids)):
        members = np.flatnonzero(clustering.assignment == c)
        ordered = members[np.argsort(clustering.distance[members], kind="stable")]
        labels: dict[str, int] = {}
        for p in members:
            labels[rows[p].label] = labels.get(rows[p].label, 0) + 1
        common = dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
        clusters.append(
            {
                "cluster": c,
                "size": len(members),
                "labels": common,
                "members": [_member(rows[p], float(clustering.distance[p])) for p in ordered[:per]],
            }
        )
    far = clustering.outliers(outliers) if outliers else []
    return {
        "generation": generation,
        "images": len(rows),
        "k": k,
        "seed": 0,
        "space": f"PCA-{clustering.reduced_to}" if clustering.reduced_to else "fc7",
        "scores": report.scores,
        "clusters": clusters,
        "outliers": [
            _member(rows[p], float(clustering.distance[p]), int(clustering.assignment[p]))
            for p in far
        ],
        "cached": cached,
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
    }
