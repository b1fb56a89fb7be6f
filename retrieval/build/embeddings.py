"""``retrieve index --from-embeddings DIR``: an index built from fc7 computed elsewhere.

The shards (``indexes/shards.py``: ``retrieve export``, ``retrieve extract --engine ray``, or any
tool that writes that layout) are checked (every vector finite and of the stated width, every
shard complete) and poured into staged chunks a chunk at a time, then committed as one
generation exactly as ``retrieve index`` commits what it extracted: neither side holds all
vectors in memory, a bad shard stops the build before anything is committed, and a query with
the same model works on the result. The shards' identity becomes the index's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.build.commit import commit_changes
from retrieval.build.options import IndexOptions, IndexReport
from retrieval.errors import IndexMismatchError, RetrieveError
from retrieval.indexes import generation, shards, store
from retrieval.indexes.staging import StagedFile, Staging
from retrieval.indexes.sync import DiskFile, SyncPlan, file_sha256
from retrieval.model.identity import Identity


def identity_of_shards(shard_set: shards.ShardSet) -> tuple[Identity, dict[str, Any]]:
    """(identity, model record) from ``identity.json``'s ``model``: a manifest's pair
    (``{"model": ..., "identity": ...}``, as ``retrieve export`` writes) or a bare model record
    (``LoadedModel.describe()``, as the extract engines write; precision then taken as fp32)."""
    model = shard_set.model
    if "identity" in model:
        identity = Identity.from_dict(model["identity"])
        record = model.get("model", model)
    else:
        try:
            identity = Identity(
                weights_sha256=model["sha256"],
                arch=model["arch"],
                preprocessing=model["preprocessing"],
                dim=shard_set.dim,
                layer=model.get("layer", "fc7"),
                precision=model.get("precision", "fp32"),
                assumed=() if "precision" in model else ("precision",),
            )
        except (KeyError, TypeError):
            raise shards.ShardError(
                f"{shard_set.folder}: identity.json names no model (sha256, arch, preprocessing)"
            ) from None
        keys = ("source", "sha256", "arch", "layer", "preprocessing")
        record = {k: model[k] for k in keys if k in model}
    if identity.dim != shard_set.dim:
        raise shards.ShardError(
            f"{shard_set.folder}: the model gives {identity.dim}-d fc7 but the shards hold "
            f"{shard_set.dim}-d vectors"
        )
    return identity, record


def index_from_embeddings(
    folder: Path, index_dir: Path | None = None, options: IndexOptions = IndexOptions()
) -> IndexReport:
    """Build a new index (``options.rebuild`` replaces an existing one) from embedding shards."""
    started = time.perf_counter()
    index_dir = Path(index_dir or store.default_index_dir())
    shard_set = shards.open_shards(Path(folder))
    identity, record = identity_of_shards(shard_set)
    if options.spec and (options.spec.reduce or options.spec.normalize):
        spec = options.spec
        identity = dataclasses.replace(identity, reduce=spec.reduce, normalize=spec.normalize)
    report = IndexReport(index_dir=str(index_dir))
    with generation.write_lock(index_dir):
        if (index_dir / store.MANIFEST).exists() and not options.rebuild:
            raise IndexMismatchError(
                f"{index_dir} already holds an index; --from-embeddings builds a new one: give "
                "another --index, or add --rebuild to replace it"
            )
        staging = _empty_staging(index_dir, Path(folder), identity)
        plan = SyncPlan()
        for shard in shard_set:
            plan.extract += pour_shard(shard, staging, options.chunk_size)
        if not plan.extract:
            raise RetrieveError(f"{folder} holds no embeddings")
        _check_unique(plan.extract)
        replacing = options.rebuild and (index_dir / store.MANIFEST).exists()
        base = store.open_snapshot(index_dir) if replacing else None
        try:
            result = commit_changes(
                index_dir, base, record, identity, _fresh(options), plan, staging
            )
            base = None
        finally:
            if base is not None:
                base.close()
        staging.clear()
        if shard_set.model.get("fp32_agreement"):  # measured where the vectors were made
            generation.annotate_manifest(
                index_dir, {"fp32_agreement": shard_set.model["fp32_agreement"]}
            )
    result.fill(report)
    report.extracted = 0
    report.seconds = time.perf_counter() - started
    return report


def _fresh(options: IndexOptions) -> IndexOptions:
    return dataclasses.replace(options, rebuild=True)


def _empty_staging(index_dir: Path, folder: Path, identity: Identity) -> Staging:
    """Staging for this build, emptied: a half-poured earlier attempt is not resumed (pouring
    is a copy, cheap next to extraction)."""
    key = {"embeddings": str(folder.resolve()), **identity.to_dict()}
    Staging(index_dir, key).clear()
    return Staging(index_dir, key)


def pour_shard(
    shard: shards.Shard,
    staging: Staging,
    chunk_size: int,
    planned: dict[str, DiskFile] | None = None,
) -> list[DiskFile]:
    """One shard's rows (indexed and skipped) into staged chunks of ``chunk_size`` files.

    ``planned``: the files a run asked for, by path; a skipped file (whose shard row has no
    size or time) is staged under the size and time the run planned it with."""
    planned = planned or {}
    meta = shard.metadata.to_pydict()
    skipped = shard.skipped.to_pydict() if shard.skipped is not None else {"path": []}
    files: list[DiskFile] = []
    n = len(meta["path"])
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        entries = [
            StagedFile(
                meta["path"][i],
                int(meta["size"][i]),
                int(meta["mtime"][i]),
                meta["sha256"][i],
                row=i - start,
            )
            for i in range(start, stop)
        ]
        staging.write_chunk(entries, np.ascontiguousarray(shard.vectors[start:stop]))
        files += [DiskFile(e.path, e.size, e.mtime_ns) for e in entries]
    if skipped["path"]:
        entries = []
        for path, reason, detail in zip(skipped["path"], skipped["reason"], skipped["detail"]):
            known = planned.get(path)
            size, mtime = (known.size, known.mtime_ns) if known else (-1, -1)
            digest = _sha256(path) if known else ""  # as a local run records it
            why = reason or "unreadable"
            entries.append(StagedFile(path, size, mtime, digest, why, detail or ""))
        staging.write_chunk(entries, np.zeros((0, shard.vectors.shape[1]), np.float32))
        files += [DiskFile(e.path, e.size, e.mtime_ns) for e in entries]
    return files


def _sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _check_unique(files: list[DiskFile]) -> None:
    seen: set[str] = set()
    for file in files:
        if file.path in seen:
            raise shards.ShardError(f"{file.path} appears twice in the embeddings")
        seen.add(file.path)
