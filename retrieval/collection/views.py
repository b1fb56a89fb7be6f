"""What the collection tools draw: groups and clusters turned into contact-sheet rows."""

from __future__ import annotations

import os
from pathlib import Path

from retrieval.collection.duplicates import DuplicateReport
from retrieval.figures.sheets import SheetRow, Tile, draw_sheet

MAX_ROWS = 40
MAX_TILES = 8


def duplicate_sheet(report: DuplicateReport, output: Path, *, tile: int = 112) -> Path:
    """One row per group (the first ``MAX_ROWS``), the representative first in a red frame,
    each other member's fc7 distance to it below."""
    rows = []
    for group in report.groups[:MAX_ROWS]:
        tiles = [
            Tile(m.path, "keep" if n == 0 else f"d = {m.distance:.2f}", framed=n == 0)
            for n, m in enumerate(group.members[:MAX_TILES])
        ]
        more = len(group.members) - MAX_TILES
        title = f"group {group.number}: {group.kind}, {len(group.members)} files"
        title += f" ({more} more not shown)" if more > 0 else ""
        title += f" - {os.path.basename(group.representative)}"
        rows.append(SheetRow(title, tiles))
    shown = f"first {MAX_ROWS} of " if len(report.groups) > MAX_ROWS else ""
    title = f"{shown}{len(report.groups)} duplicate groups, threshold {report.threshold:.2f}"
    return draw_sheet(rows, output, tile=tile, title=title)
