"""How far a bf16 index's neighbours move when a query is embedded in fp32 instead.

A bf16 index is made where bf16 is native (a GPU, a CPU with AVX-512 BF16 / AMX) and may be
queried where it is not, where bf16 is emulated and ~6x slower than fp32. Embedding the query in
fp32 there is allowed only when the index says the two agree: after a bf16 build, a sample of its
images is decoded once and embedded in bf16 (on the CPU the bits the index stored: vectors do
not depend on their batch; on a GPU, whose nvjpeg decoded the index's JPEGs, within its
rounding) and in fp32, and each one's top-6 neighbours by the two are compared through the
index's own search, so it works for every kind (IVF, PQ, HNSW, reduced), none of which need
give back a stored vector. The overlap goes in the manifest (``fp32_agreement``), ``retrieve
info`` shows it, and a query falls back to fp32 only at or above
``model.recorded.REQUIRED_OVERLAP``.

The index is committed before this runs: a failure here is logged, never raised.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.devices import usable_cores
from retrieval.errors import RetrieveError
from retrieval.indexes import generation, store
from retrieval.indexes.searcher import Searcher

if TYPE_CHECKING:
    from retrieval.extraction.embedder import Embedder
    from retrieval.indexes.rows import Row

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
        kept, stored, fp32 = _embedded_both_ways(sample, embedder)
        if not kept:
            return {}
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


def _embedded_both_ways(
    sample: list[Row], embedder: Embedder
) -> tuple[list[Row], np.ndarray, np.ndarray]:
    """The sample's rows that still decode, and their fc7 in bf16 and in fp32. Each file is
    read and decoded once for both (a camera photo's decode costs more than its two forward
    passes), on every core (Pillow releases the GIL); only the crops are kept."""
    import torch

    from retrieval.extraction.reader import crop_file

    preprocessing = embedder.mapper.preprocessing
    max_megapixels = embedder.options.max_megapixels

    def crop(row: Row) -> torch.Tensor | None:
        return crop_file(0, row.path, preprocessing, max_megapixels)[1]

    with ThreadPoolExecutor(usable_cores()) as pool:
        crops = list(pool.map(crop, sample))
    kept = [row for row, pixels in zip(sample, crops) if pixels is not None]
    if not kept:
        return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    batch = torch.stack([pixels for pixels in crops if pixels is not None])
    stored = embedder.at_precision("bf16").crops(batch)
    return kept, stored, embedder.at_precision("fp32").crops(batch)
