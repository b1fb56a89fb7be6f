"""What a run will extract: every input file under a stable int64 key, in parts.

The driver lists the source once (a folder, a list of paths, or webdataset tar shards) and
writes ``manifest.json`` plus one ``parts/part-NNNNN.parquet`` per part (key, path, and for tar
members the tar, offset and length). Keys are positions in that listing, so they stay the same
when a killed driver resumes, whatever has changed in the folder since; a part is done when its
shard (``fc7-NNNNN.npy``, :mod:`retrieval.indexes.shards`) exists. Resuming by part keeps the
checkpoint at one small file per 100,000 files (Ray's own id-list checkpoint grows with every
key).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write, atomic_write_text
from retrieval.errors import RetrieveError
from retrieval.images.walk import find_images, is_image_path

MANIFEST = "manifest.json"
FORMAT = "retrieve-ray-manifest/1"
PART_FILES = 100_000


@dataclass(frozen=True)
class Source:
    """Where the files come from: ``folder``, ``list`` (one path a line) or ``tar`` shards."""

    kind: str
    locations: tuple[str, ...]

    @classmethod
    def parse(cls, source: str | Path | None, files_from: str | Path | None = None) -> Source:
        if files_from is not None:
            return cls("list", (str(files_from),))
        text = str(source)
        if text.endswith(".tar") or "*" in text:
            shards = sorted(str(p) for p in Path().glob(text)) if "*" in text else [text]
            if not shards:
                raise RetrieveError(f"{text}: no tar shards match")
            return cls("tar", tuple(shards))
        folder = Path(text)
        if folder.is_dir():
            tars = sorted(str(p) for p in folder.glob("*.tar"))
            if tars and not find_images(folder)[0]:
                return cls("tar", tuple(tars))
        return cls("folder", (text,))


@dataclass(frozen=True)
class Part:
    number: int
    first_key: int
    count: int


@dataclass
class Manifest:
    """The run's plan: source, model identity, parts; ``files`` is the total number of files."""

    source: Source
    model: dict[str, Any]
    part_files: int
    parts: list[Part]
    files: int

    def part_path(self, out: Path, number: int) -> Path:
        return Path(out) / "parts" / f"part-{number:05d}.parquet"

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "source": asdict(self.source),
            "model": self.model,
            "part_files": self.part_files,
            "files": self.files,
            "parts": [asdict(part) for part in self.parts],
        }
        return json.dumps(data, indent=2, sort_keys=True)


def list_files(source: Source) -> dict[str, list]:
    """Columns key, path; tar, offset, length, mtime_ns for tar members ("" and -1 if not)."""
    columns: dict[str, list] = {k: [] for k in ("path", "tar", "offset", "length", "mtime_ns")}
    if source.kind == "folder":
        paths, _ = find_images(Path(source.locations[0]))  # walk problems are not rows
        _add_plain(columns, [str(p) for p in paths])
    elif source.kind == "list":
        listing = Path(source.locations[0])
        try:
            lines = listing.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        except OSError as exc:
            raise RetrieveError(f"--files-from {listing}: cannot read ({exc.strerror})") from None
        _add_plain(columns, [line for line in (raw.strip() for raw in lines) if line])
    else:
        for shard in source.locations:
            _add_tar(columns, shard)
    columns["key"] = list(range(len(columns["path"])))
    return columns


def _add_plain(columns: dict[str, list], paths: list[str]) -> None:
    columns["path"].extend(paths)
    columns["tar"].extend([""] * len(paths))  # not None: Ray Data would turn it into NaN
    for name in ("offset", "length", "mtime_ns"):
        columns[name].extend([-1] * len(paths))


def _add_tar(columns: dict[str, list], shard: str) -> None:
    """Members of one tar as rows: the decoder reads ``length`` bytes at ``offset``."""
    try:
        with tarfile.open(shard, mode="r:") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and is_image_path(m.name)]
    except (OSError, tarfile.TarError) as exc:
        raise RetrieveError(f"{shard}: not a readable tar shard ({exc})") from None
    for member in members:
        columns["path"].append(f"{shard}/{member.name}")
        columns["tar"].append(shard)
        columns["offset"].append(member.offset_data)
        columns["length"].append(member.size)
        columns["mtime_ns"].append(int(member.mtime * 1e9))


def plan(
    out: Path, source: Source, model: dict[str, Any], part_files: int = PART_FILES
) -> Manifest:
    """The manifest in ``out``: the existing one when resuming the same run, else a new one."""
    out = Path(out)
    existing = read_manifest(out)
    if existing is not None:
        if existing.source != source or existing.model != json.loads(json.dumps(model)):
            raise RetrieveError(
                f"{out} holds a run of another source or model; use an empty folder "
                "(or the same SRC and --weights to resume it)"
            )
        return existing
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list_files(source)
    total = len(columns["key"])
    if total == 0:
        raise RetrieveError(f"{', '.join(source.locations)}: no image files to extract")
    parts = [
        Part(number, first, min(part_files, total - first))
        for number, first in enumerate(range(0, total, part_files))
    ]
    table = pa.table(
        {
            "key": pa.array(columns["key"], pa.int64()),
            "path": pa.array(columns["path"], pa.string()),
            "tar": pa.array(columns["tar"], pa.string()),
            "offset": pa.array(columns["offset"], pa.int64()),
            "length": pa.array(columns["length"], pa.int64()),
            "mtime_ns": pa.array(columns["mtime_ns"], pa.int64()),
        }
    )
    manifest = Manifest(source, model, part_files, parts, total)
    for part in parts:
        rows = table.slice(part.first_key, part.count)
        rows = rows.append_column("part", pa.array([part.number] * part.count, pa.int64()))
        atomic_write(
            manifest.part_path(out, part.number), lambda tmp, r=rows: pq.write_table(r, tmp)
        )
    atomic_write_text(out / MANIFEST, manifest.to_json())  # last: the plan exists only whole
    return manifest


def read_manifest(out: Path) -> Manifest | None:
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        source = Source(data["source"]["kind"], tuple(data["source"]["locations"]))
        parts = [Part(**part) for part in data["parts"]]
        return Manifest(source, data["model"], data["part_files"], parts, data["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RetrieveError(f"{path}: not a manifest of this version ({exc})") from None


def read_part(out: Path, manifest: Manifest, number: int) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(manifest.part_path(out, number)).to_pydict()
