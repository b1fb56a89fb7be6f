"""Finished chunks of an unfinished run, so a killed ``retrieve index`` resumes where it stopped.

Each chunk file holds the features and per-file records of up to ``chunk_size`` files and is
written atomically, so after ``kill -9`` every chunk on disk is whole. Entries are keyed by
(path, size, mtime_ns): a file changed since it was staged is extracted again. A staging folder
made with another model is thrown away.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

STAGING = "staging"
IDENTITY = "identity.json"


@dataclass
class StagedFile:
    """One extracted (or skipped) file: what the next generation's row will say."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    reason: str | None = None
    detail: str = ""
    row: int = -1  # row of ``features`` in its chunk; -1 for a skipped file

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


class Staging:
    """The ``staging/`` folder of an index directory."""

    def __init__(self, index_dir: Path, identity: dict[str, Any]) -> None:
        self.directory = Path(index_dir) / STAGING
        identity = json.loads(json.dumps(identity, sort_keys=True))  # as it reads back from disk
        self.identity = identity
        identity_file = self.directory / IDENTITY
        if self.directory.exists():
            try:
                previous = json.loads(identity_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = None
            if previous != identity:
                log.info("discarding staged chunks of a run with another model or layout")
                shutil.rmtree(self.directory)
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            atomic_write_text(identity_file, json.dumps(identity, sort_keys=True))

    def chunk_paths(self) -> list[Path]:
        return sorted(self.directory.glob("chunk-*.npz"))

    def load_entries(self) -> dict[tuple[str, int, int], tuple[Path, StagedFile]]:
        """Every staged file, by key, with the chunk that holds its features."""
        entries: dict[tuple[str, int, int], tuple[Path, StagedFile]] = {}
        for chunk in self.chunk_paths():
            for staged in read_records(chunk):
                entries[staged.key] = (chunk, staged)
        return entries

    def write_chunk(self, files: Sequence[StagedFile], features: np.ndarray) -> Path:
        number = len(self.chunk_paths())
        target = self.directory / f"chunk-{number:06d}.npz"
        while target.exists():
            number += 1
            target = self.directory / f"chunk-{number:06d}.npz"
        records = json.dumps([asdict(f) for f in files]).encode("utf-8")
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                features=np.ascontiguousarray(features, dtype=np.float32),
                records=np.frombuffer(records, dtype=np.uint8),
            )
        return target

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def read_records(chunk: Path) -> list[StagedFile]:
    with np.load(chunk, allow_pickle=False) as data:
        return [StagedFile(**r) for r in json.loads(data["records"].tobytes().decode("utf-8"))]


def iter_chunk_features(chunks: Sequence[Path]) -> Iterator[tuple[list[StagedFile], np.ndarray]]:
    """(records, features) of each chunk, one chunk in memory at a time."""
    for chunk in chunks:
        with np.load(chunk, allow_pickle=False) as data:
            records = json.loads(data["records"].tobytes().decode("utf-8"))
            yield [StagedFile(**r) for r in records], data["features"]
