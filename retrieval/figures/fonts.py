"""The figures' lettering: DejaVu Sans, which matplotlib (a dependency) ships.

Pillow's own default font is a subset that draws an empty box for every letter outside ASCII,
and users' folder and file names are full of them (``Café``, ``Müller``, ``Ñandú``, Greek,
Cyrillic). DejaVu Sans covers those; CJK still needs a font of its own.
"""

from __future__ import annotations

import functools
import logging
import os

from PIL import ImageFont

log = logging.getLogger(__name__)


@functools.cache
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px; Pillow's default font where it cannot be loaded."""
    try:
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
        return ImageFont.truetype(path, size)
    except (ImportError, OSError) as exc:
        log.debug("DejaVu Sans unavailable (%s): Pillow's default font", exc)
        return ImageFont.load_default(size=size)
