"""What every handler refuses and how: the ``Refused`` error and the whole-number parameter.

Its own module so that the handlers of :mod:`retrieval.serve.app` and of
:mod:`retrieval.serve.collection` refuse bad input in the same words without importing each other.
"""

from __future__ import annotations

from typing import Any


class Refused(Exception):
    """A request the server will not answer: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def int_param(text: Any, name: str, default: int, low: int, high: int | None) -> int:
    """``text`` as a whole number in ``low..high`` (``default`` when absent); 422 otherwise."""
    if text is None or text == "":
        return default
    try:
        value = int(str(text))
    except ValueError:
        raise Refused(422, f"{name} must be a whole number, not {str(text)[:40]!r}") from None
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise Refused(422, f"{name} must be {span}, not {str(value)[:40]}")
    return value
