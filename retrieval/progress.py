"""How the library reports progress: through a callback, never by drawing a bar itself.

Every long call (indexing, training, evaluation) takes ``progress(what, done, total)``: ``what``
names the stage ("decoding", "epoch 3/30 loss 1.234", ...), ``done`` of ``total`` units. The CLI
turns the calls into bars on stderr (``cli/progress.py``); a notebook or a server passes its own
callback or none. Indexing's older ``progress(done, total)`` is the same with the stage fixed.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def silent(what: str, done: int, total: int) -> None:
    """The callback when nobody watches."""
