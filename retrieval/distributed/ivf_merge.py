"""An IVF index from fc7 shards, built shard by shard in parallel and merged on disk.

At a scale where the vectors do not fit in one process's memory (a billion fc7 rows are 16 TB),
an IVF index is trained once on a sample, each shard's vectors are added to a copy of the
trained empty index in its own task (a Ray task when a cluster is connected, else one after
another here), and the per-shard inverted lists are merged into one ``.ivfdata`` file with
faiss's ``contrib.ondisk.merge_ondisk``; the result is read with ``IO_FLAG_ONDISK_SAME_DIR``,
so its lists stay on disk and are paged in as queries visit them. Ids are the shards' ``id``
column, so neighbours join back to the metadata rows. Answers equal those of the same trained
index filled in memory (``tests/test_distributed.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.indexes.shards import open_shards, read_shard

log = logging.getLogger(__name__)

TRAINED = "trained.index"
MERGED_INDEX = "populated.index"
MERGED_DATA = "merged.ivfdata"


@dataclass(frozen=True)
class MergeReport:
    index_path: Path
    rows: int
    shards: int


def train_ivf(shard_folder: Path, factory: str, train_rows: int, seed: int = 0) -> Any:
    """The empty trained index: ``factory`` (an IVF kind) trained on a sample of the shards."""
    import faiss

    shards = open_shards(shard_folder)
    counts = [len(shard.vectors) for shard in shards]
    total = sum(counts)
    if total == 0:
        raise RetrieveError(f"{shard_folder} holds no vectors to train on")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, min(train_rows, total), replace=False))
    sample, offset = [], 0
    for shard, count in zip(shards, counts):
        inside = picked[(picked >= offset) & (picked < offset + count)] - offset
        if len(inside):
            sample.append(np.asarray(shard.vectors[inside], dtype=np.float32))
        offset += count
    index = faiss.index_factory(shards.dim, factory, faiss.METRIC_L2)
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        raise RetrieveError(f"{factory}: not an IVF kind; only IVF indexes merge on disk") from None
    index.train(np.concatenate(sample))
    return index


def fill_block(shard_folder: str, number: int, dim: int, trained_path: str, block_path: str) -> int:
    """One shard's vectors, under their ids, into a copy of the trained index on disk."""
    import faiss

    shard = read_shard(Path(shard_folder), number, dim)
    index = faiss.read_index(trained_path)
    ids = np.asarray(shard.metadata.column("id").to_numpy(), dtype=np.int64)
    vectors = np.ascontiguousarray(shard.vectors, dtype=np.float32)
    if len(ids):
        index.add_with_ids(vectors, ids)
    faiss.write_index(index, block_path)
    return len(ids)


def build_ivf_on_disk(
    shard_folder: Path,
    out: Path,
    factory: str = "IVF1024,Flat",
    train_rows: int = 100_000,
    use_ray: bool | None = None,
) -> MergeReport:
    """Train, fill one block per shard (in parallel on Ray when connected), merge on disk."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    shard_folder, out = Path(shard_folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = open_shards(shard_folder)
    trained = train_ivf(shard_folder, factory, train_rows)
    faiss.write_index(trained, str(out / TRAINED))
    blocks = [str(out / f"block-{number:05d}.index") for number in shards.numbers]
    jobs = [
        (str(shard_folder), number, shards.dim, str(out / TRAINED), block)
        for number, block in zip(shards.numbers, blocks)
    ]
    rows = sum(_fill_all(jobs, use_ray))
    # merge_ondisk needs an empty trained index and leaves it pointing at the merged lists
    merging = faiss.read_index(str(out / TRAINED))
    merge_ondisk(merging, blocks, str(out / MERGED_DATA))
    faiss.write_index(merging, str(out / MERGED_INDEX))
    for block in blocks:
        Path(block).unlink()
    log.info("merged %d rows from %d shards into %s", rows, len(blocks), out / MERGED_INDEX)
    return MergeReport(out / MERGED_INDEX, rows, len(blocks))


def open_merged(path: Path) -> Any:
    """The merged index with its inverted lists left on disk (read as queries need them)."""
    import faiss

    return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def _fill_all(jobs: list[tuple], use_ray: bool | None) -> list[int]:
    ray = None
    if use_ray is not False:
        try:
            import ray
        except ImportError:
            ray = None
    if ray is not None and (use_ray or ray.is_initialized()):
        remote = ray.remote(max_retries=3)(fill_block)
        return ray.get([remote.remote(*job) for job in jobs])
    return [fill_block(*job) for job in jobs]
