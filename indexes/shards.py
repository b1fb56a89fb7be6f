"""fc7 embeddings on disk in shards: the export layout that clip-retrieval and autofaiss read.

One folder holds::

    identity.json            {"format": "retrieve-shards/1", "dim": D, "model": {...}}
    fc7-00000.npy            float32, N0 x D, rows in the order of the metadata below
    metadata-00000.parquet   id (int64), path, label, sha256 (strings), size, mtime (int64, ns)
    skipped-00000.parquet    id, path, reason, detail: files of this shard that gave no vector
    fc7-00001.npy ...

``model`` is the caller's model identity (``LoadedModel.describe()``), so an index built from the
shards can refuse a query with another model. A shard is written to hidden temporary files and
renamed into place metadata first, ``fc7-NNNNN.npy`` last: the vectors file is the commit mark,
so a crash leaves no half-written file under a public name, and a metadata file without its
vectors is a shard whose write did not finish (the reader says so). Shard numbers need not start
at 0 or be contiguous while a run is going (the Ray engine writes one shard per manifest part, in
any order); :func:`open_shards` with ``expect=`` checks that every shard a run planned is there.

API: :class:`ShardWriter` (streaming, rotates every ``rows_per_shard`` rows), :func:`write_shard`
(one whole shard, for engines that number shards themselves), :func:`open_shards` ->
:class:`ShardSet` (iterate :class:`Shard` s; each is checked before it is handed out).

pyarrow is imported when a shard is written or read (``pip install 'retrieve[ray]'``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_write, atomic_write_text, replace_durably, temporary_beside
from retrieval.errors import RetrieveError

FORMAT = "retrieve-shards/1"
IDENTITY = "identity.json"
ROWS_PER_SHARD = 100_000
METADATA_COLUMNS = ("id", "path", "label", "sha256", "size", "mtime")
SKIPPED_COLUMNS = ("id", "path", "reason", "detail")
# Rows checked for finiteness at a time: 8192 x 4096 float32 is 128 MiB.
CHECK_ROWS = 8192
_HEADER_BYTES = 128  # fixed .npy header, so the row count can be filled in after streaming
_SHARD = re.compile(r"^(fc7|metadata|skipped)-(\d{5,})\.(npy|parquet)$")


class ShardError(RetrieveError):
    """A shard folder is missing, incomplete or holds vectors that cannot be used."""


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ShardError(
            "embedding shards need pyarrow: pip install 'retrieve[ray]' (or pyarrow)"
        ) from None
    return pa, pq


def shard_name(kind: str, number: int) -> str:
    return f"{kind}-{number:05d}.{'npy' if kind == 'fc7' else 'parquet'}"


def write_identity(folder: Path, model: dict[str, Any], dim: int) -> None:
    """Write ``identity.json`` once; a folder with another model or width is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {"format": FORMAT, "dim": int(dim), "model": model}
    path = folder / IDENTITY
    if path.exists():
        have = read_identity(folder)
        if have != json.loads(json.dumps(wanted)):
            raise ShardError(
                f"{folder} holds embeddings of another model or width; use an empty folder"
            )
        return
    atomic_write_text(path, json.dumps(wanted, indent=2, sort_keys=True))


def read_identity(folder: Path) -> dict[str, Any]:
    path = Path(folder) / IDENTITY
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{folder}: no {IDENTITY}; not a folder of embedding shards") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "dim" not in data:
        raise ShardError(f"{path}: not a {FORMAT} identity")
    return data


@dataclass
class ShardRows:
    """Metadata of the rows of one shard, one list per column, in vector order."""

    id: list[int] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.id)

    def extend(self, other: ShardRows) -> None:
        for name in METADATA_COLUMNS:
            getattr(self, name).extend(getattr(other, name))

    def cut(self, start: int, stop: int) -> ShardRows:
        return ShardRows(*(getattr(self, name)[start:stop] for name in METADATA_COLUMNS))


@dataclass
class SkippedRows:
    """Files that gave no vector, with the reason (a ``SkipReason`` value) and detail."""

    id: list[int] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.id)


