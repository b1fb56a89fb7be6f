"""Contact sheets (rows of thumbnails with captions) and the calibration histogram.

A sheet is plain data in, PNG out: the collection tools decide what goes in a row (a duplicate
group, the members of a cluster), this module only draws, so figures never import them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from retrieval.atomic import atomic_write
from retrieval.errors import ImageReadError, RetrieveError
from retrieval.figures.fonts import label_font
from retrieval.images.decode import load_image

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
MISSING = (225, 225, 225)
FRAME = (200, 30, 30)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


@dataclass
class Tile:
    path: str
    caption: str = ""
    framed: bool = False  # the row's representative (a red frame)


@dataclass
class SheetRow:
    title: str
    tiles: list[Tile]


def thumbnail(path: str, size: int) -> Image.Image:
    """The image fitted to a square, or a grey square when it cannot be read any more."""
    try:
        image = load_image(Path(path), mode="RGB", draft_size=size)
    except ImageReadError as exc:
        log.warning("sheet: %s", exc)
        return Image.new("RGB", (size, size), MISSING)
    return ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _save(canvas: Image.Image, output: Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fmt = (output.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    atomic_write(output, lambda tmp: canvas.save(tmp, format=fmt))
    return output


def draw_sheet(rows: Sequence[SheetRow], output: Path, *, tile: int = 112, title: str = "") -> Path:
    """One row of thumbnails per entry, each with its title above and captions below."""
    rows = [r for r in rows if r.tiles]
    if not rows:
        raise RetrieveError("nothing to draw: no groups")
    columns = max(len(r.tiles) for r in rows)
    font = label_font(max(10, tile // 10))
    pad, head, caption = 6, 18, 18
    top = 26 if title else 0
    width = pad + columns * (tile + pad)
    height = top + len(rows) * (head + tile + caption + pad) + pad
    canvas = Image.new("RGB", (max(width, 320), height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 6), _fit(draw, title, font, canvas.width - 2 * pad), fill=TEXT, font=font)
    for n, row in enumerate(rows):
        y = top + n * (head + tile + caption + pad)
        draw.text((pad, y + 2), _fit(draw, row.title, font, width - 2 * pad), fill=TEXT, font=font)
        y += head
        for column, entry in enumerate(row.tiles):
            x = pad + column * (tile + pad)
            canvas.paste(thumbnail(entry.path, tile), (x, y))
            if entry.framed:
                draw.rectangle([x - 3, y - 3, x + tile + 2, y + tile + 2], outline=FRAME, width=3)
            text = _fit(draw, entry.caption, font, tile)
            draw.text((x, y + tile + 3), text, fill=MUTED, font=font)
    return _save(canvas, output)


def _nice_ticks(high: float) -> np.ndarray:
    """0, step, 2 step, ... up to ``high``, the step 1, 2 or 5 times a power of ten."""
    raw = high / 5
    power = 10 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return np.arange(0, high + step * 1e-9, step)


def draw_histogram(
    series: dict[str, np.ndarray],
    output: Path,
    *,
    threshold: float | None = None,
    bins: int = 60,
    title: str = "",
) -> Path:
    """Overlaid histograms (each normalised to its own peak) with a vertical threshold line."""
    values = [np.asarray(v, np.float64) for v in series.values() if len(v)]
    if not values:
        raise RetrieveError("nothing to draw: no distances")
    high = max(float(np.percentile(np.concatenate(values), 99.5)), threshold or 0) * 1.05
    edges = np.linspace(0, max(high, 1e-6), bins + 1)
    width, left, bottom = 760, 56, 44
    top = 30 + 15 * len(series)  # the legend sits above the plot, never over a curve
    height = 330 + top
    plot_w, plot_h = width - left - 20, height - bottom - top
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = label_font(12)
    draw.text((left, 8), title, fill=TEXT, font=font)
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill=TEXT)
    draw.line([(left, top), (left, top + plot_h)], fill=TEXT)
    for tick in _nice_ticks(edges[-1]):
        x = left + plot_w * tick / edges[-1]
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill=TEXT)
        draw.text((x - 10, top + plot_h + 6), f"{tick:.3g}", fill=TEXT, font=font)
    draw.text(
        (left + plot_w // 2 - 80, height - 18), "fc7 Euclidean distance", fill=TEXT, font=font
    )
    for n, (name, data) in enumerate(series.items()):
        counts, _ = np.histogram(np.clip(data, 0, edges[-1]), bins=edges)
        if not counts.any():
            continue
        colour = COLOURS[n % len(COLOURS)]
        points = []
        for i, c in enumerate(counts):
            x0 = left + plot_w * edges[i] / edges[-1]
            x1 = left + plot_w * edges[i + 1] / edges[-1]
            y = top + plot_h - plot_h * c / counts.max()
            points += [(x0, y), (x1, y)]
        draw.line(points, fill=colour, width=2)
        label = _fit(draw, f"{name} (n={len(data)})", font, plot_w - 30)
        y = 26 + 15 * n
        draw.line([(left, y + 7), (left + 20, y + 7)], fill=colour, width=2)
        draw.text((left + 26, y), label, fill=colour, font=font)
    if threshold is not None:
        x = left + plot_w * threshold / edges[-1]
        draw.line([(x, top), (x, top + plot_h)], fill=TEXT, width=2)
        draw.text((x + 4, top + 2), f"threshold {threshold:.3g}", fill=TEXT, font=font)
    return _save(canvas, output)
