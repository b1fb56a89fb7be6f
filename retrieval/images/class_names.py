"""Readable names for class folders named by WordNet id (ImageNet, Imagenette: ``n03028079``).

ImageNet ships a ``words.txt`` (``wnid<TAB>name[, synonym...]`` per line); a copy beside the
data (in the folder given, or one or two folders above the class folders) names the classes
wherever a label is shown: the grid, the page, ``evaluate``, and the checkpoint ``train`` writes
(``class_names``), so a model keeps its names when the data is gone.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

WORDS_FILE = "words.txt"
WNID = re.compile(r"^n\d{8}$")
LEVELS = 3  # the folder itself and two above it (DATA/train/CLASS/image.jpg -> DATA/words.txt)


def read_words(path: str | Path) -> dict[str, str]:
    """``wnid -> name`` from an ImageNet-style ``words.txt`` (the first synonym: "parachute,
    chute" is "parachute"); lines that are not ``wnid<TAB>name`` are passed over."""
    names: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc.strerror or exc)
        return names
    for line in text.splitlines():
        wnid, sep, name = line.partition("\t")
        name = name.split(",")[0].strip()
        if sep and WNID.match(wnid.strip()) and name:
            names[wnid.strip()] = name
    return names


def _words_in(folder: Path) -> dict[str, str]:
    """The mapping in ``folder/words.txt`` (read again only when the file changes)."""
    path = folder / WORDS_FILE
    try:
        stat = path.stat()
    except OSError:
        return {}
    return _read_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    return read_words(path)


def names_near(folder: str | Path, levels: int = LEVELS) -> dict[str, str]:
    """The ``words.txt`` mapping found in ``folder`` or up to ``levels - 1`` folders above it
    (the nearest wins); empty when there is none."""
    here = Path(folder).resolve()
    for candidate in [here, *here.parents][:levels]:
        found = _words_in(candidate)
        if found:
            return found
    return {}


def names_for(classes: Iterable[str], *folders: str | Path) -> dict[str, str]:
    """The readable names of those ``classes`` that ``words.txt`` near any of ``folders`` has
    (only WordNet ids are looked up: a folder already called "cats" is its own name)."""
    wanted = [c for c in classes if WNID.match(c)]
    if not wanted:
        return {}
    for folder in folders:
        mapping = names_near(folder)
        found = {c: mapping[c] for c in wanted if c in mapping}
        if found:
            return found
    return {}


def display_name(label: str, names: Mapping[str, str] | None, *, with_id: bool = False) -> str:
    """``tench`` (or ``tench (n01440764)``) where a name is known, else the label itself."""
    name = (names or {}).get(label)
    if not name or name == label:
        return label
    return f"{name} ({label})" if with_id else name


def name_of(label: str, path: str | Path) -> str | None:
    """The readable name of an indexed image's label (its folder), from a ``words.txt`` near the
    image; None for a label that is no WordNet id or that no ``words.txt`` names."""
    if not WNID.match(label or ""):
        return None
    return names_near(Path(path).parent).get(label)
