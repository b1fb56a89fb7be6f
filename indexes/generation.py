"""The write side of an index directory: the write lock, and building generation g+1 beside g.

See ``FORMAT.md`` beside this file. Each file of the new generation is written to a temporary
name, fsynced and renamed; ``manifest.json`` is replaced last, the single commit point, and only
then are the files of g deleted. A crash at any moment leaves g or g+1 whole, and the next writer
removes the leftovers. This module imports the format's names and :class:`Snapshot` from
``store``; the reader never imports the writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import faiss

from retrieval.atomic import atomic_path, atomic_write_text, fsync_dir
from retrieval.errors import IndexLockedError, RetrieveError

from . import flat_file
from .rows import SCHEMA, RowUpdate, name_to_db
from .store import FORMAT, FORMAT_VERSION, MANIFEST, Snapshot

# Taken by writers only: a reader needs no lock, since committed files never change.
LOCK = "lock"


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
                name_to_db(u.path),
                u.size,
                u.mtime_ns,
                u.sha256,
                name_to_db(u.label),
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


def annotate_manifest(directory: Path, extra: dict[str, Any]) -> None:
    """Add facts about the current generation (not its contents) to its manifest, atomically,
    under the write lock: readers see the manifest before or after, both valid."""
    path = directory / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    atomic_write_text(path, json.dumps({**manifest, **extra}, indent=2) + "\n")


def remove_unreferenced(directory: Path, manifest: dict[str, Any] | None) -> None:
    """Delete generation files a crash or a commit left behind (only under the write lock)."""
    keep = set(manifest["files"].values()) if manifest else set()
    for path in directory.iterdir():
        generated = path.name.startswith(("rows.", "vectors.", ".rows.", ".vectors."))
        if path.is_file() and generated and path.name not in keep:
            path.unlink(missing_ok=True)