def write_shard(
    folder: Path,
    number: int,
    vectors: np.ndarray,
    rows: ShardRows,
    skipped: SkippedRows | None = None,
) -> None:
    """Write one whole shard atomically (an earlier shard of that number is replaced)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    with _NpyStream(folder / shard_name("fc7", number), vectors.shape[1]) as stream:
        stream.write(vectors)
        _commit_tables(folder, number, rows, skipped or SkippedRows(), stream.count)


def _commit_tables(
    folder: Path, number: int, rows: ShardRows, skipped: SkippedRows, count: int
) -> None:
    if len(rows) != count:
        raise ValueError(f"shard {number}: {count} vectors but {len(rows)} metadata rows")
    pa, pq = _pyarrow()
    table = pa.table(
        {
            "id": pa.array(rows.id, pa.int64()),
            "path": pa.array(rows.path, pa.string()),
            "label": pa.array(rows.label, pa.string()),
            "sha256": pa.array(rows.sha256, pa.string()),
            "size": pa.array(rows.size, pa.int64()),
            "mtime": pa.array(rows.mtime, pa.int64()),
        }
    )
    bad = pa.table(
        {
            "id": pa.array(skipped.id, pa.int64()),
            "path": pa.array(skipped.path, pa.string()),
            "reason": pa.array(skipped.reason, pa.string()),
            "detail": pa.array(skipped.detail, pa.string()),
        }
    )
    for kind, data in (("skipped", bad), ("metadata", table)):
        atomic_write(
            folder / shard_name(kind, number), lambda tmp, data=data: pq.write_table(data, str(tmp))
        )


class ShardWriter:
    """Stream vectors and their rows in; a shard is committed every ``rows_per_shard`` rows.

    ``with ShardWriter(folder, model_identity, dim) as writer: writer.add(vectors, rows)``. Only
    the shard being filled is in memory as metadata; its vectors go straight to a hidden file.
    Leaving the ``with`` on an exception discards the unfinished shard (earlier ones stay).
    """

    def __init__(
        self,
        folder: Path,
        model: dict[str, Any],
        dim: int,
        rows_per_shard: int = ROWS_PER_SHARD,
        first_shard: int = 0,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError("rows_per_shard must be at least 1")
        self.folder, self.dim, self.rows_per_shard = Path(folder), int(dim), rows_per_shard
        write_identity(self.folder, model, self.dim)
        self.next_shard = first_shard
        self.written: list[int] = []
        self._stream: _NpyStream | None = None
        self._rows, self._skipped = ShardRows(), SkippedRows()

    def add(self, vectors: np.ndarray, rows: ShardRows, skipped: SkippedRows | None = None) -> None:
        """Append rows (``len(rows) == len(vectors)``); skipped files go with the current shard."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(rows):
            raise ValueError(f"expected {len(rows)} x {self.dim} vectors, got {vectors.shape}")
        if skipped is not None:
            for name in SKIPPED_COLUMNS:
                getattr(self._skipped, name).extend(getattr(skipped, name))
            self._open()  # they ride with the shard being filled
        start = 0
        while start < len(vectors):
            stream = self._open()
            take = min(len(vectors) - start, self.rows_per_shard - stream.count)
            stream.write(vectors[start : start + take])
            self._rows.extend(rows.cut(start, start + take))
            start += take
            if stream.count >= self.rows_per_shard:
                self._commit()

    def close(self) -> list[int]:
        """Commit the shard being filled (if it has anything); the numbers of all shards written."""
        if self._stream is not None and (self._stream.count or len(self._skipped)):
            self._commit()
        elif self._stream is not None:
            self._stream.abort()
            self._stream = None
        return self.written

    def _open(self) -> _NpyStream:
        if self._stream is None:
            self._stream = _NpyStream(self.folder / shard_name("fc7", self.next_shard), self.dim)
            self._stream.__enter__()
        return self._stream

    def _commit(self) -> None:
        stream, number = self._stream, self.next_shard
        assert stream is not None
        _commit_tables(self.folder, number, self._rows, self._skipped, stream.count)
        stream.__exit__(None, None, None)
        self.written.append(number)
        self._stream, self._rows, self._skipped = None, ShardRows(), SkippedRows()
        self.next_shard += 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        elif self._stream is not None:
            self._stream.abort()
            self._stream = None


@dataclass
class Shard:
    """One checked shard: ``vectors`` (memory-mapped, N x dim float32) and its metadata."""

    number: int
    vectors: np.ndarray
    metadata: Any  # pyarrow.Table with METADATA_COLUMNS
    skipped: Any  # pyarrow.Table with SKIPPED_COLUMNS


