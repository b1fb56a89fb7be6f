"""What the clusters tool draws: clusters turned into contact-sheet rows."""

from __future__ import annotations

from pathlib import Path

from retrieval.figures.sheets import SheetRow, Tile, draw_sheet
from retrieval.units import counted

MAX_ROWS = 40
MAX_TILES = 8


def cluster_sheets(
    report,
    folder: Path,
    *,
    nearest: int = 8,
    random_few: int = 4,
    outliers: int = 16,
    seed: int = 0,
) -> list[Path]:
    """``cluster-NNN.png`` per cluster (the members nearest its centroid, then a random few of
    the rest) and ``outliers.png`` (the images farthest from every centroid)."""
    import numpy as np

    clustering, rows = report.clustering, report.rows
    rng = np.random.default_rng(seed)
    written = []
    for c in range(len(clustering.centroids)):
        members = np.flatnonzero(clustering.assignment == c)
        if not len(members):
            continue
        ordered = members[np.argsort(clustering.distance[members], kind="stable")]
        near, rest = ordered[:nearest], ordered[nearest:]
        extra = (
            rng.choice(rest, size=min(random_few, len(rest)), replace=False) if len(rest) else []
        )
        tiles = [Tile(rows[p].path, f"d = {clustering.distance[p]:.2f}") for p in near]
        tiles += [Tile(rows[p].path, f"random, d = {clustering.distance[p]:.2f}") for p in extra]
        title = (
            f"cluster {c}: {counted(len(members), 'image')} "
            "(nearest the centroid, then a random few)"
        )
        written.append(
            draw_sheet([SheetRow(title, tiles)], folder / f"cluster-{c:03d}.png", title="")
        )
    far = clustering.outliers(outliers)
    tiles = [
        Tile(rows[p].path, f"c{clustering.assignment[p]} d = {clustering.distance[p]:.2f}")
        for p in far
    ]
    rows_of = [SheetRow("", tiles[i : i + 8]) for i in range(0, len(tiles), 8)]
    title = f"{len(far)} outliers: farthest from every centroid"
    written.append(draw_sheet(rows_of, folder / "outliers.png", title=title))
    return written
