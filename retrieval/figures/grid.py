"""The paper's Figure 4: each query image, set apart, beside its nearest indexed images."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from retrieval.atomic import atomic_write
from retrieval.errors import ImageReadError, RetrieveError
from retrieval.figures.fonts import label_font
from retrieval.images.class_names import name_of
from retrieval.images.decode import load_image
from retrieval.images.walk import find_images, label_of
from retrieval.results import QueryResult

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
QUERY_FRAME = (200, 30, 30)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
MISSING = (225, 225, 225)


def _tile(path: str, size: int) -> Image.Image:
    """The image cropped to a square tile, or a grey tile if it cannot be read any more."""
    try:
        image = load_image(Path(path), mode="RGB")
    except ImageReadError as exc:
        log.warning("grid: %s", exc)
        return Image.new("RGB", (size, size), MISSING)
    return ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _title(draw: ImageDraw.ImageDraw, k: int, font: ImageFont.ImageFont, width: int) -> str:
    """The neighbours' heading, as much of it as fits above them (a grid of two is narrow)."""
    for title in (f"{k} nearest by Euclidean distance of fc7, nearest first", f"{k} nearest"):
        if draw.textlength(title, font=font) <= width:
            return title
    return _fit_text(draw, title, font, width)


def _readable(label: str, path: str) -> str:
    """A WordNet-id folder (n01440764) by the name a ``words.txt`` near the image gives it."""
    return name_of(label, path) or label


def pick_queries(queries: Sequence[Path], n: int, seed: int) -> list[Path]:
    """Files as given; from each folder, ``n`` images picked at random (reproducibly by seed)."""
    picked: list[Path] = []
    rng = random.Random(seed)
    for query in map(Path, queries):
        if query.is_dir():
            found, _ = find_images(query)
            if not found:
                raise RetrieveError(f"no images found in {query}")
            picked.extend(sorted(rng.sample(found, min(n, len(found)))))
        else:
            picked.append(query)
    return picked


def render_grid(results: Sequence[QueryResult], output: Path, *, tile: int = 128) -> Path:
    """Write the figure as PNG: one row per query, the query first in a red frame."""
    rows = [r for r in results if r.neighbors]
    if not rows:
        raise RetrieveError("nothing to draw: no query image could be searched")
    k = max(len(r.neighbors) for r in rows)
    pad, gap, caption = 4, 24, 34
    font = label_font(max(10, tile // 11))
    small = label_font(max(9, tile // 13))
    header = 26
    width = pad + (tile + pad) + gap + k * (tile + pad)
    height = header + len(rows) * (tile + caption + pad) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    neighbours_x = pad + tile + pad + gap
    draw.text((pad, 6), "query", fill=TEXT, font=font)
    draw.text((neighbours_x, 6), _title(draw, k, font, width - neighbours_x), fill=TEXT, font=font)
    for row_number, result in enumerate(rows):
        y = header + row_number * (tile + caption + pad)
        canvas.paste(_tile(result.query, tile), (pad, y))
        draw.rectangle([pad - 3, y - 3, pad + tile + 2, y + tile + 2], outline=QUERY_FRAME, width=3)
        query_label = _readable(label_of(result.query), result.query)
        draw.text(
            (pad, y + tile + 4), _fit_text(draw, query_label, font, tile), fill=TEXT, font=font
        )
        for column, neighbor in enumerate(result.neighbors):
            x = neighbours_x + column * (tile + pad)
            canvas.paste(_tile(neighbor.path, tile), (x, y))
            draw.text(
                (x, y + tile + 4),
                _fit_text(draw, _readable(neighbor.label, neighbor.path), font, tile),
                fill=TEXT,
                font=font,
            )
            draw.text(
                (x, y + tile + 4 + font.size + 2),
                f"d = {neighbor.distance:.2f}",
                fill=MUTED,
                font=small,
            )
    output = Path(output)
    fmt = (output.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    atomic_write(output, lambda tmp: canvas.save(tmp, format=fmt))
    return output
