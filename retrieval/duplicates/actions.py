"""What to do with duplicates, undoably: move them aside, or replace them by links.

Nothing is deleted. ``move`` puts each duplicate under ``--to`` (its absolute path mirrored
below that folder, so names never collide); ``hardlink`` / ``symlink`` do the same and then put
a link to the group's representative where the duplicate was, so every path still opens. Each
step is appended to a JSON-lines log (flushed and fsynced before the next), with the file's
sha256, so :func:`undo` can put every byte back, newest step first, and refuses to overwrite a
file that appeared since.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.duplicates.groups import Group
from retrieval.errors import RetrieveError

ACTIONS = ("report", "move", "hardlink", "symlink")


@dataclass
class ActionReport:
    log: Path | None = None
    done: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def planned_steps(groups: Iterable[Group], target: Path) -> list[tuple[str, str, Path]]:
    """(duplicate, its representative, where it goes) for every non-representative member
    outside the reference folders."""
    steps, seen = [], set()
    for group in groups:
        for member in group.members[1:]:
            if member.reference:  # under a --reference folder: never moved or linked
                continue
            if member.path in seen:  # also in an exact group: the first plan wins
                continue
            seen.add(member.path)
            steps.append((member.path, group.representative, mirrored(target, member.path)))
    return steps


def tangled_with(groups: Iterable[Group], target: Path) -> Path | None:
    """A folder holding a member of ``groups`` that ``target`` lies inside, or that lies inside
    ``target`` (None when there is none): duplicates moved there would stay in the collection."""
    for group in groups:
        for member in group.members:
            folder = Path(os.path.dirname(os.path.abspath(member.path)))
            if target == folder or folder in target.parents or target in folder.parents:
                return folder
    return None


def mirrored(target: Path, path: str) -> Path:
    absolute = Path(os.path.abspath(path))
    return Path(target) / absolute.relative_to(absolute.anchor)


def apply(
    groups: Iterable[Group], action: str, target: Path, log_path: Path | None = None
) -> ActionReport:
    """Carry out ``action`` on every duplicate; each step logged before the next starts."""
    if action not in ACTIONS[1:]:
        raise RetrieveError(f"--action must be one of {', '.join(ACTIONS[1:])}")
    target = Path(os.path.abspath(target))
    groups = list(groups)
    tangled = tangled_with(groups, target)
    if tangled:
        raise RetrieveError(
            f"--to {target} and {tangled} lie one inside the other: indexing that folder again "
            "would find the moved duplicates there; choose a folder outside the collection"
        )
    target.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = Path(log_path or target / f"duplicates-{stamp}.log.jsonl")
    report = ActionReport(log=log_path)
    with open(log_path, "a", encoding="utf-8") as log:
        for path, representative, destination in planned_steps(groups, target):
            problem = _one_step(path, representative, destination, action, log, report)
            if problem:
                report.problems.append(f"{path}: {problem}")
    return report


def _one_step(path, representative, destination, action, log, report) -> str | None:
    if not os.path.isfile(path) or os.path.islink(path):
        return "no longer a regular file; left alone"
    if os.path.lexists(destination):
        return f"{destination} already exists; left alone"
    if action != "move" and not os.path.isfile(representative):
        return f"its representative {representative} is gone; left alone"
    digest = sha256_of(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, destination)
    entry = {"action": action, "path": path, "moved_to": str(destination), "sha256": digest}
    if action == "hardlink":
        try:
            os.link(representative, path)
        except OSError as exc:  # another file system, or links not allowed: keep it a move
            entry["link_error"] = str(exc)
            entry["action"] = "move"
    elif action == "symlink":
        os.symlink(os.path.abspath(representative), path)
    entry["representative"] = representative
    log.write(json.dumps(entry, ensure_ascii=True) + "\n")
    log.flush()
    os.fsync(log.fileno())
    report.done.append(entry)
    return None


def undo(log_path: Path) -> ActionReport:
    """Reverse every step in ``log_path``, last first: remove the link we made (only if it is
    still ours), move the original back, check its sha256."""
    try:
        lines = Path(log_path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RetrieveError(f"{log_path}: cannot read the log ({exc.strerror})") from None
    try:
        entries = [json.loads(line) for line in lines if line.strip()]
    except ValueError:
        raise RetrieveError(f"{log_path}: not a log written by retrieve duplicates") from None
    report = ActionReport(log=Path(log_path))
    for entry in reversed(entries):
        problem = _undo_one(entry)
        if problem:
            report.problems.append(f"{entry.get('path')}: {problem}")
        else:
            report.done.append(entry)
            _prune_empty(Path(entry["moved_to"]).parent, Path(log_path).parent)
    return report


def _prune_empty(folder: Path, root: Path) -> None:
    """The folders a step made under --to (the log's folder), emptied by its undo, removed up
    to ``root``: never ``root`` itself, never a folder that still holds anything."""
    folder, root = folder.resolve(), root.resolve()
    while root in folder.parents:
        try:
            folder.rmdir()  # only ever an empty folder
        except OSError:
            return
        folder = folder.parent


def _undo_one(entry: dict) -> str | None:
    path, moved = entry.get("path"), entry.get("moved_to")
    if not path or not moved or entry.get("action") not in ACTIONS[1:]:
        return "not a step this tool logs; skipped"
    if not os.path.isfile(moved):
        return f"{moved} is gone; cannot restore"
    if sha256_of(moved) != entry["sha256"]:
        return f"{moved} changed since it was moved; left there"
    if os.path.lexists(path):
        if not _is_our_link(path, entry):
            return "a different file is there now; left alone (the original stays in --to)"
        os.unlink(path)  # a link this tool made; the bytes it points to are the representative's
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(moved, path)
    return None


def _is_our_link(path: str, entry: dict) -> bool:
    representative = entry.get("representative", "")
    if entry["action"] == "symlink":
        return os.path.islink(path) and os.readlink(path) == os.path.abspath(representative)
    if entry["action"] == "hardlink":
        try:
            return os.path.samefile(path, representative)
        except OSError:
            return False
    return False


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
