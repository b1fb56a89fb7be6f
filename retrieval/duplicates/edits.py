"""The edits a photo's copies go through, made on the collection's own images to calibrate on.

Each is what a phone, an editor or a messenger does to a picture: re-encode it badly, shrink it,
crop it off-centre, mirror it, turn it, letterbox it, drop its colour, put a caption under or
over it, brighten it. Parameters are drawn per image from a seeded generator, so a calibration is
reproducible and no single setting is what gets measured.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

EDITS = (
    "jpeg",
    "shrunk",
    "cropped",
    "mirrored",
    "rotated",
    "border",
    "greyscale",
    "caption",
    "brightness",
)


def edited(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    """``image`` (RGB) after one of :data:`EDITS`."""
    width, height = image.size
    if edit == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(10, 26)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if edit == "shrunk":
        scale = float(rng.uniform(0.3, 0.4))
        size = (max(8, round(width * scale)), max(8, round(height * scale)))
        return image.resize(size, Image.LANCZOS)
    if edit == "cropped":
        keep = float(rng.uniform(0.65, 0.75))
        crop_w, crop_h = max(8, round(width * keep)), max(8, round(height * keep))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        return image.crop((left, top, left + crop_w, top + crop_h))
    if edit == "mirrored":
        return ImageOps.mirror(image)
    if edit == "rotated":
        turn = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)[int(rng.integers(0, 2))]
        return image.transpose(turn)
    if edit == "border":
        pad = max(4, round(min(width, height) * float(rng.uniform(0.08, 0.2))))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) if rng.random() < 0.5 else (0,) * 3
        if rng.random() < 0.5:  # letterbox: bars above and below only
            return ImageOps.expand(image, border=(0, pad, 0, pad), fill=colour)
        return ImageOps.expand(image, border=pad, fill=colour)
    if edit == "greyscale":
        return image.convert("L").convert("RGB")
    if edit == "caption":  # a bar under the picture, or over its bottom (as memes do)
        bar = max(12, round(height * float(rng.uniform(0.12, 0.22))))
        over = rng.random() < 0.5
        canvas = Image.new("RGB", (width, height if over else height + bar), (255, 255, 255))
        canvas.paste(image, (0, 0))
        top = height - bar if over else height
        draw = ImageDraw.Draw(canvas)
        draw.rectangle((0, top, width, top + bar), fill=(255, 255, 255))
        words = "".join(chr(int(c)) for c in rng.integers(97, 123, 14))
        place = (max(2, width // 20), top + bar // 4)
        draw.text(place, f"{words[:6]} {words[6:]}", fill=(0, 0, 0))
        return canvas
    if edit == "brightness":
        brighter = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.35)))
        return ImageEnhance.Contrast(brighter).enhance(float(rng.uniform(0.75, 1.3)))
    raise ValueError(f"edit must be one of {EDITS}, not {edit!r}")


def encoded(image: Image.Image, quality: int = 92) -> bytes:
    """A JPEG file's bytes (how an edited copy reaches a collection)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
