"""``retrieve index``: make an index directory follow an image folder.

The run is: walk the folder, plan what changed (``indexes.sync``), extract fc7 for new and edited
files into staged chunks (``indexes.staging``, so a killed run resumes), then commit one new
generation (``commit``). Bad files become skipped rows with a reason; the run goes on.

The model is loaded only when there is an image to embed (or ``--weights`` names one to check):
a re-index where nothing changed, or where files were only removed or touched, never imports
torch. An update embeds with the index's own identity: the weights must be the same (refused with
the part that differs otherwise), the preprocessing and precision are the manifest's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.build import signature_store
from retrieval.build.agreement import measure_fp32_agreement
from retrieval.build.commit import commit_changes
from retrieval.build.on_ray import clear_run, extract_on_ray
from retrieval.build.options import IndexOptions, IndexReport
from retrieval.errors import IndexMismatchError, RetrieveError
from retrieval.extraction.types import StageTimes
from retrieval.images.walk import IMAGE_SUFFIXES, describe_other_types, walk
from retrieval.indexes import generation, kinds, store
from retrieval.indexes.rows import Row
from retrieval.indexes.staging import StagedFile, Staging
from retrieval.indexes.sync import DiskFile, plan_sync, stat_files
from retrieval.model.identity import Identity
from retrieval.model.recorded import checked_model, load_recorded_model

if TYPE_CHECKING:
    from retrieval.extraction.embedder import Embedder
    from retrieval.model.weights import LoadedModel

log = logging.getLogger(__name__)


def index_folder(
    images_dir: Path,
    index_dir: Path | None = None,
    options: IndexOptions = IndexOptions(),
    progress: Callable[[int, int], None] | None = None,
    embedder: Embedder | None = None,
) -> IndexReport:
    """Index every image under ``images_dir`` (or that one file); on an existing index, apply
    only the changes. ``embedder``: the index's model, already loaded and checked by the caller
    (``Index.update``), so it is not loaded again."""
    started = time.perf_counter()
    index_dir = Path(index_dir or store.default_index_dir())
    root = Path(os.path.abspath(images_dir))
    found = walk(root)
    paths, problems = found.files, found.problems
    report = IndexReport(
        index_dir=str(index_dir), other_types=dict(found.other_types), aliases=found.aliases
    )
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        others = describe_other_types(found.other_types)
        raise RetrieveError(
            f"no images found in {images_dir} (looked for {suffixes})"
            + (f"; {others}" if others else "")
        )
    report.walk_problems = [{"path": str(p.path), "reason": p.reason} for p in problems]
    for problem in problems:
        log.warning("%s: %s", problem.path, problem.reason)
    with generation.write_lock(index_dir):
        base = _open_base(index_dir)
        try:
            generation.remove_unreferenced(index_dir, base.manifest if base else None)
            fresh = base is None or options.rebuild
            _check_request(base, fresh, options)
            disk, stat_problems = stat_files(paths)
            report.walk_problems += [{"path": p, "reason": why} for p, why in stat_problems]
            plan = plan_sync(disk, [] if fresh else _rows_under(base, root))
            model = embedder.loaded if embedder is not None else None
            if plan.extract or fresh or options.weights:
                model = model or _load(base, fresh, options)
                identity, model = _identity_for_run(base, fresh, model, options)
            if not fresh and not plan.extract:
                identity = Identity.from_dict(base.manifest["identity"])
                source = _moved_source(base, model)
                if plan.is_empty and source is None:
                    return _nothing_to_do(report, base, plan, started)
            times = StageTimes()
            staging = Staging(index_dir, _staging_identity(identity, options))
            if plan.extract and options.engine == "ray":
                extract_on_ray(
                    plan.extract, model, identity, index_dir, options, staging, report, progress
                )
            elif plan.extract:
                embedder = _embedder(model, identity, options, embedder)
                signatures = signature_store.Sink(index_dir) if options.signatures else None
                try:
                    times = _extract_to_staging(
                        plan.extract, embedder, options, staging, report, progress, signatures
                    )
                finally:
                    if signatures is not None:
                        report.signed = signatures.close()
            record = model.describe() if model is not None else base.manifest["model"]
            result = commit_changes(index_dir, base, record, identity, options, plan, staging)
            base = None  # the commit took it over (and closed it)
            staging.clear()
            clear_run(index_dir)
            if identity.precision == "bf16" and plan.extract and (fresh or _unmeasured(index_dir)):
                measure_fp32_agreement(index_dir, _embedder(model, identity, options, embedder))
        finally:
            if base is not None:
                base.close()
    result.fill(report)
    report.seconds = time.perf_counter() - started
    times.wall = report.seconds
    report.times = {k: round(v, 3) for k, v in vars(times).items()}
    if options.engine == "ray":  # Ray's workers read, decode and embed out of sight of these
        report.times = {"engine": "ray", "wall": round(report.seconds, 3)}
    else:
        report.decoded = {
            "gpu": times.gpu_decoded,
            "cpu": times.cpu_decoded,
            "cpu_after_gpu_failure": times.gpu_fallback,
            "skipped": times.skipped,
        }
    return report


def _open_base(index_dir: Path) -> store.Snapshot | None:
    if not (index_dir / store.MANIFEST).exists():
        return None
    return store.open_snapshot(index_dir)


def _rows_under(base: store.Snapshot, root: Path) -> list[Row]:
    """The rows a run over ``root`` answers for: those below the folder, or that one file."""
    if root.is_dir():
        return list(base.iter_rows(under=str(root)))
    row = base.row_for_path(str(root))
    return [row] if row else []


def _check_request(base: store.Snapshot | None, fresh: bool, options: IndexOptions) -> None:
    """An update cannot change the index's kind or precision (that takes ``--rebuild``); a
    new index's kind must be one this machine can build (said before any image is embedded)."""
    if fresh:
        if options.spec is not None and options.spec.kind != "auto":
            kinds.refuse_unbuildable(options.spec)
        return
    asked, recorded = options.extract.precision, base.manifest["identity"]["precision"]
    if asked not in (None, "auto") and asked != recorded:
        raise IndexMismatchError(
            f"the index at {base.directory} does not take --precision {asked}: precision: the "
            f"index has {recorded}; leave out --precision, or add --rebuild to rebuild it"
        )
    wanted = options.spec
    if not wanted or wanted.kind == "auto":
        return
    if wanted != kinds.IndexSpec.from_dict(base.manifest["index"]):
        raise IndexMismatchError(
            f"the index at {base.directory} is {base.manifest['index']['kind']}; add --rebuild "
            "to change its kind, reduction or normalisation"
        )


