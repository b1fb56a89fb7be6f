"""The driver: plan parts, run each on Ray Data (decode tasks -> model actors), write its shard.

All unfinished parts go through one Ray Data pipeline (the actors keep their models for the
whole run), and the driver collects the output by part and key: a retried task or a restarted
actor may hand a row back twice or not finish a block, so rows are de-duplicated by key and a
part is written only when every key came back exactly once (otherwise the run fails there:
nothing is lost and nothing doubled). A finished part is its shard on
disk, so a killed driver, run again with the same arguments, skips to the first unfinished part.
Retries are finite (Ray's default retries forever, and a file that kills its decoder every time
would loop): ``max_retries`` for tasks, ``max_restarts`` / ``max_task_retries`` for actors.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.devices import choose_precision, parse_device, usable_cores
from retrieval.distributed.manifest import PART_FILES, Manifest, Part, Source, plan, read_part
from retrieval.errors import RetrieveError
from retrieval.images.decode import DEFAULT_MAX_MEGAPIXELS
from retrieval.images.walk import label_of
from retrieval.indexes.shards import ShardRows, SkippedRows, write_identity, write_shard
from retrieval.units import counted

if TYPE_CHECKING:
    from retrieval.distributed.ray_logs import RayLogs
    from retrieval.model.weights import LoadedModel

log = logging.getLogger(__name__)

LOCAL_CLUSTER_CPUS = 4
# Decode tasks take this many model batches each: enough work per task to pay for scheduling,
# small enough that a part's files spread over every decode core.
DECODE_BLOCK_BATCHES = 4


@dataclass(frozen=True)
class RayOptions:
    """How to spread the work; ``None`` means decided from the cluster's resources."""

    address: str | None = None  # None: start a local cluster; "auto" or HOST:PORT: join one
    actors: int | None = None  # model actors; None: one per GPU, else max(1, CPUs // 4)
    actor_cpus: float = 1.0  # CPUs each CPU actor reserves (and torch threads it runs)
    device: str = "auto"  # "auto": cuda actors when the cluster has GPUs
    precision: str = "auto"  # auto: bf16 where native (GPU actors, or this CPU), else fp32
    batch_size: int = 64  # rows per decode task and per model call
    part_files: int = PART_FILES
    retries: int = 3
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    gpu_decode: bool = False  # JPEG bytes to the actors, decoded there (nvjpeg on a GPU)
    num_cpus: int | None = None  # a local cluster's logical CPUs; None: max(4, cores)


@dataclass
class ActorWork:
    """One model actor's part of a run."""

    rows: int = 0
    seconds: float = 0.0


@dataclass
class RunReport:
    """What a run did: parts written now and before, rows, skipped files, seconds."""

    out: Path
    parts_done_before: int = 0
    parts_written: list[int] = field(default_factory=list)
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    actors: int = 0
    # Per model actor ("host:pid"): the rows it handled and the seconds it spent on them.
    actor_work: dict[str, ActorWork] = field(default_factory=dict)
    log: str = ""  # the file Ray's own output went to (ray_logs.py)

    def describe_actors(self) -> str:
        """One line of how the work spread, e.g. ``2 model actors: 1,204 rows (busy 92%),
        1,196 rows (busy 91%)``; busy is the share of the run's wall clock."""
        if not self.actor_work:
            return ""
        wall = max(self.seconds, 1e-9)
        shares = ", ".join(
            f"{w.rows:,} rows (busy {w.seconds / wall:.0%})"
            for _, w in sorted(self.actor_work.items())
        )
        return f"{counted(len(self.actor_work), 'model actor')}: {shares}"


