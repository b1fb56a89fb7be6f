"""The ``signatures`` table of ``duplicates.sqlite``, beside an index: each image's signature
(:mod:`retrieval.images.hashes`) by the sha256 of its bytes.

The build writes the signatures it makes from the images it decodes for the model; the
duplicates pass (``retrieval.duplicates.memory``) reads them and adds those still missing. Keyed
by content, so a renamed or moved file keeps its signature and a re-encoded one gets its own.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.images.hashes import SIDE, ImageSignature

if TYPE_CHECKING:
    from retrieval.extraction.types import FileRecord

log = logging.getLogger(__name__)

FILE = "duplicates.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS signatures (
    sha256 TEXT PRIMARY KEY,
    hashes BLOB NOT NULL,        -- 8 x uint64, little-endian, ISOMETRIES order
    windows BLOB NOT NULL,       -- WINDOWS x uint64, little-endian
    thumb BLOB NOT NULL,         -- SIDE x SIDE grey, uint8
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    grey INTEGER NOT NULL
);
"""

_COLUMNS = "sha256, hashes, windows, thumb, width, height, grey"


def connect(index_dir: Path | str) -> sqlite3.Connection:
    """The index directory's ``duplicates.sqlite``, its signatures table made if missing."""
    db = sqlite3.connect(Path(index_dir) / FILE, check_same_thread=False, timeout=30)
    db.executescript(SCHEMA)
    return db


def read(db: sqlite3.Connection, digests: Iterable[str]) -> dict[str, ImageSignature]:
    """The stored signatures among ``digests``."""
    return {
        digest: ImageSignature(
            np.frombuffer(hashes, "<u8").astype(np.uint64),
            np.frombuffer(windows, "<u8").astype(np.uint64),
            np.frombuffer(thumb, np.uint8).reshape(SIDE, SIDE),
            int(width),
            int(height),
            bool(grey),
        )
        for digest, hashes, windows, thumb, width, height, grey in _stored(db, _COLUMNS, digests)
    }


def unsigned(db: sqlite3.Connection, digests: Iterable[str]) -> set[str]:
    """Those of ``digests`` with no stored signature (their blobs are not read)."""
    wanted = set(digests)
    return wanted - {digest for (digest,) in _stored(db, "sha256", wanted)}


def write(db: sqlite3.Connection, signatures: dict[str, ImageSignature]) -> None:
    """Stores ``signatures`` (by sha256) in one transaction."""
    rows = [
        (
            digest,
            s.hashes.astype("<u8").tobytes(),
            s.windows.astype("<u8").tobytes(),
            np.ascontiguousarray(s.thumb, np.uint8).tobytes(),
            s.width,
            s.height,
            int(s.grey),
        )
        for digest, s in signatures.items()
    ]
    with db:
        db.executemany("INSERT OR REPLACE INTO signatures VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


class Sink:
    """The build's writer: stores the signatures its decoders made, a chunk at a time. They are a
    cache (the duplicates pass makes any that are missing), so a store that cannot be written
    costs a warning, never the run."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir
        self.pending: dict[str, ImageSignature] = {}
        self.stored = 0
        self.db: sqlite3.Connection | None = None
        self.failed = False

    def add(self, records: list[FileRecord]) -> None:
        for record in records:
            if record.ok and record.signature is not None:
                self.pending[record.sha256] = record.signature

    def flush(self) -> None:
        if not self.pending or self.failed:
            self.pending = {}
            return
        try:
            self.db = self.db or connect(self.index_dir)
            fresh = unsigned(self.db, self.pending)  # the same bytes seen before: signed then
            write(self.db, {digest: self.pending[digest] for digest in fresh})
            self.stored += len(fresh)
        except sqlite3.Error as error:
            log.warning("signatures not stored (%s): `retrieve duplicates` will make them", error)
            self.failed = True
        self.pending = {}

    def close(self) -> int:
        """Stores what is left; how many new signatures were stored in all."""
        self.flush()
        if self.db is not None:
            self.db.close()
        return self.stored


def _stored(db: sqlite3.Connection, columns: str, digests: Iterable[str]) -> list[tuple]:
    """``columns`` of the stored signatures among ``digests`` (asked 500 at a time: SQLite
    bounds the parameters of one statement)."""
    wanted = list(dict.fromkeys(digests))
    found: list[tuple] = []
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        query = f"SELECT {columns} FROM signatures WHERE sha256 IN ({marks})"
        found += db.execute(query, chunk).fetchall()
    return found
