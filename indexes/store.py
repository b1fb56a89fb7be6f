"""The index directory: manifest, SQLite rows and FAISS vectors, written in atomic generations.

See ``FORMAT.md`` beside this file for the layout. Committed files are never modified: a writer
builds generation g+1 beside g and then atomically replaces ``manifest.json``, the single commit
point. A reader follows the manifest it read, so it sees g or g+1, never a mix; a crash at any
moment leaves the last committed generation intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from retrieval.atomic import atomic_path, atomic_write_text, fsync_dir
from retrieval.errors import (
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    RetrieveError,
)

from . import flat_file

log = logging.getLogger(__name__)

FORMAT = "retrieve-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "lock"
# How often a reader retries when a writer retired the generation it was about to open.
OPEN_ATTEMPTS = 5

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of removed rows are never reused
    path BLOB NOT NULL UNIQUE,             -- absolute path, as the file system's bytes
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    label BLOB NOT NULL,                   -- name of the parent folder, as bytes
    status TEXT NOT NULL CHECK (status IN ('indexed', 'skipped')),
    reason TEXT,                           -- why a skipped file was skipped
    detail TEXT
);
"""


@dataclass(frozen=True)
class Row:
    """One file of the collection: indexed (it has a vector with this id) or skipped."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    label: str
    status: str
    reason: str | None = None
    detail: str | None = None


ROW_COLUMNS = "id, path, size, mtime_ns, sha256, label, status, reason, detail"


def _to_db(name: str) -> bytes:
    # File names need not be valid UTF-8; their bytes always are what the file system gave.
    return os.fsencode(name)


def _row(values: tuple) -> Row:
    row_id, path, size, mtime_ns, sha256, label, *rest = values
    return Row(row_id, os.fsdecode(path), size, mtime_ns, sha256, os.fsdecode(label), *rest)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    # immutable=1: a committed generation never changes, so no locks and no journal are needed.
    uri = f"file:{path.as_posix()}?mode=ro&immutable=1"
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    connection.execute("SELECT count(*) FROM images").fetchone()
    return connection


class Snapshot:
    """A consistent, read-only view of one committed generation."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        files = manifest["files"]
        self.vectors_path = directory / files["vectors"]
        self.rows_path = directory / files["rows"]
        # Both files are opened now: a writer may retire them right after, and an open file
        # outlives its name, so this snapshot stays whole however long it is used.
        self._vectors_file = open(self.vectors_path, "rb")  # noqa: SIM115 - closed in close()
        try:
            if not self.rows_path.exists():
                raise FileNotFoundError(self.rows_path)
            self.rows = _connect_read_only(self.rows_path)
        except sqlite3.DatabaseError as exc:
            self._vectors_file.close()
            raise IndexCorruptError(f"{self.rows_path} is damaged ({exc}); {REBUILD}") from exc
        except BaseException:
            self._vectors_file.close()
            raise
        self._index: faiss.Index | None = None

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index(self) -> faiss.Index:
        """The FAISS index, read on first use (``info`` and ``remove`` may never need it)."""
        if self._index is None:
            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(self._vectors_file.read))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
                raise IndexCorruptError(
                    f"{self.vectors_path} is damaged ({first}); {REBUILD}"
                ) from exc
            if index.ntotal != self.count or index.d != self.dim:
                raise IndexCorruptError(
                    f"{self.vectors_path} holds {index.ntotal} vectors of {index.d}-d but the "
                    f"manifest says {self.count} of {self.dim}-d; {REBUILD}"
                )
            self._index = index
        return self._index

    def flat_vector_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
        """``(vectors, ids)`` blocks when the file is an ``IDMap2,Flat`` index, else None:
        copying them into the next generation then costs one block of RAM, not the index."""
        shape = flat_file.flat_shape(self._vectors_file)
        if shape is None:
            return None
        if shape != (self.dim, self.count):
            raise IndexCorruptError(
                f"{self.vectors_path} holds {shape[1]} vectors of {shape[0]}-d but the "
                f"manifest says {self.count} of {self.dim}-d; {REBUILD}"
            )
        return self._checked(flat_file.read_flat_blocks(self._vectors_file))

    def _checked(
        self, blocks: Iterator[tuple[np.ndarray, np.ndarray]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            yield from blocks
        except flat_file.FlatLayoutError as exc:
            raise IndexCorruptError(f"{self.vectors_path} is damaged ({exc}); {REBUILD}") from exc

    def rows_by_id(self, ids: Iterable[int]) -> dict[int, Row]:
        wanted = sorted({int(i) for i in ids if i >= 0})
        found: dict[int, Row] = {}
        for start in range(0, len(wanted), 900):  # SQLite caps bound parameters
            part = wanted[start : start + 900]
            marks = ",".join("?" * len(part))
            query = f"SELECT {ROW_COLUMNS} FROM images WHERE id IN ({marks})"
            for values in self.rows.execute(query, part):
                found[values[0]] = _row(values)
        return found

    def iter_rows(self, status: str | None = None, under: str | None = None) -> Iterator[Row]:
        """Rows in id order, optionally only one status or only paths below a folder."""
        query, params = f"SELECT {ROW_COLUMNS} FROM images WHERE 1=1", []
        if status:
            query += " AND status = ?"
            params.append(status)
        if under:
            prefix = _to_db(under.rstrip(os.sep) + os.sep)
            query += " AND substr(path, 1, ?) = ?"
            params += [len(prefix), prefix]
        for values in self.rows.execute(query + " ORDER BY id", params):
            yield _row(values)

    def row_for_path(self, path: str) -> Row | None:
        values = self.rows.execute(
            f"SELECT {ROW_COLUMNS} FROM images WHERE path = ?", (_to_db(path),)
        ).fetchone()
        return _row(values) if values else None

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in (self.vectors_path, self.rows_path))

    def close(self) -> None:
        self.rows.close()
        self._vectors_file.close()


REBUILD = "rebuild it with `retrieve index FOLDER --rebuild`"


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not Path(directory).exists():
        raise IndexNotFoundError(
            f"no index at {directory}; build one with `retrieve index FOLDER` (or pass --index)"
        )
    if not path.exists():
        raise IndexNotFoundError(
            f"{directory} holds no index (no {MANIFEST}); build one with `retrieve index FOLDER`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        fmt, version = manifest["format"], int(manifest["version"])
        manifest["files"]["vectors"], manifest["files"]["rows"]
        int(manifest["count"]), int(manifest["dim"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{path} is damaged ({type(exc).__name__}); {REBUILD}") from exc
    if fmt != FORMAT:
        raise IndexCorruptError(f"{path} is not a retrieve index manifest")
    if version > FORMAT_VERSION:
        raise IndexCorruptError(
            f"{directory} was written by a newer retrieve (format {version}); upgrade retrieve"
        )
    if version < FORMAT_VERSION:
        raise IndexCorruptError(
            f"{directory} uses the old index format {version} (this retrieve reads "
            f"{FORMAT_VERSION}); {REBUILD}"
        )
    return manifest


def open_snapshot(directory: Path) -> Snapshot:
    """The committed generation; retried if a writer retires it while we open it."""
    directory = Path(directory)
    for _ in range(OPEN_ATTEMPTS):
        manifest = read_manifest(directory)
        try:
            return Snapshot(directory, manifest)
        except FileNotFoundError:
            time.sleep(0.05)
    manifest = read_manifest(directory)
    missing = [name for name in manifest["files"].values() if not (directory / name).exists()]
    raise IndexCorruptError(f"{directory}: {', '.join(missing)} missing; {REBUILD}")


@contextlib.contextmanager
def write_lock(directory: Path) -> Iterator[None]:
    """One writer at a time; the OS drops the lock if the writer dies, even by SIGKILL."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK, "a+")  # noqa: SIM115 - held for the whole with-block
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IndexLockedError(
            f"another `retrieve` is writing the index at {directory}; wait for it to finish"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@dataclass
class RowUpdate:
    """A row to insert (``id`` None) or to replace (same id, same path) in the next generation."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    label: str
    status: str
    reason: str | None = None
    detail: str | None = None
    id: int | None = None


def _next_generation_name(directory: Path, stem: str, suffix: str, generation: int) -> Path:
    return directory / f"{stem}.{generation}{suffix}"


class GenerationWriter:
    """Builds generation g+1 from g plus changes; ``commit`` makes it the current one."""

    def __init__(self, directory: Path, base: Snapshot | None, *, copy_rows: bool = True) -> None:
        self.directory = directory
        self.base = base
        self.generation = (base.manifest["generation"] + 1) if base else 1
        self.rows_path = _next_generation_name(directory, "rows", ".sqlite", self.generation)
        self.vectors_path = _next_generation_name(directory, "vectors", ".faiss", self.generation)
        self._rows_tmp = self.rows_path.with_name(self.rows_path.name + ".tmp")
        self._rows_tmp.unlink(missing_ok=True)
        if base and copy_rows:
            shutil.copyfile(base.rows_path, self._rows_tmp)
        self.rows = sqlite3.connect(self._rows_tmp)
        self.rows.executescript(SCHEMA)
        self.rows.execute("PRAGMA synchronous = OFF")  # durability comes from fsync at commit
        self._streamed: BinaryIO | None = None
        self._streamed_tmp = self.vectors_path.with_name(f".{self.vectors_path.name}.stream.tmp")

    def delete_rows(self, ids: Sequence[int]) -> None:
        self.rows.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in ids])

    def upsert_rows(self, updates: Sequence[RowUpdate]) -> list[int]:
        """Write rows; returns their ids (new ids for inserts)."""
        ids = []
        for u in updates:
            values = (
                _to_db(u.path),
                u.size,
                u.mtime_ns,
                u.sha256,
                _to_db(u.label),
                u.status,
                u.reason,
                u.detail,
            )
            if u.id is None:
                cursor = self.rows.execute(
                    "INSERT INTO images (path, size, mtime_ns, sha256, label, status, reason, "
                    "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
                ids.append(int(cursor.lastrowid))
            else:
                self.rows.execute(
                    "UPDATE images SET path=?, size=?, mtime_ns=?, sha256=?, label=?, status=?, "
                    "reason=?, detail=? WHERE id=?",
                    (*values, u.id),
                )
                ids.append(int(u.id))
        return ids

    def counts(self) -> dict[str, int]:
        query = "SELECT status, count(*) FROM images GROUP BY status"
        counts = dict(self.rows.execute(query).fetchall())
        return {"indexed": counts.get("indexed", 0), "skipped": counts.get("skipped", 0)}

    def stream_flat_index(self, dim: int) -> flat_file.FlatIndexWriter:
        """An ``IDMap2,Flat`` index whose vectors go straight to this generation's file as they
        are added (pass it to :meth:`commit`): indexing memory stays flat however many rows."""
        self._streamed = open(self._streamed_tmp, "wb")  # noqa: SIM115 - closed at commit/abort
        return flat_file.FlatIndexWriter(self._streamed, dim)

    def _write_vectors(self, index: faiss.Index | flat_file.FlatIndexWriter) -> None:
        if not isinstance(index, flat_file.FlatIndexWriter):
            with atomic_path(self.vectors_path) as tmp:
                faiss.write_index(index, str(tmp))
            return
        assert self._streamed is not None, "stream_flat_index() was not called"
        index.finish()
        os.fsync(self._streamed.fileno())
        self._streamed.close()
        self._streamed = None
        os.replace(self._streamed_tmp, self.vectors_path)
        fsync_dir(self.directory)

    def commit(
        self, index: faiss.Index | flat_file.FlatIndexWriter, manifest: dict[str, Any]
    ) -> Snapshot:
        """Write vectors and rows durably, then switch the manifest to them, then retire g."""
        counts = self.counts()
        if index.ntotal != counts["indexed"]:
            raise RetrieveError(
                f"internal error: {index.ntotal} vectors for {counts['indexed']} indexed rows"
            )
        self.rows.commit()
        self.rows.close()
        with open(self._rows_tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self._rows_tmp, self.rows_path)
        self._write_vectors(index)
        manifest = {
            **manifest,
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "generation": self.generation,
            "files": {"vectors": self.vectors_path.name, "rows": self.rows_path.name},
            "count": counts["indexed"],
            "skipped": counts["skipped"],
            "dim": int(index.d),
        }
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if self.base:
            self.base.close()
        remove_unreferenced(self.directory, manifest)
        return Snapshot(self.directory, manifest)

    def abort(self) -> None:
        self.rows.close()
        self._rows_tmp.unlink(missing_ok=True)
        if self._streamed is not None:
            self._streamed.close()
        self._streamed_tmp.unlink(missing_ok=True)


def remove_unreferenced(directory: Path, manifest: dict[str, Any] | None) -> None:
    """Delete generation files a crash or a commit left behind (only under the write lock)."""
    keep = set(manifest["files"].values()) if manifest else set()
    for path in directory.iterdir():
        generated = path.name.startswith(("rows.", "vectors.", ".rows.", ".vectors."))
        if path.is_file() and generated and path.name not in keep:
            path.unlink(missing_ok=True)
