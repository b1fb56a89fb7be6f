"""The contact sheet of duplicate groups: one row per group, the representative first in a red
frame, each other member captioned with what made it a copy ("mirrored", "cropped to 64%")."""

from __future__ import annotations

import os
from pathlib import Path

from retrieval.duplicates.groups import DuplicateReport, Member
from retrieval.figures.sheets import SheetRow, Tile, draw_sheet

MAX_ROWS = 40
MAX_TILES = 8


def caption(member: Member, first: bool) -> str:
    """What a tile says under its picture."""
    if first:
        return "keep (reference)" if member.reference else "keep"
    if member.evidence:
        return ", ".join(member.evidence.get("edits", [])) or member.evidence.get("test", "")
    return f"d = {member.distance:.2f}"


def duplicate_sheet(report: DuplicateReport, output: Path, *, tile: int = 112) -> Path:
    """The first ``MAX_ROWS`` groups, each as one row of at most ``MAX_TILES`` pictures."""
    rows = []
    for group in report.groups[:MAX_ROWS]:
        tiles = [
            Tile(m.path, caption(m, n == 0), framed=n == 0)
            for n, m in enumerate(group.members[:MAX_TILES])
        ]
        more = len(group.members) - MAX_TILES
        title = f"group {group.number}: {group.kind}, {len(group.members)} files"
        title += f" ({more} more not shown)" if more > 0 else ""
        title += f" - {os.path.basename(group.representative)}"
        rows.append(SheetRow(title, tiles))
    shown = f"first {MAX_ROWS} of " if len(report.groups) > MAX_ROWS else ""
    return draw_sheet(
        rows, output, tile=tile, title=f"{shown}{len(report.groups)} duplicate groups"
    )
