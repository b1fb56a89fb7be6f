"""Files -> decoded images: find the image files under a folder, open one safely or say why not.

Every failure to use a file becomes an :class:`ImageReadError` whose ``reason`` is one of the
stable :class:`SkipReason` values, so the pipeline can store it as a row outcome instead of
crashing (rclip and clip-retrieval both met truncated, CMYK, RGBA and huge files in the wild).

Pixel policy, whatever the file holds: EXIF orientation applied; first frame of animations and
multi-page files; transparency composited on a white background (a flat, photo-like backdrop, the
same for every file, so a logo on transparent ground matches the same logo on paper); 16-bit
samples scaled to 8 bits by keeping the high byte (``>> 8``), never clipped; CMYK converted with
Pillow's plain formula (no ICC colour management, but stable). Output is exactly ``RGB`` or ``L``.
"""

from __future__ import annotations

import enum
import errno
import functools
import io
import logging
import os
import re
import stat
import struct
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from retrieval.errors import ImageReadError, RetrieveError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
OUTPUT_MODES: frozenset[str] = frozenset({"RGB", "L"})

# Above every camera a photo collection is likely to hold (Fujifilm GFX100 102 MP, Phase One IQ4
# 151 MP) and just under Pillow's own hard refusal at 2 x Image.MAX_IMAGE_PIXELS (~179 MP), so
# the limit a user meets is ours, with our message, and no global of Pillow's has to change.
# Worst case it decodes ~530 MB (RGB) per image; large JPEGs decode at 1/2..1/8 scale via draft.
# Decompression bombs are typically gigapixels and are refused from the header alone.
DEFAULT_MAX_MEGAPIXELS: float = 175.0

# Decoders we let Pillow try, whatever the suffix says (a PNG named .jpg is common). Exotic
# formats (EPS runs Ghostscript, PSD, TGA, ...) stay out: less attack surface, clearer reasons.
_DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "AVIF")

# Pillow signals broken file contents with these, besides OSError (see Image._open_core).
_BROKEN_DATA_ERRORS = (
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    struct.error,
)
_TOO_LARGE_ERRORS = (MemoryError, Image.DecompressionBombError, Image.DecompressionBombWarning)

