"""The collection map: thumbnails on a grid, each framed in its group's colour, with a legend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from retrieval.figures.fonts import label_font
from retrieval.figures.sheets import BACKGROUND, TEXT, _save, thumbnail

# Tableau 20, light and dark pairs apart, so neighbours in the legend differ.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
]


def draw_map(
    paths: Sequence[str],
    cells: Sequence[tuple[int, int]],
    groups: Sequence[str],
    side: int,
    output: Path,
    *,
    tile: int = 40,
    title: str = "",
) -> Path:
    """One thumbnail per cell (column, row) of a side x side grid, framed by group colour."""
    names = sorted(set(groups), key=lambda g: (-list(groups).count(g), g))
    colour = {name: PALETTE[n % len(PALETTE)] for n, name in enumerate(names)}
    font = label_font(13)
    legend_w, top, frame = 200, 28, 3
    canvas = Image.new("RGB", (side * tile + legend_w + 10, side * tile + top + 4), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill=TEXT, font=font)
    inner = tile - 2 * frame
    for path, (column, row), group in zip(paths, cells, groups):
        x, y = int(column) * tile, top + int(row) * tile
        draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=colour[group])
        canvas.paste(thumbnail(path, inner), (x + frame, y + frame))
    x0 = side * tile + 10
    for n, name in enumerate(names[:40]):
        y = top + 4 + n * 18
        draw.rectangle([x0, y, x0 + 12, y + 12], fill=colour[name])
        draw.text((x0 + 18, y - 1), name[:24], fill=TEXT, font=font)
    return _save(canvas, output)
