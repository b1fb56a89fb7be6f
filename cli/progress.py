"""A tqdm bar on stderr driven by the library's ``progress(done, total)`` callbacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, unit: str = "it") -> Iterator[Callable[[int, int], None]]:
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


@contextlib.contextmanager
def stage_bars(unit: str = "it") -> Iterator[Callable[[str, int, int], None]]:
    """A tqdm bar on stderr for the library's ``progress(what, done, total)`` callbacks: a new
    stage (its total changes, or it starts again from 0) gets a fresh bar."""
    from tqdm import tqdm

    bar = None

    def update(what: str, done: int, total: int) -> None:
        nonlocal bar
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit=unit, file=sys.stderr, disable=None, leave=False)
        bar.set_description(what, refresh=False)
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
