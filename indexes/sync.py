"""A folder against its rows: which files to add, extract again, touch up or remove.

Change detection is cheap first (size and mtime), then exact (content sha256), so copying a
folder or touching a file does not re-run the model, and an edited file always does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .rows import Row

HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class DiskFile:
    path: str
    size: int
    mtime_ns: int


@dataclass
class SyncPlan:
    """What to do to make the index follow the folder."""

    extract: list[DiskFile] = field(default_factory=list)  # new files and edited ones
    touch: list[tuple[Row, DiskFile]] = field(default_factory=list)  # same content, new mtime
    remove: list[Row] = field(default_factory=list)  # gone from disk
    unchanged: int = 0
    existing: dict[str, Row] = field(default_factory=dict)  # rows of files in ``extract``

    @property
    def is_empty(self) -> bool:
        return not (self.extract or self.touch or self.remove)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def stat_files(paths: Sequence[Path]) -> tuple[list[DiskFile], list[tuple[str, str]]]:
    """Size and mtime of each file; files that vanish or cannot be stat'ed are reported."""
    files, problems = [], []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as exc:
            problems.append((str(path), exc.strerror or str(exc)))
            continue
        files.append(DiskFile(str(path), stat.st_size, stat.st_mtime_ns))
    return files, problems


def plan_sync(on_disk: Iterable[DiskFile], rows: Iterable[Row]) -> SyncPlan:
    """Compare the files found under a folder with the index rows under that folder."""
    plan = SyncPlan()
    by_path = {row.path: row for row in rows}
    seen = set()
    for disk in on_disk:
        seen.add(disk.path)
        row = by_path.get(disk.path)
        if row is None:
            plan.extract.append(disk)
        elif row.size == disk.size and row.mtime_ns == disk.mtime_ns:
            plan.unchanged += 1
        elif _same_content(disk.path, row.sha256):
            plan.touch.append((row, disk))
        else:
            plan.extract.append(disk)
            plan.existing[disk.path] = row
    plan.remove = [row for path, row in by_path.items() if path not in seen]
    return plan


def _same_content(path: str, sha256: str) -> bool:
    try:
        return file_sha256(path) == sha256
    except OSError:
        return False  # let extraction read it and record why it cannot
