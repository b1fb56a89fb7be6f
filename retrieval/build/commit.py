"""Apply a sync plan and the staged features to an index as one new generation.

The other half of ``retrieve index`` (``indexing.py`` plans and extracts): rows are deleted,
touched, replaced or inserted in the next generation's SQLite file, vectors removed from and added
to its FAISS index chunk by chunk, and the manifest swapped last. Also ``retrieve remove``.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.build.options import CommitCounts, IndexOptions
from retrieval.images.walk import label_of
from retrieval.indexes import auto, flat_file, generation, kinds, store
from retrieval.indexes.rows import Row, RowUpdate
from retrieval.indexes.staging import Staging, iter_chunk_features
from retrieval.indexes.sync import SyncPlan
from retrieval.model.identity import Identity
from retrieval.version import __version__

TRAINING_SEED = 1234
DEFAULT_KIND_REASON = "Flat: the default, exact (--index-type auto chooses by size and memory)"


def commit_changes(
    index_dir: Path,
    base: store.Snapshot | None,
    model: dict[str, Any],
    identity: Identity,
    options: IndexOptions,
    plan: SyncPlan,
    staging: Staging,
) -> CommitCounts:
    """Apply the plan and the staged features as one new generation; on success ``base`` is
    closed (the writer retires it), on an error the caller still owns it.

    ``model`` is the manifest's record of where the weights are, ``identity`` what the vectors
    are (both written to the new manifest)."""
    report = CommitCounts()
    wanted = {(f.path, f.size, f.mtime_ns) for f in plan.extract}
    chunks = staging.chunk_paths()
    fresh = base is None or options.rebuild
    dim = identity.dim
    index = None  # a fresh Flat index is streamed; an update starts from the base (below)
    if fresh:
        n_new = sum(
            1
            for records, _ in iter_chunk_features(chunks)
            for r in records
            if r.reason is None and r.key in wanted
        )
        if options.spec is None:
            spec, why = kinds.IndexSpec(), DEFAULT_KIND_REASON
        else:
            spec, why = auto.resolve_auto(options.spec, n_new, dim, options.memory_budget)
        if not _streams(spec, dim):
            index = kinds.build_index(spec, dim, _training_sample(chunks, wanted, spec, dim, n_new))
    else:
        spec = kinds.IndexSpec.from_dict(base.manifest["index"])
        why = base.manifest.get("index_reason", "")
    report.index_kind, report.index_kind_reason = spec.kind, why
    writer = generation.GenerationWriter(index_dir, base, copy_rows=not fresh)
    try:
        if fresh and index is None:
            index = writer.stream_flat_index(dim)
        vector_ids_to_drop = [row.id for row in plan.remove if row.status == "indexed"]
        writer.delete_rows([row.id for row in plan.remove])
        writer.upsert_rows(
            [
                RowUpdate(
                    d.path,
                    d.size,
                    d.mtime_ns,
                    row.sha256,
                    row.label,
                    row.status,
                    row.reason,
                    row.detail,
                    id=row.id,
                )
                for row, d in plan.touch
            ]
        )
        for row in plan.existing.values():
            if row.status == "indexed":
                vector_ids_to_drop.append(row.id)
        if not fresh:
            index = _carry_over(base, writer, spec, vector_ids_to_drop)
        reasons: Counter[str] = Counter()
        for records, features in iter_chunk_features(chunks):
            keep = [r for r in records if r.key in wanted]
            wanted.difference_update(r.key for r in keep)
            updates = []
            for r in keep:
                previous = plan.existing.get(r.path)
                status = "indexed" if r.reason is None else "skipped"
                updates.append(
                    RowUpdate(
                        r.path,
                        r.size,
                        r.mtime_ns,
                        r.sha256,
                        label_of(r.path),
                        status,
                        r.reason,
                        r.detail or None,
                        id=previous.id if previous else None,
                    )
                )
                if r.reason is not None:
                    reasons[r.reason] += 1
                    report.skipped_files.append(
                        {"path": r.path, "reason": r.reason, "detail": r.detail}
                    )
                elif previous:
                    report.updated += 1
                else:
                    report.added += 1
            ids = writer.upsert_rows(updates)
            good = [(i, r.row) for i, r in zip(ids, keep) if r.reason is None]
            if good:
                index.add_with_ids(
                    np.ascontiguousarray(features[[row for _, row in good]]),
                    np.asarray([i for i, _ in good], dtype=np.int64),
                )
        report.removed = len(plan.remove)
        report.unchanged, report.touched = plan.unchanged, len(plan.touch)
        report.skipped = sum(reasons.values())
        report.skip_reasons = dict(reasons)
        now = _now()
        manifest = {
            "retrieve_version": __version__,
            "created": base.manifest.get("created", now) if base and not fresh else now,
            "updated": now,
            "model": model,
            "identity": identity.to_dict(),
            "metric": "l2",
            "index": spec.to_dict(),
            "index_reason": why,
        }
        if base is not None and not fresh and "fp32_agreement" in base.manifest:
            manifest["fp32_agreement"] = base.manifest["fp32_agreement"]  # same model, same fact
        snapshot = writer.commit(index, manifest)
    except BaseException:
        writer.abort()
        raise
    report.count = snapshot.count
    report.total_skipped = int(snapshot.manifest["skipped"])
    snapshot.close()
    return report


def _streams(spec: kinds.IndexSpec, dim: int) -> bool:
    """Whether the index can be written to disk as it is filled (the exact, default kind)."""
    return spec.factory_string(dim) == flat_file.FLAT_FACTORY and flat_file.layout_matches_faiss()


def _carry_over(
    base: store.Snapshot,
    writer: generation.GenerationWriter,
    spec: kinds.IndexSpec,
    drop: list[int],
) -> Any:
    """The next generation's index: the base's rows minus ``drop``, ready for new rows.

    A Flat base is copied block by block into a streamed file (memory stays flat); any other
    kind is read whole and has the rows removed in place.
    """
    drop_ids = np.asarray(drop, dtype=np.int64)
    blocks = base.flat_vector_blocks() if _streams(spec, base.dim) else None
    if blocks is None:
        return kinds.remove_ids(base.index, drop_ids) if drop else base.index
    index = writer.stream_flat_index(base.dim)
    for vectors, ids in blocks:
        keep = ~np.isin(ids, drop_ids)
        index.add_with_ids(vectors[keep], ids[keep])
    return index


def _training_sample(
    chunks: list[Path], wanted: set, spec: kinds.IndexSpec, dim: int, available: int
) -> np.ndarray | None:
    """A seeded random sample of the new features, gathered chunk by chunk (memory stays flat)."""
    if not kinds.needs_training(spec, dim):
        return None
    size = min(kinds.training_sample_size(spec, dim), available)
    picked = set(
        np.random.default_rng(TRAINING_SEED).choice(available, size, replace=False).tolist()
    )
    parts, position = [], 0
    for records, features in iter_chunk_features(chunks):
        rows = []
        for r in records:
            if r.reason is None and r.key in wanted:
                if position in picked:
                    rows.append(r.row)
                position += 1
        parts.append(features[rows])
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def remove_from_index(paths: list[Path], index_dir: Path) -> dict[str, list[str]]:
    """``retrieve remove``: drop rows by path (a folder drops everything under it).

    Nothing on disk but the index changes: the files themselves are never touched."""
    with generation.write_lock(index_dir):
        base = store.open_snapshot(index_dir)
        try:
            doomed: dict[int, Row] = {}
            missing = []
            for path in paths:
                row = base.row_for_path(str(path))
                found = ([row] if row else []) + list(base.iter_rows(under=str(path)))
                if not found:
                    missing.append(str(path))
                doomed.update((row.id, row) for row in found)
            if not doomed:
                return {"removed": [], "not_in_index": missing}
            vector_ids = [i for i, row in doomed.items() if row.status == "indexed"]
            spec = kinds.IndexSpec.from_dict(base.manifest["index"])
            writer = generation.GenerationWriter(index_dir, base)
        except BaseException:
            base.close()
            raise
        try:
            index = _carry_over(base, writer, spec, vector_ids)
            writer.delete_rows(list(doomed))
            now = _now()
            keep = {k: v for k, v in base.manifest.items() if k not in ("files", "count")}
            writer.commit(index, {**keep, "updated": now}).close()
        except BaseException:
            writer.abort()
            base.close()
            raise
        return {"removed": sorted(row.path for row in doomed.values()), "not_in_index": missing}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
