"""What ``retrieve index`` is asked to do (:class:`IndexOptions`), and what it did
(:class:`IndexReport`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from retrieval.extraction.types import ExtractOptions
from retrieval.images.walk import describe_other_types
from retrieval.indexes import kinds
from retrieval.units import counted

DEFAULT_CHUNK_SIZE = 1024


@dataclass
class CommitCounts:
    """What one commit changed: ``commit_changes`` returns it, :class:`IndexReport` carries it."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    touched: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    count: int = 0
    total_skipped: int = 0
    index_kind: str = ""
    index_kind_reason: str = ""

    def fill(self, report: CommitCounts) -> None:
        """Copy these counts into ``report`` (a run's report, which has more)."""
        for item in fields(CommitCounts):
            setattr(report, item.name, getattr(self, item.name))


@dataclass
class IndexReport(CommitCounts):
    """What a run did, for the summary line and ``--json``: its commit's counts, plus the run's
    own facts."""

    index_dir: str = ""
    walk_problems: list[dict[str, str]] = field(default_factory=list)
    other_types: dict[str, int] = field(default_factory=dict)  # files the walk does not read
    aliases: int = 0  # file symlinks left out: the images they point to are indexed already
    extracted: int = 0  # files run through the model in this run
    signed: int = 0  # signatures the run stored, for the duplicates pass
    resumed: int = 0  # files taken from chunks an earlier, interrupted run finished
    seconds: float = 0.0
    times: dict[str, float] = field(default_factory=dict)
    # Where this run's images were decoded (the CUDA path; all zero on the CPU path): by nvjpeg,
    # by Pillow by choice, by Pillow after nvjpeg failed on them, and files skipped.
    decoded: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skip_reasons.items()))
        text = (
            f"{self.added} added, {self.updated} updated, {self.removed} removed, "
            f"{self.unchanged + self.touched} unchanged, {self.skipped} skipped"
        )
        if reasons:
            text += f" ({reasons})"
        text += f"; the index holds {counted(self.count, 'image')} ({self.index_dir})"
        earlier = self.total_skipped - self.skipped
        if earlier > 0:  # counted as unchanged above: say they are still not in the index
            text += f"; {counted(earlier, 'file')} skipped in an earlier run, unchanged since"
        if self.other_types:
            text += "; " + describe_other_types(self.other_types)
        if self.aliases == 1:
            text += "; 1 symlink to an image indexed under another name, left out"
        elif self.aliases:
            text += f"; {self.aliases} symlinks to images indexed under other names, left out"
        roads = decode_roads(self.decoded)
        if roads:
            text += f"; {roads}"
        return text


def decode_roads(decoded: dict[str, int]) -> str:
    """The summary's words for :attr:`IndexReport.decoded`; '' when nothing went to the GPU."""
    if not (decoded.get("gpu") or decoded.get("cpu_after_gpu_failure")):
        return ""
    return (
        f"decoded {decoded['gpu']} on the GPU, {decoded['cpu']} on the CPU, "
        f"{decoded['cpu_after_gpu_failure']} on the CPU after the GPU failed"
    )


@dataclass(frozen=True)
class IndexOptions:
    weights: str | None = None  # None: the index's own model, else "imagenet"
    spec: kinds.IndexSpec | None = None  # None: the index's own kind, Flat for a new one
    memory_budget: int | None = None
    rebuild: bool = False
    strict: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    engine: str = "local"  # "ray": extract on a Ray cluster (retrieve[ray]), then commit here
    # Sign each image the CPU decodes for the model, for ``retrieve duplicates``
    # (``signature_store``); the CUDA and Ray roads leave it to the duplicates pass.
    signatures: bool = True
    ray_address: str | None = None  # None: a local cluster; "auto" or HOST:PORT: join one