def _load(base: store.Snapshot | None, fresh: bool, options: IndexOptions) -> LoadedModel:
    from retrieval.model.weights import load_model

    if options.weights:
        return load_model(options.weights)
    if base is not None:  # an update, or --rebuild (to change the kind): the index's own model
        return load_recorded_model(base.manifest)
    return load_model("imagenet")


def _identity_for_run(
    base: store.Snapshot | None, fresh: bool, model: LoadedModel, options: IndexOptions
) -> tuple[Identity, LoadedModel]:
    """The identity the new vectors get, and the model set up to give it."""
    from retrieval.devices import choose_precision

    spec = options.spec or kinds.IndexSpec()
    asked = options.extract.precision
    if fresh:
        precision = choose_precision(asked, options.extract.device)
        return model.identity(precision, reduce=spec.reduce, normalize=spec.normalize), model
    recorded = Identity.from_dict(base.manifest["identity"])
    model, _ = checked_model(recorded, model, asked, what=f"the index at {base.directory}")
    return recorded, model


def _embedder(
    model: LoadedModel, identity: Identity, options: IndexOptions, given: Embedder | None
) -> Embedder:
    """What this run embeds with: the model at the identity's precision with the run's options
    (``given``, the caller's, when it is exactly that)."""
    from retrieval.extraction.embedder import Embedder

    wanted = dataclasses.replace(options.extract, precision=identity.precision)
    if given is not None and given.loaded is model and given.options == wanted:
        return given
    return Embedder(model, identity.precision, options.extract)


def _unmeasured(index_dir: Path) -> bool:
    return "fp32_agreement" not in store.read_manifest(index_dir)


def _moved_source(base: store.Snapshot, model: LoadedModel | None) -> str | None:
    """The new place of the index's weights, when ``--weights`` named the same weights there."""
    if model is None or model.source == base.manifest["model"]["source"]:
        return None
    return model.source


def _nothing_to_do(
    report: IndexReport, base: store.Snapshot, plan: Any, started: float
) -> IndexReport:
    report.unchanged, report.count = plan.unchanged, base.count
    report.total_skipped = int(base.manifest.get("skipped", 0))
    report.index_kind = base.manifest["index"]["kind"]
    report.seconds = time.perf_counter() - started
    return report


def _staging_identity(identity: Identity, options: IndexOptions) -> dict[str, Any]:
    return {
        "model": identity.weights_sha256,
        "preprocessing": identity.preprocessing,
        "precision": identity.precision,
        "max_megapixels": options.extract.max_megapixels,
    }


def _extract_to_staging(
    files: list[DiskFile],
    embedder: Embedder,
    options: IndexOptions,
    staging: Staging,
    report: IndexReport,
    progress: Callable[[int, int], None] | None,
    signatures: signature_store.Sink | None = None,
) -> StageTimes:
    """Run the model on files not already staged, writing a chunk every ``chunk_size`` files
    (and the signatures made on the way, into ``signatures``)."""
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
    paths = [Path(f.path) for f in todo]
    for batch in embedder.files(paths, sign=signatures is not None):
        times.add(batch.times)
        if signatures is not None:
            signatures.add(batch.records)
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
                    disk.path, disk.size, disk.mtime_ns, record.sha256, record.reason, record.detail
                )
            pending.append(item)
        pending_features.append(batch.features)
        done += len(batch.records)
        if progress:
            progress(done, len(files))
        if len(pending) >= options.chunk_size:
            write_start = time.perf_counter()
            staging.write_chunk(pending, np.concatenate(pending_features))
            if signatures is not None:
                signatures.flush()
            times.write += time.perf_counter() - write_start
            pending, pending_features = [], []
    if pending:
        staging.write_chunk(pending, np.concatenate(pending_features))
    report.extracted = len(todo)
    return times