@dataclass
class ShardSet:
    """A folder of shards: its identity, and its shards in number order (read lazily)."""

    folder: Path
    identity: dict[str, Any]
    numbers: list[int]

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    @property
    def model(self) -> dict[str, Any]:
        return self.identity["model"]

    def __len__(self) -> int:
        return len(self.numbers)

    def __iter__(self) -> Iterator[Shard]:
        for number in self.numbers:
            yield read_shard(self.folder, number, self.dim)


def open_shards(folder: Path, expect: Sequence[int] | None = None) -> ShardSet:
    """The shards in ``folder``; refuse an unfinished one, and any of ``expect`` that is missing."""
    folder = Path(folder)
    identity = read_identity(folder)
    found: dict[str, set[int]] = {"fc7": set(), "metadata": set(), "skipped": set()}
    for entry in os.listdir(folder):
        match = _SHARD.match(entry)
        if match:
            found[match.group(1)].add(int(match.group(2)))
    unfinished = sorted((found["metadata"] | found["skipped"]) - found["fc7"])
    if unfinished:
        raise ShardError(
            f"{folder}: shard {unfinished[0]} has metadata but no "
            f"{shard_name('fc7', unfinished[0])} (its write did not finish); "
            "run the extraction again to complete it"
        )
    orphans = sorted(found["fc7"] - found["metadata"])
    if orphans:
        raise ShardError(f"{folder}: {shard_name('fc7', orphans[0])} has no metadata file")
    missing = sorted(set(expect or ()) - found["fc7"])
    if missing:
        raise ShardError(
            f"{folder}: {len(missing)} planned shard(s) missing, the first "
            f"{shard_name('fc7', missing[0])}; the run did not finish (run it again to resume)"
        )
    return ShardSet(folder, identity, sorted(found["fc7"]))


def read_shard(folder: Path, number: int, dim: int) -> Shard:
    """One shard, checked: float32 N x dim, every value finite, metadata of N rows."""
    _, pq = _pyarrow()
    path = Path(folder) / shard_name("fc7", number)
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable ({exc})") from None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ShardError(
            f"{path}: holds {vectors.dtype} {vectors.shape}, expected float32 N x {dim}"
        )
    for start in range(0, len(vectors), CHECK_ROWS):
        block = vectors[start : start + CHECK_ROWS]
        if not np.isfinite(block).all():
            row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ShardError(f"{path}: row {row} is not finite (NaN or inf); re-extract it")
    tables = []
    for kind, columns in (("metadata", METADATA_COLUMNS), ("skipped", SKIPPED_COLUMNS)):
        table_path = Path(folder) / shard_name(kind, number)
        try:
            table = pq.read_table(table_path)
        except FileNotFoundError:
            if kind == "skipped":  # written by another tool: no skipped files recorded
                tables.append(None)
                continue
            raise ShardError(f"{table_path}: missing") from None
        except Exception as exc:  # pyarrow's errors are many classes; any means unusable
            raise ShardError(f"{table_path}: unreadable ({exc})") from None
        absent = [name for name in columns if name not in table.column_names]
        if absent:
            raise ShardError(f"{table_path}: no column {absent[0]!r}")
        tables.append(table)
    if tables[0].num_rows != len(vectors):
        raise ShardError(f"{path}: {len(vectors)} vectors but {tables[0].num_rows} metadata rows")
    return Shard(number, vectors, tables[0], tables[1])


class _NpyStream:
    """A ``.npy`` written row block by row block to a hidden file, renamed on success."""

    def __init__(self, target: Path, dim: int) -> None:
        self.target, self.dim, self.count = Path(target), dim, 0
        self.handle = None

    def __enter__(self) -> _NpyStream:
        self.tmp = temporary_beside(self.target)
        self.handle = open(self.tmp, "wb")
        self.handle.write(_npy_header(0, self.dim))
        return self

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype="<f4")
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"expected N x {self.dim} vectors, got {block.shape}")
        self.handle.write(block.tobytes())
        self.count += len(block)

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
            self.tmp.unlink(missing_ok=True)

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.abort()
            return
        self.handle.seek(0)
        self.handle.write(_npy_header(self.count, self.dim))
        self.handle.close()
        self.handle = None
        replace_durably(self.tmp, self.target)


def _npy_header(rows: int, dim: int) -> bytes:
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body = text.encode("latin1").ljust(_HEADER_BYTES - 10 - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body