_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # "BM" alone would match plain text
# How a complete file of the format ends; a file that starts right but ends wrong was cut short.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}
_FOREIGN_MAGIC = (
    (b"%PDF", "a PDF document"),
    (b"%!PS", "a PostScript/EPS file"),
    (b"8BPS", "a Photoshop file"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"<svg", "an SVG drawing"),
    (b"<?xml", "an XML/SVG file"),
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


class SkipReason(str, enum.Enum):
    """Why a file was not used; the values are stored in index metadata, so never rename them."""

    EMPTY = "empty file"
    UNREADABLE = "unreadable"  # permission, I/O error, missing, a folder, a broken symlink
    NOT_AN_IMAGE = "not an image"  # text, HTML, SVG, HEIC, random bytes, ...
    TRUNCATED = "truncated"
    TOO_LARGE = "too large"  # over max_megapixels, or a decompression bomb
    UNSUPPORTED_MODE = "unsupported mode"  # decodes, but its pixels cannot become RGB/L
    UNSUPPORTED_FORMAT = "unsupported format"  # recognised, but this Pillow lacks the codec
    CORRUPT = "corrupt"  # recognised, but header or data are broken

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class WalkProblem:
    """A path the walk could not enter or resolve; not an image row, but worth telling."""

    path: Path
    reason: str


def is_image_path(path: Path | str) -> bool:
    """Whether the name has one of IMAGE_SUFFIXES, in any case."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def find_images(
    root: Path, *, follow_symlinks: bool = True, include_hidden: bool = False
) -> tuple[list[Path], list[WalkProblem]]:
    """Every image file under root (recursive, sorted by path), plus the problems met on the walk.

    A root that is an image file gives [root]; a root that is missing or neither a folder nor an
    image file raises RetrieveError (one line). Unreadable folders, broken symlinks and symlink
    loops become WalkProblems and the walk goes on.

    Each directory is walked once, by its real path when it lies inside root (symlinked
    directories are followed after the real tree, so an alias never hides the original). A
    symlink back into its own ancestry is a "symlink loop" problem; other aliases of a walked
    directory are skipped quietly. A file symlink is listed under its own path. Names starting
    with "." (``.thumbnails``, macOS ``._x.jpg``) are skipped unless include_hidden. Only regular
    files are listed, so a named pipe called x.jpg cannot block a reader.
    """
    root = Path(root)
    try:
        root_stat = root.stat()
    except OSError as error:
        raise RetrieveError(f"{root}: cannot open ({_describe_os_error(error)})") from error
    if stat.S_ISREG(root_stat.st_mode):
        if is_image_path(root):
            return [root], []
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise RetrieveError(f"{root}: not a folder or an image file ({suffixes})")
    if not stat.S_ISDIR(root_stat.st_mode):
        raise RetrieveError(f"{root}: not a folder or an image file")
    walker = _Walker(follow_symlinks, include_hidden)
    walker.walk(root, root_stat)
    return sorted(walker.files), sorted(walker.problems, key=lambda problem: problem.path)


class _Walker:
    """Iterative walk (no recursion limit) that remembers every directory by (st_dev, st_ino)."""

    def __init__(self, follow_symlinks: bool, include_hidden: bool) -> None:
        self.follow_symlinks = follow_symlinks
        self.include_hidden = include_hidden
        self.files: list[Path] = []
        self.problems: list[WalkProblem] = []
        self.walked: dict[tuple[int, int], Path] = {}
        self.linked_dirs: deque[tuple[Path, os.stat_result]] = deque()

    def walk(self, root: Path, root_stat: os.stat_result) -> None:
        self._walk_real_tree(root, root_stat)
        while self.linked_dirs:
            link, target = self.linked_dirs.popleft()
            walked_as = self.walked.get((target.st_dev, target.st_ino))
            if walked_as is None:
                self._walk_real_tree(link, target)
            elif walked_as == link.parent or walked_as in link.parents:
                self.problems.append(WalkProblem(link, "symlink loop"))
            else:
                logger.debug("%s: same folder as %s, already walked", link, walked_as)

    def _walk_real_tree(self, top: Path, top_stat: os.stat_result) -> None:
        self.walked[(top_stat.st_dev, top_stat.st_ino)] = top
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name, reverse=True)
            except OSError as error:
                self.problems.append(WalkProblem(folder, _describe_os_error(error)))
                continue
            for entry in entries:
                if entry.name.startswith(".") and not self.include_hidden:
                    continue
                path = folder / entry.name
                try:
                    if entry.is_symlink():
                        self._visit_link(path)
                    elif entry.is_dir(follow_symlinks=False):
                        entry_stat = entry.stat(follow_symlinks=False)
                        key = (entry_stat.st_dev, entry_stat.st_ino)
                        if key not in self.walked:  # a bind mount can show a folder twice
                            self.walked[key] = path
                            stack.append(path)
                    elif entry.is_file(follow_symlinks=False) and is_image_path(entry.name):
                        self.files.append(path)
                except OSError as error:
                    self.problems.append(WalkProblem(path, _describe_os_error(error)))

    def _visit_link(self, path: Path) -> None:
        if not self.follow_symlinks:
            return
        try:
            target = os.stat(path)
        except FileNotFoundError:
            # A dangling "photo.jpg" or "photos" link is worth telling; "notes.txt" is not.
            if is_image_path(path) or not path.suffix:
                self.problems.append(WalkProblem(path, "broken symlink"))
            return
        if stat.S_ISDIR(target.st_mode):
            self.linked_dirs.append((path, target))
        elif stat.S_ISREG(target.st_mode) and is_image_path(path):
            self.files.append(path)


def load_image(
    source: Path | str | bytes,
    *,
    mode: str = "RGB",
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    draft_size: int | None = None,
    path_for_errors: str | None = None,
) -> Image.Image:
    """Open one image and return it fully loaded in ``mode`` ("RGB" or "L"), upright.

    The size limit is checked on the header before any pixel is decoded (Image.open is lazy), so
    a 30000x30000 PNG costs nothing. draft_size is the shorter side the caller will resize to:
    JPEGs at least twice that big decode at 1/2, 1/4 or 1/8 scale in the DCT domain (much faster,
    far less memory); the result's shorter side stays >= draft_size. bytes are the file's
    content (never a path). Every failure raises ImageReadError(path, SkipReason.X.value,
    detail); ValueError only for bad arguments.
    """
    if mode not in OUTPUT_MODES:
        raise ValueError(f"mode must be one of {sorted(OUTPUT_MODES)}, not {mode!r}")
    if not max_megapixels > 0:
        raise ValueError(f"max_megapixels must be positive, not {max_megapixels!r}")
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be positive, not {draft_size!r}")
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    name = path_for_errors or ("<bytes>" if in_memory else str(source))
    with _open_source(source, name) as stream:
        try:
            return _decode(stream, name, mode, max_megapixels, draft_size)
        except ImageReadError:
            raise
        except (OSError, *_TOO_LARGE_ERRORS, *_BROKEN_DATA_ERRORS) as error:
            raise _classify(error, stream, name) from error


def convert_mode(image: Image.Image, mode: str, *, path_for_errors: str = "<image>") -> Image.Image:
    """Any Pillow mode -> exactly ``mode`` ("RGB" or "L"), by the policy in the module docstring.

    May return ``image`` itself when it is already in ``mode``.
    """
    if mode not in OUTPUT_MODES:
        raise ValueError(f"mode must be one of {sorted(OUTPUT_MODES)}, not {mode!r}")
    if image.mode == mode:
        return image
    try:
        if image.mode.startswith("I") or image.mode == "F":
            gray = _high_depth_to_l(image)
            return gray if mode == "L" else gray.convert("RGB")
        if image.has_transparency_data:
            image = _flatten_on_white(image)
        if image.mode in ("1", "L"):
            return image.convert(mode)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image if mode == "RGB" else image.convert("L")
    except ValueError as error:  # Pillow: "conversion from X to Y not supported"
        raise ImageReadError(
            path_for_errors, SkipReason.UNSUPPORTED_MODE.value, str(error)
        ) from error


def _open_source(source: Path | str | bytes, name: str) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageReadError(name, SkipReason.EMPTY.value)
        return io.BytesIO(source)
    # O_NONBLOCK: opening a named pipe must not wait for a writer; no effect on regular files.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(source, flags)
    except FileNotFoundError as error:
        detail = "broken symlink" if os.path.islink(source) else "no such file"
        raise ImageReadError(name, SkipReason.UNREADABLE.value, detail) from error
    except OSError as error:
        detail = _describe_os_error(error)
        raise ImageReadError(name, SkipReason.UNREADABLE.value, detail) from error
    try:
        file_stat = os.fstat(fd)
        if stat.S_ISDIR(file_stat.st_mode):
            raise ImageReadError(name, SkipReason.UNREADABLE.value, "is a directory")
        if not stat.S_ISREG(file_stat.st_mode):
            raise ImageReadError(name, SkipReason.UNREADABLE.value, "not a regular file")
        if file_stat.st_size == 0:
            raise ImageReadError(name, SkipReason.EMPTY.value)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(
    stream: BinaryIO, name: str, mode: str, max_megapixels: float, draft_size: int | None
) -> Image.Image:
    max_pixels = max_megapixels * 1e6
    pillow_limit = Image.MAX_IMAGE_PIXELS
    # Pillow's warning threshold (~89 MP) is below our default: when the caller's limit is higher
    # it is the policy and the warning is noise; when lower, a warning means "over the limit".
    bomb_action = "error" if pillow_limit is not None and max_pixels <= pillow_limit else "ignore"
    # catch_warnings swaps process-wide filters; a thread racing it can at worst miss this
    # escalation, and the header check above the decode still enforces the limit.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter(bomb_action, Image.DecompressionBombWarning)
        try:
            image = Image.open(stream, formats=_decode_formats())
        except (OSError, *_BROKEN_DATA_ERRORS) as error:
            # A plugin took the file on weak evidence ("BM" starts a BMP, and some text) and
            # then failed on the header: unless it really looks like an image, it is not one.
            fmt, head = _sniff(stream)
            if fmt is None and not getattr(error, "errno", None):
                raise ImageReadError(
                    name, SkipReason.NOT_AN_IMAGE.value, _looks_like(head)
                ) from error
            raise
        try:
            _check_size(image.size, max_megapixels, name)
            if draft_size is not None:
                image.draft(mode, (draft_size, draft_size))  # a no-op for all but JPEG
            image.load()
            _check_size(image.size, max_megapixels, name)  # some formats learn it on load
            result = convert_mode(_upright(image, name), mode, path_for_errors=name)
            if result is image:  # the caller's copy must outlive image.close()
                result = image.copy()
        finally:
            image.close()
    for warning in caught:
        logger.debug("%s: Pillow warned: %s", name, warning.message)
    return result


@functools.cache
def _decode_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(fmt for fmt in _DECODE_FORMATS if fmt in Image.OPEN)


def _check_size(size: tuple[int, int], max_megapixels: float, name: str) -> None:
    width, height = size
    if width * height > max_megapixels * 1e6:
        detail = f"{width}x{height} = {width * height / 1e6:.1f} MP, over {max_megapixels:g} MP"
        raise ImageReadError(name, SkipReason.TOO_LARGE.value, detail)
    if width < 1 or height < 1:
        raise ImageReadError(name, SkipReason.CORRUPT.value, f"{width}x{height} pixels")


def _upright(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block costs the rotation, never the image."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation not in (2, 3, 4, 5, 6, 7, 8):
            return image  # exif_transpose would copy the whole image for nothing
        return ImageOps.exif_transpose(image)
    except Exception as error:  # EXIF parsing raises a zoo of types on malformed tags
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, error)
        return image


def _flatten_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit keeps its high byte; 32-bit int and float are read as 8-bit, 16-bit or [0, 1]
    data when they fit one of those ranges, else stretched from their min..max (clipped if flat)."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray((values.astype(np.uint16) >> 8).astype(np.uint8))
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    elif low >= 0 and high <= 255:
        pass
    elif image.mode != "F" and low >= 0 and high <= 65535:
        values = np.floor(values / 256)
    elif high > low:
        values = (values - low) * (255 / (high - low))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _classify(error: BaseException, stream: BinaryIO, name: str) -> ImageReadError:
    """Turn whatever Pillow raised into one SkipReason with a short detail."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(found.group(1)) / 1e6:.0f} MP; " if found else ""
        detail = f"{size}Pillow refuses it as a possible decompression bomb"
        return ImageReadError(name, SkipReason.TOO_LARGE.value, detail)
    if isinstance(error, MemoryError):
        return ImageReadError(name, SkipReason.TOO_LARGE.value, "out of memory while decoding")
    if isinstance(error, UnidentifiedImageError):
        return _unidentified(stream, name)
    if isinstance(error, EOFError):
        return ImageReadError(name, SkipReason.TRUNCATED.value, str(error))
    message = str(error)
    if isinstance(error, OSError):
        if error.errno is not None:  # the disk, not the data (Pillow's own errors carry none)
            return ImageReadError(name, SkipReason.UNREADABLE.value, _describe_os_error(error))
        if "truncat" in message.lower():  # "image file is truncated", "Truncated File Read"
            return ImageReadError(name, SkipReason.TRUNCATED.value, message)
        if "not available" in message:  # "decoder jpeg2k not available"
            return ImageReadError(name, SkipReason.UNSUPPORTED_FORMAT.value, message)
    detail = message or type(error).__name__
    return ImageReadError(name, SkipReason.CORRUPT.value, detail)


def _unidentified(stream: BinaryIO, name: str) -> ImageReadError:
    """Pillow could not read a header: say what the file looks like instead."""
    fmt, head = _sniff(stream)
    if fmt is None:
        return ImageReadError(name, SkipReason.NOT_AN_IMAGE.value, _looks_like(head))
    stream.seek(max(0, stream.seek(0, io.SEEK_END) - 16))
    end_marker = _END_MARKERS.get(fmt)
    if end_marker is not None and not stream.read().endswith(end_marker):
        return ImageReadError(name, SkipReason.TRUNCATED.value, f"{fmt} cut short in its header")
    detail = f"starts like a {fmt} but its header is invalid"
    return ImageReadError(name, SkipReason.CORRUPT.value, detail)


def _sniff(stream: BinaryIO) -> tuple[str | None, bytes]:
    """The image format the first bytes clearly announce (or None), and those bytes."""
    stream.seek(0)
    head = stream.read(512)
    fmt = next((fmt for magic, fmt in _IMAGE_MAGIC if head.startswith(magic)), None)
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        fmt = "BMP"
    return fmt, head


def _looks_like(head: bytes) -> str:
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF, which Pillow cannot decode"
        return f"an ISO media file ({brand.decode('ascii', 'replace')})"
    lowered = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for magic, description in _FOREIGN_MAGIC:
        if lowered.startswith(magic.lower()):
            return description
    for cut in range(4):  # the 512-byte head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(char.isprintable() or char in "\t\r\n\f" for char in text):
            return "a text file"
        break
    return "unknown format"


def _describe_os_error(error: OSError) -> str:
    named = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOENT: "no such file or directory",
        errno.ELOOP: "symlink loop",
        errno.EISDIR: "is a directory",
        errno.ENOTDIR: "not a directory",
        errno.EIO: "I/O error",
    }
    return named.get(error.errno, (error.strerror or str(error)).lower())
