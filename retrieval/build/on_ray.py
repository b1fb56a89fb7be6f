"""``retrieve index DIR --engine ray``: the files a run must embed go to a Ray cluster.

The run plans as always (what is new or edited, on this machine: cheap), hands exactly those
files to the Ray engine (``retrieval.distributed``: decode tasks, model actors) as a file list,
and pours the shards it writes into the staged chunks the commit reads, so an update over Ray
commits the same generation a local run would. The engine's folder lives in the index
directory (``ray-run/``): a killed run resumes by manifest part (``--chunk-size`` files, the
unit a killed local run keeps too), and it is removed after the commit.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.build.embeddings import pour_shard
from retrieval.build.options import IndexOptions, IndexReport
from retrieval.devices import usable_cores
from retrieval.errors import RetrieveError
from retrieval.indexes.shards import open_shards
from retrieval.indexes.staging import Staging
from retrieval.indexes.sync import DiskFile
from retrieval.model.identity import Identity

if TYPE_CHECKING:
    from retrieval.model.weights import LoadedModel

log = logging.getLogger(__name__)

RUN_FOLDER = "ray-run"
# With 2 logical CPUs a resumed Ray Data job deadlocks: the checkpoint's worker and the model
# actor leave no CPU for reading. A local cluster therefore gets at least 4.
LOCAL_CLUSTER_CPUS = 4


def extract_on_ray(
    files: list[DiskFile],
    model: LoadedModel,
    identity: Identity,
    index_dir: Path,
    options: IndexOptions,
    staging: Staging,
    report: IndexReport,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Embed ``files`` on Ray and stage the result; skipped files come back as skipped rows,
    warned about (or, with ``--strict``, stopping the run) as a local run does. ``progress``:
    the local run's ``(done, total)`` callback, driven by the batches coming back."""
    from retrieval.distributed.engine import RayOptions, extract_with_ray
    from retrieval.distributed.manifest import Source

    run = Path(index_dir) / RUN_FOLDER
    listing = run / "files.txt"
    wanted = "".join(f"{f.path}\n" for f in files)
    if (
        not listing.exists()
        or listing.read_text(encoding="utf-8", errors="surrogateescape") != wanted
    ):
        shutil.rmtree(run, ignore_errors=True)  # another plan: the earlier run's parts do not fit
        run.mkdir(parents=True)
        listing.write_text(wanted, encoding="utf-8", errors="surrogateescape")
    ray = RayOptions(
        address=options.ray_address,
        device=options.extract.device,
        precision=identity.precision,
        num_cpus=max(LOCAL_CLUSTER_CPUS, usable_cores()) if options.ray_address is None else None,
        max_megapixels=options.extract.max_megapixels,
        batch_size=options.extract.batch_size or RayOptions.batch_size,
        part_files=options.chunk_size,  # the unit a killed run keeps, as a local run's chunk
    )
    # Ray's own output (stdout included) goes to its log file: retrieval.distributed.ray_logs.
    done = extract_with_ray(
        Source("list", (str(listing),)),
        model.source,
        run / "shards",
        ray,
        progress=progress,
        preprocessing=identity.preprocessing,
    )
    if done.actor_work:
        log.info("%s", done.describe_actors())
    planned = {f.path: f for f in files}
    for shard in open_shards(run / "shards"):
        _warn_skipped(shard, options.strict)
        pour_shard(shard, staging, options.chunk_size, planned)
    report.extracted = done.images + done.skipped


def _warn_skipped(shard, strict: bool) -> None:
    """The local run's line for each file it skipped (or its --strict stop; the Ray run's parts
    are kept, so the next run resumes)."""
    if shard.skipped is None:
        return
    skipped = shard.skipped.to_pydict()
    for path, reason, detail in zip(skipped["path"], skipped["reason"], skipped["detail"]):
        if strict:
            raise RetrieveError(
                f"{path}: {reason} {detail} (--strict: stopped; the files done so far are kept "
                "for the next run)".replace("  ", " ")
            )
        log.warning("skipped %s: %s%s", path, reason, f" ({detail})" if detail else "")


def clear_run(index_dir: Path) -> None:
    shutil.rmtree(Path(index_dir) / RUN_FOLDER, ignore_errors=True)
