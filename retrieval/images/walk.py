"""Folder -> image files: walk a collection and list the files worth decoding.

The walk never stops at a bad entry: unreadable folders, broken symlinks and symlink loops become
:class:`WalkProblem` values to report, and the walk goes on (a user's photo tree has all three).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import RetrieveError
from retrieval.images.diagnose import describe_os_error

logger = logging.getLogger(__name__)

# HEIC/HEIF (iPhone) and AVIF (newer phones) decode through Pillow plugins (images/decode.py).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    | {".heic", ".heif", ".hif", ".avif"}
)
NO_SUFFIX = "(no suffix)"


def label_of(path: str | Path) -> str:
    """An image's label: the name of the folder it sits in (``cats/001.jpg`` is a cat). Every
    index row records it, and retrieval quality and the figures read a query's label the same
    way."""
    return Path(path).parent.name


@dataclass(frozen=True)
class WalkProblem:
    """A path the walk could not enter or resolve; not an image row, but worth telling."""

    path: Path
    reason: str


@dataclass
class Walk:
    """What a walk found: image files, problems, and files of other types by suffix (a RAW or
    a video is never passed over in silence)."""

    files: list[Path]
    problems: list[WalkProblem]
    other_types: Counter
    aliases: int = 0  # file symlinks left out: their file is listed under another path

    def other_types_summary(self, most: int = 6) -> str:
        """``12 files of other types: .cr2 (10), .mov (2)``, or "" when there are none."""
        return describe_other_types(self.other_types, most)


def describe_other_types(counts: Mapping[str, int], most: int = 6) -> str:
    """One line naming the files a walk did not read, by suffix, most common first."""
    total = sum(counts.values())
    if not total:
        return ""
    common = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{suffix} ({n})" for suffix, n in common[:most])
    rest = len(common) - most
    shown += f", {rest} more types" if rest > 0 else ""
    return f"{total} file{'s' if total != 1 else ''} of other types: {shown}"


def is_image_path(path: Path | str) -> bool:
    """Whether the name has one of IMAGE_SUFFIXES, in any case."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def find_images(
    root: Path, *, follow_symlinks: bool = True, include_hidden: bool = False
) -> tuple[list[Path], list[WalkProblem]]:
    """Every image file under root (recursive, sorted by path), plus the problems met on the walk.

    :func:`walk` also counts the files of other types. A root that is an image file gives
    [root]; a root that is missing or neither a folder nor an
    image file raises RetrieveError (one line). Unreadable folders, broken symlinks and symlink
    loops become WalkProblems and the walk goes on.

    Each directory is walked once, by its real path when it lies inside root (symlinked
    directories are followed after the real tree, so an alias never hides the original). A
    symlink back into its own ancestry is a "symlink loop" problem; other aliases of a walked
    directory are skipped quietly. A file symlink is listed under its own path, unless the file
    it points to is listed already (under its real name, or an earlier link's): that file
    would be indexed twice, found as its own duplicate, and moving it as one would break the
    link. Names starting with "." (``.thumbnails``, macOS ``._x.jpg``) are skipped unless
    include_hidden. Only regular files are listed, so a named pipe called x.jpg cannot block a
    reader.
    """
    found = walk(root, follow_symlinks=follow_symlinks, include_hidden=include_hidden)
    return found.files, found.problems


def walk(root: Path, *, follow_symlinks: bool = True, include_hidden: bool = False) -> Walk:
    """:func:`find_images`, plus a count by suffix of the regular files it does not read."""
    root = Path(root)
    try:
        root_stat = root.stat()
    except OSError as error:
        raise RetrieveError(f"{root}: cannot open ({describe_os_error(error)})") from error
    if stat.S_ISREG(root_stat.st_mode):
        if is_image_path(root):
            return Walk([root], [], Counter())
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise RetrieveError(f"{root}: not a folder or an image file ({suffixes})")
    if not stat.S_ISDIR(root_stat.st_mode):
        raise RetrieveError(f"{root}: not a folder or an image file")
    walker = _Walker(follow_symlinks, include_hidden)
    walker.walk(root, root_stat)
    problems = sorted(walker.problems, key=lambda problem: problem.path)
    files, aliases = walker.one_path_a_file()
    return Walk(files, problems, walker.other_types, aliases)


