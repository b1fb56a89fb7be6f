"""Every indexed image's signature: from the memory when its bytes were seen before (the index
build stores one for each image it decodes on the CPU), else from the file, decoded small (JPEG
draft mode) in a pool of threads (Pillow releases the GIL)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from retrieval.devices import usable_cores
from retrieval.duplicates.memory import DuplicatesMemory
from retrieval.errors import ImageReadError
from retrieval.images.hashes import ImageSignature
from retrieval.images.signing import signature_of_file

if TYPE_CHECKING:
    from retrieval.indexes.rows import Row
    from retrieval.search.index import Index

log = logging.getLogger(__name__)


def sign_index(index: Index, progress: Callable[[int, int], None] | None = None) -> int:
    """Signs every indexed image that has no signature yet (``retrieve index`` does it right
    after indexing, so the first duplicates pass finds them ready); how many it signed."""
    rows = index.rows(limit=None)
    memory = DuplicatesMemory(index.directory)
    try:
        missing = memory.unsigned(r.sha256 for r in rows)
        _sign({r.sha256: r.path for r in rows if r.sha256 in missing}, memory, progress)
    finally:
        memory.close()
    return len(missing)


def signatures_for(
    rows: Sequence[Row],
    memory: DuplicatesMemory,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, ImageSignature]:
    """Signatures by sha256 for ``rows``; those missing are computed and remembered. A file
    that cannot be read any more has none (it takes part through fc7 alone)."""
    found = memory.signatures(r.sha256 for r in rows)
    missing = {r.sha256: r.path for r in rows if r.sha256 not in found}
    if missing:
        found.update(_sign(missing, memory, progress, keep=True))
    return found


def _sign(
    missing: dict[str, str],
    memory: DuplicatesMemory,
    progress: Callable[[int, int], None] | None,
    keep: bool = False,
) -> dict[str, ImageSignature]:
    """Signs the files ``missing`` names (sha256: path) in a pool of threads, stores each
    block of them as it goes, and returns them when ``keep`` (else an empty dict: a whole
    collection's signatures need not sit in memory at once)."""
    kept: dict[str, ImageSignature] = {}
    fresh: dict[str, ImageSignature] = {}
    done = 0

    def one(item: tuple[str, str]) -> tuple[str, ImageSignature | None]:
        digest, path = item
        try:
            return digest, signature_of_file(path)
        except (ImageReadError, OSError) as error:
            log.warning("no signature for %s: %s", path, error)
            return digest, None

    with ThreadPoolExecutor(max(1, usable_cores())) as pool:
        for digest, result in pool.map(one, missing.items(), chunksize=16):
            if result is not None:
                fresh[digest] = result
            done += 1
            if progress and (done % 64 == 0 or done == len(missing)):
                progress(done, len(missing))
            if len(fresh) >= 4096:
                memory.keep_signatures(fresh)
                kept.update(fresh if keep else {})
                fresh = {}
    memory.keep_signatures(fresh)
    kept.update(fresh if keep else {})
    return kept
