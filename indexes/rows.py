"""The row model: one SQLite row per file found, indexed or skipped.

Shared by the reader (``store``) and the writer (``generation``), so both agree on the table and
on how a file name becomes bytes; it knows nothing of FAISS or of generations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def name_to_db(name: str) -> bytes:
    """A path or label as stored: file names need not be valid UTF-8; their bytes always are
    what the file system gave, so any name round-trips."""
    return os.fsencode(name)


def row_from_db(values: tuple) -> Row:
    """A :class:`Row` from the values of ``SELECT {ROW_COLUMNS}``."""
    row_id, path, size, mtime_ns, sha256, label, *rest = values
    return Row(row_id, os.fsdecode(path), size, mtime_ns, sha256, os.fsdecode(label), *rest)