class _Walker:
    """Iterative walk (no recursion limit) that remembers every directory by (st_dev, st_ino)."""

    def __init__(self, follow_symlinks: bool, include_hidden: bool) -> None:
        self.follow_symlinks = follow_symlinks
        self.include_hidden = include_hidden
        self.files: list[tuple[tuple[int, int], bool, Path]] = []  # (dev, inode), a link?, path
        self.problems: list[WalkProblem] = []
        self.walked: dict[tuple[int, int], Path] = {}
        self.linked_dirs: deque[tuple[Path, os.stat_result]] = deque()
        self.other_types: Counter = Counter()

    def walk(self, root: Path, root_stat: os.stat_result) -> None:
        self._walk_real_tree(root, root_stat)
        while self.linked_dirs:
            link, target = self.linked_dirs.popleft()
            walked_as = self.walked.get((target.st_dev, target.st_ino))
            if walked_as is None:
                self._walk_real_tree(link, target)
            elif walked_as == link.parent or walked_as in link.parents:
                self.problems.append(WalkProblem(link, "symlink loop"))
            else:
                logger.debug("%s: same folder as %s, already walked", link, walked_as)

    def one_path_a_file(self) -> tuple[list[Path], int]:
        """(the image files, sorted, without the file symlinks to a file listed under another
        path; how many such links were left out). Every real name is kept (the inode numbers
        of some file systems are not unique enough to drop a real file on their word, so a link
        is left out only when it resolves to the very path listed)."""
        listed: dict[tuple[int, int], list[Path]] = {}
        kept, aliases = [], 0
        for key, link, path in sorted(self.files, key=lambda file: (file[1], file[2])):
            if link and _resolves_to_one_of(path, listed.get(key, [])):
                aliases += 1
                continue
            listed.setdefault(key, []).append(path)
            kept.append(path)
        return sorted(kept), aliases

    def _walk_real_tree(self, top: Path, top_stat: os.stat_result) -> None:
        self.walked[(top_stat.st_dev, top_stat.st_ino)] = top
        stack = [(top, top_stat.st_dev)]
        while stack:
            folder, device = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name, reverse=True)
            except OSError as error:
                self.problems.append(WalkProblem(folder, describe_os_error(error)))
                continue
            for entry in entries:
                if entry.name.startswith(".") and not self.include_hidden:
                    continue
                path = folder / entry.name
                try:
                    if entry.is_symlink():
                        self._visit_link(path)
                    elif entry.is_dir(follow_symlinks=False):
                        entry_stat = entry.stat(follow_symlinks=False)
                        key = (entry_stat.st_dev, entry_stat.st_ino)
                        if key not in self.walked:  # a bind mount can show a folder twice
                            self.walked[key] = path
                            stack.append((path, entry_stat.st_dev))
                    elif entry.is_file(follow_symlinks=False):
                        if is_image_path(entry.name):  # a file's device is its folder's
                            self.files.append(((device, entry.inode()), False, path))
                        else:
                            self._other(entry.name)
                except OSError as error:
                    self.problems.append(WalkProblem(path, describe_os_error(error)))

    def _visit_link(self, path: Path) -> None:
        if not self.follow_symlinks:
            return
        try:
            target = os.stat(path)
        except FileNotFoundError:
            # A dangling "photo.jpg" or "photos" link is worth telling; "notes.txt" is not.
            if is_image_path(path) or not path.suffix:
                self.problems.append(WalkProblem(path, "broken symlink"))
            return
        if stat.S_ISDIR(target.st_mode):
            self.linked_dirs.append((path, target))
        elif stat.S_ISREG(target.st_mode):
            if is_image_path(path):
                self.files.append(((target.st_dev, target.st_ino), True, path))
            else:
                self._other(path.name)

    def _other(self, name: str) -> None:
        self.other_types[os.path.splitext(name)[1].lower() or NO_SUFFIX] += 1


def _resolves_to_one_of(link: Path, listed: list[Path]) -> bool:
    """Whether ``link`` resolves to the file one of ``listed`` names (all fully resolved)."""
    if not listed:
        return False
    try:
        return os.path.realpath(link) in {os.path.realpath(path) for path in listed}
    except OSError:
        return False
