"""The read side of an index directory: the manifest, and a snapshot of one committed generation.

See ``FORMAT.md`` beside this file for the layout. Committed files are never modified: a writer
(``generation``) builds generation g+1 beside g and then atomically replaces ``manifest.json``,
the single commit point. A reader follows the manifest it read, so it sees g or g+1, never a mix;
a crash at any moment leaves the last committed generation intact. The format's names and version
live here, and the writer imports them: readers never depend on the writer.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.errors import IndexCorruptError, IndexNotFoundError

from . import exact
from .rows import ROW_COLUMNS, Row, name_to_db, row_from_db

log = logging.getLogger(__name__)

FORMAT = "retrieve-index"
# 2: the manifest records the model identity (weights, architecture, preprocessing, layer,
# precision, reduction, normalisation) and the weights' absolute path. Version 1 is still read.
FORMAT_VERSION = 2
OLDEST_READ = 1
MANIFEST = "manifest.json"
# How often a reader retries when a writer retired the generation it was about to open.
OPEN_ATTEMPTS = 5
REBUILD = "rebuild it with `retrieve index FOLDER --rebuild`"


def default_index_dir() -> Path:
    """``$RETRIEVE_INDEX`` or ``.retrieve`` in the current directory."""
    return Path(os.environ.get("RETRIEVE_INDEX") or ".retrieve")


def _connect_read_only(path: Path) -> sqlite3.Connection:
    # immutable=1: a committed generation never changes, so no locks and no journal are needed.
    uri = f"file:{path.as_posix()}?mode=ro&immutable=1"
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    connection.execute("SELECT count(*) FROM images").fetchone()
    return connection


@dataclass(frozen=True)
class RowFilter:
    """Which rows: one status, paths below a folder, one label, a path substring."""

    status: str | None = None
    under: str | None = None
    label: str | None = None
    contains: str | None = None


class Snapshot:
    """A consistent, read-only view of one committed generation."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        files = manifest["files"]
        self.vectors_path = directory / files["vectors"]
        self.rows_path = directory / files["rows"]
        # One SQLite connection serves every thread; its calls are serialised here.
        self._db_lock = threading.Lock()
        self._open_lock = threading.Lock()
        # Both files are opened now: a writer may retire them right after, and an open file
        # outlives its name, so this snapshot stays whole however long it is used.
        self._vectors_file = open(self.vectors_path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self.rows = _connect_read_only(self.rows_path)
        except sqlite3.DatabaseError as exc:
            self._vectors_file.close()
            if not self.rows_path.exists():  # retired by a writer between the two opens: retry
                raise FileNotFoundError(self.rows_path) from exc
            raise IndexCorruptError(f"{self.rows_path} is damaged ({exc}); {REBUILD}") from exc
        except BaseException:
            self._vectors_file.close()
            raise
        try:
            self._rows_bytes = self.rows_path.stat().st_size
        except FileNotFoundError:  # retired just after we connected: the caller retries
            self.close()
            raise
        self._index: faiss.Index | None = None
        self._mapped: faiss.Index | None = None
        self._exact: exact.MappedFlat | bool | None = False  # False: not looked at yet

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index(self) -> faiss.Index:
        """The FAISS index read whole, on first use (``info`` and ``remove`` may never need it).
        Read with ``pread`` from this snapshot's open file, so no file offset is shared."""
        if self._index is None:
            fd, read_at = self._vectors_file.fileno(), 0

            def read(size: int) -> bytes:
                nonlocal read_at
                data = os.pread(fd, size, read_at)
                read_at += len(data)
                return data

            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(read))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
                raise self._damaged(first) from exc
            self._check_holds(index.d, index.ntotal)
            self._index = index
        return self._index

    def search_index(self) -> faiss.Index:
        """The FAISS index for searching: memory-mapped read-only where the OS allows it
        (``IO_FLAG_MMAP_IFC`` through this snapshot's own open file, which outlives a writer's
        retiring it), so opening costs no read of the vectors. Never modify it."""
        with self._open_lock:
            if self._mapped is None:
                self._mapped = self._read_mapped()
            return self._mapped

    def _read_mapped(self) -> faiss.Index:
        own = f"/proc/self/fd/{self._vectors_file.fileno()}"
        if not os.path.exists(own) or not hasattr(faiss, "IO_FLAG_MMAP_IFC"):
            return self.index  # no /proc (macOS) or a faiss before 1.10: read it whole
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(own, flags)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
            raise self._damaged(first) from exc
        self._check_holds(index.d, index.ntotal)
        return index

    def mapped_flat(self) -> exact.MappedFlat | None:
        """The exact searcher's view of the vectors and ids in :meth:`search_index`'s mapping
        when the file is the default ``IDMap2,Flat``, else None. Reads no vectors."""
        index = self.search_index()
        with self._open_lock:
            if self._exact is False:
                self._exact = exact.flat_view(index)
            return self._exact

    def flat_vector_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
        """``(vectors, ids)`` blocks, read-only views of the mapping, when the file is an
        ``IDMap2,Flat`` index, else None: copying them into the next generation then costs one
        block of RAM, not the index."""
        flat = self.mapped_flat()
        return None if flat is None else flat.blocks()

    def _damaged(self, why: str) -> IndexCorruptError:
        return IndexCorruptError(f"{self.vectors_path} is damaged ({why}); {REBUILD}")

    def _check_holds(self, dim: int, ntotal: int) -> None:
        """The vectors file must hold what the manifest says, or the index is damaged."""
        if (ntotal, dim) != (self.count, self.dim):
            raise IndexCorruptError(
                f"{self.vectors_path} holds {ntotal} vectors of {dim}-d but the "
                f"manifest says {self.count} of {self.dim}-d; {REBUILD}"
            )

    def _fetch(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._db_lock:
            return self.rows.execute(query, params).fetchall()

    def rows_by_id(self, ids: Iterable[int]) -> dict[int, Row]:
        wanted = sorted({int(i) for i in ids if i >= 0})
        found: dict[int, Row] = {}
        for start in range(0, len(wanted), 900):  # SQLite caps bound parameters
            part = wanted[start : start + 900]
            marks = ",".join("?" * len(part))
            query = f"SELECT {ROW_COLUMNS} FROM images WHERE id IN ({marks})"
            for values in self._fetch(query, part):
                found[values[0]] = row_from_db(values)
        return found

    def iter_rows(
        self,
        status: str | None = None,
        under: str | None = None,
        *,
        label: str | None = None,
        contains: str | None = None,
    ) -> Iterator[Row]:
        """Rows in id order, optionally only one status, paths below a folder, one label, or
        paths holding a substring (the same filter as :meth:`find_rows`, in pages)."""
        where = RowFilter(status=status, under=under, label=label, contains=contains)
        query, params = self._where(where)
        last = -1
        while True:  # in pages, so other threads get the connection in between
            page = self._fetch(
                f"SELECT {ROW_COLUMNS} FROM images {query} AND id > ? ORDER BY id LIMIT 1000",
                [*params, last],
            )
            yield from map(row_from_db, page)
            if len(page) < 1000:
                return
            last = page[-1][0]

    def find_rows(self, where: RowFilter, offset: int = 0, limit: int = 100) -> list[Row]:
        """One page of rows in id order that pass ``where``."""
        query, params = self._where(where)
        sql = f"SELECT {ROW_COLUMNS} FROM images {query} ORDER BY id LIMIT ? OFFSET ?"
        return [row_from_db(v) for v in self._fetch(sql, [*params, int(limit), int(offset)])]

    def count_rows(self, where: RowFilter) -> int:
        query, params = self._where(where)
        return int(self._fetch(f"SELECT count(*) FROM images {query}", params)[0][0])

    def label_counts(self, status: str | None = "indexed") -> dict[str, int]:
        """Rows per label (parent folder name), most common first."""
        query, params = self._where(RowFilter(status=status))
        sql = f"SELECT label, count(*) AS n FROM images {query} GROUP BY label ORDER BY n DESC"
        return {os.fsdecode(label): int(n) for label, n in self._fetch(sql, params)}

    @staticmethod
    def _where(where: RowFilter) -> tuple[str, list[Any]]:
        clauses, params = ["1=1"], []
        if where.status:
            clauses.append("status = ?")
            params.append(where.status)
        if where.under:
            prefix = name_to_db(where.under.rstrip(os.sep) + os.sep)
            clauses.append("substr(path, 1, ?) = ?")
            params += [len(prefix), prefix]
        if where.label is not None:
            clauses.append("label = ?")
            params.append(name_to_db(where.label))
        if where.contains:
            clauses.append("instr(path, ?) > 0")
            params.append(name_to_db(where.contains))
        return "WHERE " + " AND ".join(clauses), params

    def row_for_path(self, path: str) -> Row | None:
        found = self._fetch(f"SELECT {ROW_COLUMNS} FROM images WHERE path = ?", (name_to_db(path),))
        return row_from_db(found[0]) if found else None

    @property
    def vectors_bytes(self) -> int:
        """Size of the vectors file, from the open file (a writer may have retired its name)."""
        return os.fstat(self._vectors_file.fileno()).st_size

    def size_on_disk(self) -> int:
        """Both files' sizes, as they were when this snapshot opened them."""
        return self.vectors_bytes + self._rows_bytes

    def close(self) -> None:
        """Close the files; mapped vectors already handed out stay readable until dropped."""
        with self._db_lock:
            self.rows.close()
        self._vectors_file.close()


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
    if version < OLDEST_READ:
        raise IndexCorruptError(
            f"{directory} uses the old index format {version} (this retrieve reads "
            f"{OLDEST_READ} to {FORMAT_VERSION}); {REBUILD}"
        )
    if "identity" not in manifest:
        manifest["identity"] = _identity_of_version_1(manifest)
    return manifest


def _identity_of_version_1(manifest: dict[str, Any]) -> dict[str, Any]:
    """Format 1 recorded the model but not the precision: it is taken as fp32, the default of
    every version that wrote format 1 (bf16 had to be asked for), and said to be assumed."""
    model, kind = manifest["model"], manifest.get("index", {})
    return {
        "weights_sha256": model["sha256"],
        "arch": model["arch"],
        "preprocessing": model["preprocessing"],
        "dim": int(manifest["dim"]),
        "layer": model.get("layer", "fc7"),
        "precision": "fp32",
        "reduce": kind.get("reduce"),
        "normalize": bool(kind.get("normalize", False)),
        "assumed": ["precision"],
    }


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
