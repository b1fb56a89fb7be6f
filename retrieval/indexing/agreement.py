"""How far a bf16 index's neighbours move when a query is embedded in fp32 instead.

A bf16 index is made where bf16 is native (a GPU, a CPU with AVX-512 BF16 / AMX) and may be
queried where it is not, where bf16 is emulated and ~6x slower than fp32. Embedding the query in
fp32 there is allowed only when the index says the two agree: after a bf16 build, a sample of its
images is embedded again in fp32 and each one's top-6 neighbours are compared with those of its
stored bf16 vector. The measured overlap goes in the manifest (``fp32_agreement``), ``retrieve
info`` shows it, and a query falls back to fp32 only at or above ``REQUIRED_OVERLAP``.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.indexes import generation, store
from retrieval.indexes.searcher import Searcher

if TYPE_CHECKING:
    from retrieval.extraction.types import ExtractOptions
    from retrieval.model.weights import LoadedModel

SAMPLE = 64
K = 6
REQUIRED_OVERLAP = 0.99


def measure_fp32_agreement(
    index_dir: Path, model: LoadedModel, extract: ExtractOptions, seed: int = 0
) -> dict[str, Any]:
    """Top-6 overlap between stored bf16 vectors and fp32 re-embeddings of a seeded sample,
    written into the manifest; returns what was written."""
    from retrieval.extraction import extract_images

    snapshot = store.open_snapshot(index_dir)
    try:
        rows = list(snapshot.iter_rows(status="indexed"))
        sample = random.Random(seed).sample(rows, min(SAMPLE, len(rows)))
        k = min(K + 1, snapshot.count)
        searcher = Searcher(snapshot, "cpu")
        fp32, records = extract_images(
            [Path(r.path) for r in sample], model, dataclasses.replace(extract, precision="fp32")
        )
        kept = [row for row, record in zip(sample, records) if record.ok]
        if not kept:
            return {}
        stored = searcher.reconstruct(np.array([r.id for r in kept]))
        _, by_stored = searcher.search(stored, k)
        _, by_fp32 = searcher.search(fp32, k)
    finally:
        snapshot.close()
    overlaps = []
    for row, a, b in zip(kept, by_stored, by_fp32):
        a, b = a[(a >= 0) & (a != row.id)][:K], b[(b >= 0) & (b != row.id)][:K]
        overlaps.append(len(set(a) & set(b)) / max(1, len(a)))
    agreement = {
        "top6_overlap": round(float(np.mean(overlaps)), 4),
        "queries": len(kept),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    generation.annotate_manifest(index_dir, {"fp32_agreement": agreement})
    return agreement


def fp32_allowed(manifest: dict[str, Any]) -> bool:
    """Whether a bf16 index's own measurement allows fp32 queries."""
    measured = manifest.get("fp32_agreement") or {}
    return float(measured.get("top6_overlap", 0.0)) >= REQUIRED_OVERLAP
