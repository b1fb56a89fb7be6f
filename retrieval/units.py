"""Sizes as people type them (``4GB``, ``512MB``, ``2e9``) and as they read them (``4.0 GB``).

One formatter and one parser, both binary (1 GB = 2**30 bytes), so that a budget given as
``--memory 4GB`` is printed back as ``4.0 GB``, not as ``4.29 GB``.
"""

from __future__ import annotations

UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_bytes(text: str) -> int:
    """``4GB`` -> 4 * 2**30; ValueError for anything that is not a size."""
    cleaned = text.strip().upper().replace("IB", "B")
    number = cleaned.rstrip("KMGTB")
    unit = cleaned[len(number) :]
    try:
        size = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size like 4GB or 512MB") from None
    if size < 0 or size != size:
        raise ValueError(f"{text!r} is not a size like 4GB or 512MB")
    return int(size)


def human_bytes(size: float) -> str:
    """``1536`` -> ``1.5 KB``; bytes below 1 KB are printed whole."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            break
    return f"{size:.1f} {unit}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 epoch``, ``3 epochs``: a count with its noun, for lines a user reads (``plural``
    where adding an s is wrong: ``query``, ``queries``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
