"""How far a bf16 index's neighbours move when a query is embedded in fp32 instead.

A bf16 index is made where bf16 is native (a GPU, a CPU with AVX-512 BF16 / AMX) and may be
queried where it is not, where bf16 is emulated and ~6x slower than fp32. Embedding the query in
fp32 there is allowed only when the index says the two agree: after a bf16 build, a sample of its
images is embedded in bf16 (the bits the index stored: vectors do not depend on their batch) and
in fp32, and each one's top-6 neighbours by the two are compared through the index's own search,
so it works for every kind (IVF, PQ, HNSW, reduced), none of which need give back a stored
vector. The overlap goes in the manifest (``fp32_agreement``), ``retrieve info`` shows it, and a
query falls back to fp32 only at or above ``model.recorded.REQUIRED_OVERLAP``.

The index is committed before this runs: a failure here is logged, never raised.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.indexes import generation, store
from retrieval.indexes.searcher import Searcher

if TYPE_CHECKING:
    from retrieval.extraction.embedder import Embedder

log = logging.getLogger(__name__)

SAMPLE = 64
K = 6


def measure_fp32_agreement(index_dir: Path, embedder: Embedder, seed: int = 0) -> dict[str, Any]:
    """Top-6 overlap between the bf16 and fp32 embeddings of a seeded sample, written into the
    manifest; returns what was written ({} when nothing could be measured)."""
    try:
        agreement = _measure(index_dir, embedder, seed)
    except (RetrieveError, RuntimeError, OSError, KeyError) as exc:
        log.warning("the fp32 agreement check failed (%s); queries stay in bf16", exc)
        return {}
    if agreement:
        generation.annotate_manifest(index_dir, {"fp32_agreement": agreement})
    return agreement


def _measure(index_dir: Path, embedder: Embedder, seed: int) -> dict[str, Any]:
    snapshot = store.open_snapshot(index_dir)
    try:
        rows = list(snapshot.iter_rows(status="indexed"))
        sample = random.Random(seed).sample(rows, min(SAMPLE, len(rows)))
        paths = [Path(r.path) for r in sample]
        stored, stored_records = embedder.at_precision("bf16").all_files(paths)
        fp32, fp32_records = embedder.at_precision("fp32").all_files(paths)
        both = [a.ok and b.ok for a, b in zip(stored_records, fp32_records)]
        kept = [row for row, ok in zip(sample, both) if ok]
        if not kept:
            return {}
        stored = stored[_kept_positions(stored_records, both)]
        fp32 = fp32[_kept_positions(fp32_records, both)]
        searcher = Searcher(snapshot, "cpu")
        k = min(K + 1, snapshot.count)
        _, by_stored = searcher.search(stored, k)
        _, by_fp32 = searcher.search(fp32, k)
    finally:
        snapshot.close()
    overlaps = []
    for row, a, b in zip(kept, by_stored, by_fp32):
        a, b = a[(a >= 0) & (a != row.id)][:K], b[(b >= 0) & (b != row.id)][:K]
        overlaps.append(len(set(a) & set(b)) / max(1, len(a)))
    return {
        "top6_overlap": round(float(np.mean(overlaps)), 4),
        "queries": len(kept),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _kept_positions(records: list[Any], both: list[bool]) -> list[int]:
    """Rows of one embedding's features (good records only) for the files both embedded."""
    positions, row = [], 0
    for record, keep in zip(records, both):
        if record.ok:
            if keep:
                positions.append(row)
            row += 1
    return positions
