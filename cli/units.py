"""Sizes as people type them: ``4GB``, ``512MB``, ``2e9``."""

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