def connect(options: RayOptions) -> bool:
    """Join or start the cluster once per process (a test or a caller may have done it);
    True when this call did, so the run disconnects at its end."""
    import ray

    if ray.is_initialized():
        return False
    if options.address is None:
        # At least 4 logical CPUs: with 2, the model actor and the part reader leave no CPU for
        # decoding and a resumed run deadlocks.
        cpus = options.num_cpus or max(LOCAL_CLUSTER_CPUS, usable_cores())
        # "local": a new cluster even where ray_current_cluster names one started on this
        # machine by `ray start` (ray.init would join that one, and refuse num_cpus).
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=options.address, log_to_driver=False)
    return True


def extract_with_ray(
    source: Source,
    weights: str,
    out: Path,
    options: RayOptions = RayOptions(),
    progress: Callable[[int, int], None] | None = None,
    preprocessing: dict | None = None,
) -> RunReport:
    """Extract every file of ``source`` into fc7 shards in ``out`` (resuming a run there).

    ``progress(done, total)``: files done (earlier runs' parts included), after each batch.
    ``preprocessing``: the one an index recorded (an update embeds as its index did), else the
    weights' own. Ray's own output goes to a log file, not the terminal
    (:mod:`retrieval.distributed.ray_logs`): ``report.log`` and an INFO line name it.
    """
    from retrieval.distributed.ray_logs import ray_logs_to
    from retrieval.model.preprocess import Preprocessing
    from retrieval.model.weights import load_model

    try:
        import ray
        import ray.data
    except ImportError:
        raise RetrieveError("--engine ray needs Ray: pip install 'retrieve[ray]'") from None
    started = time.perf_counter()
    loaded = load_model(weights)
    if preprocessing is not None:
        loaded.preprocessing = Preprocessing.from_dict(preprocessing)
    out = Path(out)
    with ray_logs_to() as logs:
        joined = connect(options)
        try:
            report = _run(source, weights, loaded, out, options, progress, logs)
        finally:
            if joined:  # what Ray prints after the run (a node's death notice) stays in the log
                ray.shutdown()
    report.seconds = time.perf_counter() - started
    return report


def _run(
    source: Source,
    weights: str,
    loaded: LoadedModel,
    out: Path,
    options: RayOptions,
    progress: Callable[[int, int], None] | None,
    logs: RayLogs,
) -> RunReport:
    """The run once joined: place, plan (or resume) the manifest, embed the parts left."""
    import ray

    report = RunReport(out, log=str(logs.open_file()))
    device, num_gpus, actors = _placement(options, ray.cluster_resources())
    # CPU actors: the driver's CPU stands for the nodes' (alike on a local cluster; on a
    # mixed cluster pass --precision explicitly).
    options = replace(options, precision=choose_precision(options.precision, device))
    identity = {**loaded.describe(), "precision": options.precision}
    write_identity(out, identity, loaded.fc7_dim)
    manifest = plan(out, source, identity, options.part_files)
    todo = [p for p in manifest.parts if not (out / f"fc7-{p.number:05d}.npy").exists()]
    report.parts_done_before = len(manifest.parts) - len(todo)
    if report.parts_done_before:
        log.info(
            "resuming: %d of %d parts already written",
            report.parts_done_before,
            len(manifest.parts),
        )
    job = _Job(
        weights,
        loaded.sha256,
        loaded.preprocessing.to_dict(),
        device,
        num_gpus,
        actors,
        options,
    )
    report.actors = actors
    done_before = manifest.files - sum(p.count for p in todo)
    on_batch = None
    if progress is not None:
        progress(done_before, manifest.files)
        on_batch = lambda seen: progress(done_before + seen, manifest.files)  # noqa: E731
    if todo:
        with logs.relay_stderr():
            for number, (images, skipped) in _run_parts(
                out, manifest, todo, job, on_batch, report.actor_work
            ):
                report.parts_written.append(number)
                report.images += images
                report.skipped += skipped
    return report


