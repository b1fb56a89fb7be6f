"""``retrieve index``: make an index directory follow an image folder.

The run is: walk the folder, plan what changed (``indexes.sync``), extract fc7 for new and edited
files into staged chunks (``indexes.staging``, so a killed run resumes), then commit one new
generation (``indexes.generation``). Bad files become skipped rows with a reason; the run goes on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexMismatchError, RetrieveError
from retrieval.extraction import extract_fc7
from retrieval.extraction.types import StageTimes
from retrieval.images.walk import IMAGE_SUFFIXES, find_images
from retrieval.indexes import generation, kinds, store
from retrieval.indexes.rows import Row
from retrieval.indexes.staging import StagedFile, Staging
from retrieval.indexes.sync import DiskFile, plan_sync, stat_files
from retrieval.indexing.commit import commit_changes
from retrieval.indexing.options import IndexOptions, IndexReport
from retrieval.model.weights import LoadedModel, load_model

log = logging.getLogger(__name__)


def index_folder(
    images_dir: Path,
    index_dir: Path | None = None,
    options: IndexOptions = IndexOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Index every image under ``images_dir``; on an existing index, apply only the changes."""
    started = time.perf_counter()
    index_dir = Path(index_dir or store.default_index_dir())
    root = Path(os.path.abspath(images_dir))
    paths, problems = find_images(root)
    report = IndexReport(index_dir=str(index_dir))
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise RetrieveError(f"no images found in {images_dir} (looked for {suffixes})")
    report.walk_problems = [{"path": str(p.path), "reason": p.reason} for p in problems]
    for problem in problems:
        log.warning("%s: %s", problem.path, problem.reason)
    with generation.write_lock(index_dir):
        base = _open_base(index_dir)
        generation.remove_unreferenced(index_dir, base.manifest if base else None)
        loaded = _choose_model(base, options)
        if base and options.rebuild:
            base_rows: list[Row] = []
        else:
            base_rows = list(base.iter_rows(under=str(root))) if base else []
        _check_compatible(base, loaded, options)
        disk, stat_problems = stat_files(paths)
        for path, why in stat_problems:
            report.walk_problems.append({"path": path, "reason": why})
        plan = plan_sync(disk, base_rows)
        if base and not options.rebuild and plan.is_empty:
            report.unchanged, report.count = plan.unchanged, base.count
            report.total_skipped = int(base.manifest.get("skipped", 0))
            report.index_kind = base.manifest["index"]["kind"]
            report.seconds = time.perf_counter() - started
            base.close()
            return report
        staging = Staging(index_dir, _staging_identity(loaded, options))
        times = _extract_to_staging(plan.extract, loaded, options, staging, report, progress)
        commit_changes(index_dir, base, loaded, options, plan, staging, report)
        staging.clear()
    report.seconds = time.perf_counter() - started
    times.wall = report.seconds
    report.times = {k: round(v, 3) for k, v in vars(times).items()}
    return report


def _open_base(index_dir: Path) -> store.Snapshot | None:
    if not (index_dir / store.MANIFEST).exists():
        return None
    return store.open_snapshot(index_dir)


def _choose_model(base: store.Snapshot | None, options: IndexOptions) -> LoadedModel:
    device = options.extract.device
    if options.weights:
        return load_model(options.weights, device="cpu" if device == "auto" else device)
    if base and not options.rebuild:
        return load_model(base.manifest["model"]["source"], device="cpu")
    return load_model("imagenet", device="cpu")


def _check_compatible(
    base: store.Snapshot | None, loaded: LoadedModel, options: IndexOptions
) -> None:
    if base is None or options.rebuild:
        return
    recorded = base.manifest["model"]
    if recorded["sha256"] != loaded.sha256:
        raise IndexMismatchError(
            f"the index at {base.directory} was built with other weights ({recorded['source']}, "
            f"sha256 {recorded['sha256'][:12]}); add --rebuild to rebuild it with "
            f"{loaded.source}"
        )
    wanted = options.spec
    if (
        wanted
        and wanted.kind != "auto"
        and wanted != kinds.IndexSpec.from_dict(base.manifest["index"])
    ):
        raise IndexMismatchError(
            f"the index at {base.directory} is {base.manifest['index']['kind']}; add --rebuild "
            "to change its kind, reduction or normalisation"
        )


def _staging_identity(loaded: LoadedModel, options: IndexOptions) -> dict[str, Any]:
    return {
        "model": loaded.sha256,
        "preprocessing": loaded.preprocessing.to_dict(),
        "max_megapixels": options.extract.max_megapixels,
    }


def _extract_to_staging(
    files: list[DiskFile],
    loaded: LoadedModel,
    options: IndexOptions,
    staging: Staging,
    report: IndexReport,
    progress: Callable[[int, int], None] | None,
) -> StageTimes:
    """Run the model on files not already staged, writing a chunk every ``chunk_size`` files."""
    staged = staging.load_entries()
    todo = [f for f in files if (f.path, f.size, f.mtime_ns) not in staged]
    report.resumed = len(files) - len(todo)
    if report.resumed:
        log.info("resuming: %d files already extracted by an interrupted run", report.resumed)
    times = StageTimes()
    pending: list[StagedFile] = []
    pending_features: list[np.ndarray] = []
    done = report.resumed
    if progress:
        progress(done, len(files))
    for batch in extract_fc7([Path(f.path) for f in todo], loaded, options.extract):
        times.add(batch.times)
        row = sum(len(x) for x in pending_features)
        for record in batch.records:
            disk = todo[record.position]
            if record.ok:
                item = StagedFile(disk.path, disk.size, disk.mtime_ns, record.sha256, row=row)
                row += 1
            else:
                if options.strict:
                    raise RetrieveError(
                        f"{record.path}: {record.reason} {record.detail} (--strict: stopped; "
                        "the files done so far are kept for the next run)".replace("  ", " ")
                    )
                detail = f" ({record.detail})" if record.detail else ""
                log.warning("skipped %s: %s%s", record.path, record.reason, detail)
                item = StagedFile(
                    disk.path,
                    disk.size,
                    disk.mtime_ns,
                    record.sha256,
                    record.reason,
                    record.detail,
                )
            pending.append(item)
        pending_features.append(batch.features)
        done += len(batch.records)
        if progress:
            progress(done, len(files))
        if len(pending) >= options.chunk_size:
            write_start = time.perf_counter()
            staging.write_chunk(pending, np.concatenate(pending_features))
            times.write += time.perf_counter() - write_start
            pending, pending_features = [], []
    if pending:
        staging.write_chunk(pending, np.concatenate(pending_features))
    report.extracted = len(todo)
    return times
