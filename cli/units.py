"""Sizes as people type them (``4GB``, ``512MB``, ``2e9``) and as they read them (``1.5 GB``)."""

from __future__ import annotations

import click

UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    cleaned = text.strip().upper().replace("IB", "B")
    number = cleaned.rstrip("KMGTB")
    unit = cleaned[len(number) :]
    try:
        return int(float(number) * UNITS[unit])
    except (ValueError, KeyError):
        raise click.BadParameter(
            f"{text!r} is not a size like 4GB or 512MB", param_hint="--memory"
        ) from None


def human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} TB"