def _placement(options: RayOptions, resources: dict) -> tuple[str, float, int]:
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    # Ray gives each GPU actor its own device: an ordinal (cuda:N) names no GPU of the cluster.
    kind = parse_device(options.device).kind
    use_gpu = kind == "cuda" or (kind == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise RetrieveError("--device cuda: the Ray cluster has no GPUs")
    if options.actors is not None:
        actors = options.actors
    else:
        actors = gpus if use_gpu else max(1, cpus // 4)
    return ("cuda" if use_gpu else "cpu"), (1.0 if use_gpu else 0.0), actors


@dataclass(frozen=True)
class _Job:
    """What every part of a run shares: the weights, their digest, the crops, the placement."""

    weights: str
    sha256: str
    preprocessing: dict
    device: str
    num_gpus: float
    actors: int
    options: RayOptions


def _pipeline(dataset, job: _Job):
    """Decode tasks -> model actors, with finite retries for both."""
    import ray.data

    from retrieval.distributed.tasks import Fc7Actor, decode_batch

    options = job.options
    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote args passed as keywords, yet has no other way to make
        # retries finite (its defaults are -1, forever, for tasks and actors alike).
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = dataset.map_batches(
            decode_batch,
            batch_size=options.batch_size,
            batch_format="numpy",
            fn_kwargs={
                "preprocessing": job.preprocessing,
                "max_megapixels": options.max_megapixels,
                "gpu_decode": options.gpu_decode,
            },
            num_cpus=1,
            max_retries=options.retries,
            retry_exceptions=False,  # a Python error is a bug, not a flaky node: fail at once
        )
        return dataset.map_batches(
            Fc7Actor,
            batch_size=options.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "weights": job.weights,
                "sha256": job.sha256,
                "device": job.device,
                "preprocessing": job.preprocessing,
                "precision": options.precision,
                "threads": None if job.num_gpus else max(1, int(options.actor_cpus)),
                "max_megapixels": options.max_megapixels,
            },
            compute=ray.data.ActorPoolStrategy(size=job.actors),
            num_cpus=0 if job.num_gpus else options.actor_cpus,
            num_gpus=job.num_gpus,
            max_restarts=options.retries,
            max_task_retries=options.retries,
        )


def _run_parts(
    out: Path,
    manifest: Manifest,
    todo: list[Part],
    job: _Job,
    on_batch: Callable[[int], None] | None,
    actor_work: dict[str, ActorWork],
) -> Iterator[tuple[int, tuple[int, int]]]:
    """Every unfinished part through one pipeline, so the actors (and their models) live for
    the whole run; a part's shard is written as soon as each of its keys came back once.

    A node that dies takes its tasks, actors and the blocks in its object store with it. Ray
    retries the tasks and restarts the actors; a block it cannot rebuild (an actor's output)
    fails the pipeline. The rows already back are kept, and another round embeds only the
    files still missing, up to ``retries`` rounds; a Python error is not retried.
    """
    # Output in input order: parts then finish one after another, so the driver holds about one
    # part's rows at a time and a killed run keeps every part finished before it.
    ray_data_context().execution_options.preserve_order = True
    counts = {part.number: part.count for part in todo}
    filling: dict[int, dict[int, tuple]] = {number: {} for number in counts}
    seen = 0
    retries = job.options.retries
    for attempt in range(retries + 1):
        dataset = _first_round(out, manifest, todo, job) if attempt == 0 else None
        if dataset is None:
            dataset = _missing_rows(out, manifest, counts, filling, job)
        try:
            for batch in _pipeline(dataset, job).iter_batches(
                batch_size=None, batch_format="numpy"
            ):
                for i, key in enumerate(batch["key"]):
                    number = int(batch["part"][i])
                    # A retried block may bring a row twice, or after its part was written.
                    if counts[number] < 0 or int(key) in filling[number]:
                        continue
                    rows = filling[number]
                    rows[int(key)] = tuple(batch[c][i] for c in _COLUMNS)
                    seen += 1
                    work = actor_work.setdefault(str(batch["actor"][i]), ActorWork())
                    work.rows += 1
                    work.seconds += float(batch["busy_seconds"][i])
                    if len(rows) == counts[number]:
                        files = read_part(out, manifest, number)
                        yield number, _write_part(out, number, files, filling.pop(number))
                        counts[number] = -1
                if on_batch is not None:
                    on_batch(seen)
            break
        except Exception as exc:  # Ray wraps worker failures in many classes; one line for the user
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            unfinished = sorted(n for n, c in counts.items() if c >= 0)
            if not unfinished:
                break  # every row came back before the failure
            if attempt < retries and _lost_to_the_cluster(exc):
                missing = sum(counts[n] - len(filling[n]) for n in unfinished)
                log.warning(
                    "lost part of the cluster (%s); embedding the %s still missing again",
                    type(exc).__name__,
                    counted(missing, "file"),
                )
                log.info("%s: %s", type(exc).__name__, first_line)
                continue
            raise RetrieveError(
                f"parts {unfinished[:5]}{' ...' if len(unfinished) > 5 else ''} failed, retries "
                f"included ({retries}): {type(exc).__name__}: {first_line}; "
                "run again to resume"
            ) from exc
    missing = sorted(n for n, c in counts.items() if c >= 0)
    if missing:
        raise RetrieveError(f"parts {missing[:5]}: some files never came back; run again")


def ray_data_context():
    import ray.data

    return ray.data.DataContext.get_current()


def _first_round(out: Path, manifest: Manifest, todo: list[Part], job: _Job):
    """The unfinished parts' lists, read in tasks, one part each (pyarrow, not
    ``read_parquet``, which needs fsspec's HTTP filesystem when fsspec is installed), so the
    driver never holds the whole listing; it holds only the rows of the parts being filled."""
    import ray.data

    from retrieval.distributed.tasks import read_part_lists

    paths = [{"part_list": str(manifest.part_path(out, part.number))} for part in todo]
    return ray.data.from_items(paths, override_num_blocks=len(paths)).map_batches(
        read_part_lists,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
        fn_kwargs={"rows_per_block": DECODE_BLOCK_BATCHES * job.options.batch_size},
    )


def _missing_rows(out: Path, manifest: Manifest, counts: dict, filling: dict, job: _Job):
    """A later round's input: the rows of unfinished parts that never came back."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray.data

    rows_per_block = DECODE_BLOCK_BATCHES * job.options.batch_size
    blocks = []
    for number, count in counts.items():
        if count < 0:
            continue
        table = pq.read_table(manifest.part_path(out, number))
        done = pa.array(list(filling[number]), pa.int64())
        table = table.filter(pc.invert(pc.is_in(table["key"], value_set=done)))
        blocks += [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)


def _lost_to_the_cluster(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a node, worker, actor or object lost to the
    cluster, which another round can redo, rather than an error of the code."""
    import ray.exceptions as rex

    lost = (
        rex.ObjectLostError,
        rex.RayActorError,
        rex.WorkerCrashedError,
        rex.NodeDiedError,
        rex.LocalRayletDiedError,
    )
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, lost):
            return True
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return False


_COLUMNS = ("size", "mtime", "sha256", "reason", "detail", "fc7")


def _write_part(out: Path, number: int, files: dict, seen: dict[int, tuple]) -> tuple[int, int]:
    rows, skipped, vectors = ShardRows(), SkippedRows(), []
    for key, path in zip(files["key"], files["path"]):
        size, mtime, sha256, reason, detail, fc7 = seen[key]
        if reason:
            skipped.id.append(key)
            skipped.path.append(path)
            skipped.reason.append(str(reason))
            skipped.detail.append(str(detail))
            continue
        rows.id.append(key)
        rows.path.append(path)
        rows.label.append(label_of(path))
        rows.sha256.append(str(sha256))
        rows.size.append(int(size))
        rows.mtime.append(int(mtime))
        vectors.append(fc7)
    dim = len(seen[files["key"][0]][-1])
    matrix = np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)
    write_shard(out, number, matrix, rows, skipped)
    return len(rows), len(skipped)
