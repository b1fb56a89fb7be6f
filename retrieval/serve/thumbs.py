"""JPEG thumbnails of indexed images, made on first request and kept on disk beside the index.

Keyed by the file's content hash (as indexed) and the size, so an edited file gets a new one and
the same picture under two paths shares one. The cache folder is ``<index>/thumbs/``: the index's
writers only ever delete their own generation files, so it survives updates; when the index
folder is read-only, thumbnails are made each time and not kept.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path

from PIL import Image

from retrieval.images.decode import load_image

log = logging.getLogger(__name__)

SIZES = (64, 128, 160, 256, 384, 512)
DEFAULT_SIZE = 160


def fit_size(asked: int) -> int:
    """The smallest cached size at least as big as asked (a few sizes, not one file per pixel)."""
    for size in SIZES:
        if asked <= size:
            return size
    return SIZES[-1]


class ThumbCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_for(self, sha256: str, size: int) -> Path:
        return self.folder / sha256[:2] / f"{sha256}-{size}.jpg"

    def get(self, source: str, sha256: str, size: int) -> bytes:
        """The thumbnail's JPEG bytes; ImageReadError when the file cannot be read any more."""
        cached = self.path_for(sha256, size)
        try:
            return cached.read_bytes()
        except OSError:
            pass
        data = make_thumbnail(source, size)
        self._keep(cached, data)
        return data

    def _keep(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        except OSError as error:  # a read-only index still serves thumbnails
            log.debug("thumbnail not cached (%s)", error)


def make_thumbnail(source: str, size: int) -> bytes:
    """A JPEG whose longer side is ``size``, decoded by the same safe loader the index uses."""
    image = load_image(source, draft_size=size)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()
