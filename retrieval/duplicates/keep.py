"""Which member of a duplicate group is its representative (the one kept in place).

Files under a ``--reference`` folder come first, always; a symbolic link never leads a group
that holds a file (moving the file its link points to would break the link). Then ``--keep``:

- ``best``: not a copy with a border or caption added (its extra pixels are not picture), then
  the most pixels, then colour over a greyscale copy, then full colour over a picture reduced
  to a palette (a GIF or PNG-8 of a photo has lost colours, and its dithering reads as detail),
  then the sharpest (:func:`sharpness`, within 30% of the group's sharpest a tie: a blurred
  or shrunk copy scores lower), then a lossless format, then the one that carries EXIF
  metadata (more than the orientation tag a viewer writes), then the largest file (a copy with
  its contrast raised can still lead, and one with noise added, whose sharpness ties its
  original's, on its larger file);
- ``largest``: the most pixels, then the most bytes;
- ``oldest``: the oldest modification time;
- ``first``: the first path.

Ties always end on the path, so the choice never depends on the order rows came in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from retrieval.duplicates.verify import ImageCache
    from retrieval.images.hashes import ImageSignature
    from retrieval.indexes.rows import Row

KEEP = ("best", "largest", "oldest", "first")
LOSSLESS = {".png", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".qoi"}


def under_reference(path: str, references: Sequence[str]) -> bool:
    """True when ``path`` lies inside one of the ``references`` folders (absolute paths)."""
    return any(os.path.commonpath([path, ref]) == ref for ref in references)


def pixels(path: str) -> int:
    """Width x height from the file's header (0 when it cannot be read any more)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # any unreadable file simply ranks last
        return 0
    return width * height


ORIENTATION = 0x0112  # the EXIF tag an editor or a viewer writes to turn a picture
FEW_COLOURS = 16  # a palette image using more is taken for a photo reduced to a palette


@dataclass(frozen=True)
class Header:
    """What ``best`` reads from a file's header and palette, the file opened once for both."""

    # A picture reduced to a palette: a 1-bit image, or a palette one (GIF, PNG-8) using more
    # than FEW_COLOURS (80 Imagenette photos quantised used 37-256 colours, 8 for a nearly flat
    # one; a logo or a chart drawn in a few colours is as good as any copy of it).
    reduced_to_palette: bool = False
    # EXIF metadata beyond an orientation tag (a camera's: its make, the time it was taken; a
    # copy rotated by a viewer carries the orientation alone).
    has_exif: bool = False


def header(path: str) -> Header:
    """The file's :class:`Header`, each fact False where it cannot be read (a broken EXIF block
    says nothing of the palette, nor a truncated palette of the EXIF)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return Header(_answer(_reduced_to_palette, image), _answer(_has_exif, image))
    except Exception:
        return Header()


def _answer(question, image) -> bool:
    try:
        return question(image)
    except Exception:  # an unreadable part of a file simply ranks last on that criterion
        return False


def _reduced_to_palette(image) -> bool:
    if image.mode == "1":
        return True
    if image.mode not in ("P", "PA"):
        return False
    used = image.getcolors(maxcolors=256)
    return used is None or len(used) > FEW_COLOURS


def _has_exif(image) -> bool:
    return any(tag != ORIENTATION for tag in image.getexif())


def sharpness(grey: np.ndarray | None) -> float:
    """Variance of the Laplacian (Pech-Pacheco et al. 2000), how much fine detail survives,
    taken after a 3 x 3 median and at half size: dithering and noise are pixel-scale speckle,
    which both remove, while a blur's loss of edges stays. On 80 Imagenette photos against
    copies of the same size, a copy scored 30% sharper than its original (enough to lead)
    when dithered to a GIF 0 times (80 by the plain variance), with noise added 0 (50),
    re-encoded at low quality 0 (3), blurred 0 (0); brightened or more contrasted, 29 (35):
    more contrast is more edge, and nothing in one picture says which contrast was the
    original's."""
    if grey is None or grey.size == 0:
        return 0.0
    import cv2

    cleaned = cv2.medianBlur(np.ascontiguousarray(grey), 3)
    height, width = cleaned.shape
    half = cv2.resize(
        cleaned, (max(1, width // 2), max(1, height // 2)), interpolation=cv2.INTER_AREA
    )
    return float(cv2.Laplacian(half, cv2.CV_64F).var())


class Ranking:
    """Orders a group's rows best first, by references and then by ``keep``."""

    def __init__(
        self,
        keep: str,
        references: Sequence[str] = (),
        signatures: dict[str, ImageSignature] | None = None,
        images: ImageCache | None = None,
    ) -> None:
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
        self.keep = keep
        self.references = tuple(references)
        self.signatures = signatures or {}
        self.images = images
        self.padded: set[int] = set()  # row ids verified to be another member plus a margin
        self._pixels = cache(self._count_pixels)
        self._sharpness = cache(self._sharpness_of)
        self._header = cache(header)

    def _count_pixels(self, row: Row) -> int:
        found = self.signatures.get(row.sha256)
        return found.width * found.height if found is not None else pixels(row.path)

    def _grey(self, row: Row) -> bool:
        found = self.signatures.get(row.sha256)
        return bool(found is not None and found.grey)

    def _sharpness_of(self, path: str) -> float:
        if self.images is None:
            return 0.0
        return sharpness(self.images.grey(path))

    def _steps_below(self, path: str, sharpest: float) -> int:
        """Steps of 30% below the group's sharpest member: within 30% of it is a tie (JPEG's
        blocking adds a little high frequency of its own, so a lossless original would
        otherwise lose to its copy). Counted from the sharpest, not in fixed bands, so two
        copies a hair apart never fall on either side of a band's edge."""
        value = self._sharpness(path)
        if value <= 0:
            return 10**9
        return math.floor(math.log(sharpest / value) / math.log(1.3)) if sharpest > 0 else 0

    def _ahead_of_sharpness(self, row: Row) -> tuple:
        """``best``'s criteria before sharpness: not padded, pixels, colour, full colour."""
        palette = self._header(row.path).reduced_to_palette
        return (row.id in self.padded, -self._pixels(row), self._grey(row), palette)

    def _best(self, rows: Sequence[Row]):
        """``best``'s sort key, sharpness counted from the sharpest of the rows that tie on
        everything before it (a demoted GIF's speckle sets no bar for the rest)."""
        sharpest: dict[tuple, float] = {}
        for row in rows:
            ahead = self._ahead_of_sharpness(row)
            sharpest[ahead] = max(sharpest.get(ahead, 0.0), self._sharpness(row.path))

        def key(row: Row) -> tuple:
            ahead = self._ahead_of_sharpness(row)
            return (
                *ahead,
                self._steps_below(row.path, sharpest[ahead]),
                os.path.splitext(row.path)[1].lower() not in LOSSLESS,
                not self._header(row.path).has_exif,
                -row.size,
                row.path,
            )

        return key

    def order(self, rows: Sequence[Row]) -> list[Row]:
        if self.keep == "best":
            key = self._best(rows)
        else:
            key = {
                "largest": lambda r: (-self._pixels(r), -r.size, r.path),
                "oldest": lambda r: (r.mtime_ns, r.path),
                "first": lambda r: (r.path,),
            }[self.keep]
        return sorted(
            rows,
            key=lambda r: (
                not under_reference(r.path, self.references),
                os.path.islink(r.path),
                key(r),
            ),
        )


def representative_order(
    rows: Sequence[Row], keep: str, references: Sequence[str] = ()
) -> list[Row]:
    """``rows`` best first (see the module docstring), without signatures or a working cache."""
    return Ranking(keep, references).order(rows)
