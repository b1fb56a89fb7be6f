"""What the duplicates pass keeps beside an index: image signatures, the verifier's verdicts, and
the user's decisions.

One SQLite file, ``duplicates.sqlite`` in the index directory, outside the index's generations:
a re-index (``--rebuild`` too) leaves it alone. Every table is keyed by content (sha256), so a
renamed or moved file keeps its signature, verdicts and decisions, and a re-encoded one does not
inherit them. Signatures and verdicts are caches (recomputed when missing; a verdict is kept
under the fingerprint of the verifier that gave it, and those of another verifier are dropped
when new ones are kept); decisions are the user's word, kept until ``--forget-decisions``.

A directory that cannot be written (a read-only index) still works: the store then lives in
memory for this run, and says so once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retrieval.build import signature_store
from retrieval.images.hashes import ImageSignature

log = logging.getLogger(__name__)

FILE = signature_store.FILE

SCHEMA = (
    signature_store.SCHEMA
    + """
CREATE TABLE IF NOT EXISTS verdicts (
    first TEXT NOT NULL,         -- sha256 of the picture verified first (a verdict has a side)
    second TEXT NOT NULL,
    verifier TEXT NOT NULL,      -- fingerprint of the verifier's code and bars
    verdict TEXT NOT NULL,       -- JSON: the Verdict's fields
    PRIMARY KEY (first, second, verifier)
);
CREATE TABLE IF NOT EXISTS not_duplicates (
    first TEXT NOT NULL,         -- the smaller sha256 of the two
    second TEXT NOT NULL,
    first_path TEXT,             -- the paths when decided, for the user's eyes only
    second_path TEXT,
    decided TEXT NOT NULL,
    PRIMARY KEY (first, second)
);
"""
)


class DuplicatesMemory:
    """The signature cache and the decisions of one index directory."""

    def __init__(self, index_dir: Path | str) -> None:
        self.path = Path(index_dir) / FILE
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self.db.executescript(SCHEMA)
            self.in_memory = False
        except sqlite3.Error as error:
            log.warning(
                "cannot write %s (%s): signatures and decisions last this run only",
                self.path,
                error,
            )
            self.db = sqlite3.connect(":memory:", check_same_thread=False)
            self.db.executescript(SCHEMA)
            self.in_memory = True

    # -- signatures ------------------------------------------------------------------------------

    def signatures(self, digests: Iterable[str]) -> dict[str, ImageSignature]:
        """The stored signatures among ``digests``."""
        with self._lock:
            return signature_store.read(self.db, digests)

    def unsigned(self, digests: Iterable[str]) -> set[str]:
        """Those of ``digests`` with no stored signature (their blobs are not read)."""
        with self._lock:
            return signature_store.unsigned(self.db, digests)

    def keep_signatures(self, signatures: dict[str, ImageSignature]) -> None:
        with self._lock:
            signature_store.write(self.db, signatures)

    # -- verdicts --------------------------------------------------------------------------------

    def verdicts(
        self, pairs: Iterable[tuple[str, str]], verifier: str
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The verdicts ``verifier`` gave earlier on any of ``pairs`` (sha256, sha256), as
        kept by :meth:`keep_verdicts`."""
        with self._lock, self.db:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (first TEXT, second TEXT)")
            self.db.execute("DELETE FROM wanted")
            self.db.executemany("INSERT INTO wanted VALUES (?, ?)", pairs)
            found = self.db.execute(
                "SELECT v.first, v.second, v.verdict FROM verdicts v JOIN wanted w "
                "ON v.first = w.first AND v.second = w.second WHERE v.verifier = ?",
                (verifier,),
            ).fetchall()
            self.db.execute("DELETE FROM wanted")
        return {(a, b): json.loads(verdict) for a, b, verdict in found}

    def keep_verdicts(self, verdicts: dict[tuple[str, str], dict[str, Any]], verifier: str) -> None:
        """Remember ``verdicts`` ((sha256, sha256): fields) under ``verifier``; those another
        verifier gave are forgotten (they would never be asked for again)."""
        rows = [(a, b, verifier, json.dumps(fields)) for (a, b), fields in verdicts.items()]
        with self._lock, self.db:
            self.db.execute("DELETE FROM verdicts WHERE verifier != ?", (verifier,))
            self.db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)", rows)

    # -- decisions -------------------------------------------------------------------------------

    def record_not_duplicate(self, first: tuple[str, str], second: tuple[str, str]) -> bool:
        """Remember that two files (each ``(sha256, path)``) are not duplicates; False when
        they are the same bytes (that cannot be undone by a decision)."""
        (a, path_a), (b, path_b) = sorted([first, second])
        if a == b:
            return False
        with self._lock, self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO not_duplicates VALUES (?, ?, ?, ?, ?)",
                (a, b, path_a, path_b, time.strftime("%Y-%m-%dT%H:%M:%S")),
            )
        return True

    def not_duplicates(self) -> set[tuple[str, str]]:
        """Every (smaller sha256, larger sha256) pair the user said is not a duplicate."""
        with self._lock:
            return {(a, b) for a, b in self.db.execute("SELECT first, second FROM not_duplicates")}

    def forget_decisions(self) -> int:
        """Clear every decision; returns how many there were."""
        with self._lock, self.db:
            return self.db.execute("DELETE FROM not_duplicates").rowcount

    def close(self) -> None:
        with self._lock:
            self.db.close()
