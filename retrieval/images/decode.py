"""File -> decoded image: open one image safely, in RGB or L, or say why not.

Every failure to use a file becomes an :class:`ImageReadError` whose ``reason`` is one of the
stable :class:`SkipReason` values, so the pipeline can store it as a row outcome instead of
crashing (rclip and clip-retrieval both met truncated, CMYK, RGBA and huge files in the wild).
``diagnose.py`` says what a file that failed to decode really is; ``files.py`` finds the files.

Pixel policy, whatever the file holds: EXIF orientation applied; first frame of animations and
multi-page files; transparency composited on a white background (a flat, photo-like backdrop, the
same for every file, so a logo on transparent ground matches the same logo on paper); 16-bit
samples scaled to 8 bits by keeping the high byte (``>> 8``), never clipped; CMYK converted with
Pillow's plain formula (no ICC colour management, but stable). Output is exactly ``RGB`` or ``L``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import stat
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

from retrieval.errors import ImageReadError, SkipReason
from retrieval.images.diagnose import describe_os_error, diagnose, looks_like, sniff

logger = logging.getLogger(__name__)

OUTPUT_MODES: frozenset[str] = frozenset({"RGB", "L"})

# Above every camera a photo collection is likely to hold (Fujifilm GFX100 102 MP, Phase One IQ4
# 151 MP) and just under Pillow's own hard refusal at 2 x Image.MAX_IMAGE_PIXELS (~179 MP), so
# the limit a user meets is ours, with our message, and no global of Pillow's has to change.
# Worst case it decodes ~530 MB (RGB) per image; large JPEGs decode at 1/2..1/8 scale via draft.
# Decompression bombs are typically gigapixels and are refused from the header alone.
DEFAULT_MAX_MEGAPIXELS: float = 175.0

# Decoders we let Pillow try, whatever the suffix says (a PNG named .jpg is common). Exotic
# formats (EPS runs Ghostscript, PSD, TGA, ...) stay out: less attack surface, clearer reasons.
# HEIF (iPhone HEIC) comes from pillow-heif, registered on first use; AVIF is Pillow's own
# (11.3+). Both apply EXIF orientation as JPEG does: pillow-heif applies the container's
# rotation and resets the tag, Pillow's AVIF keeps the tag and ``_upright`` applies it.
_DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "HEIF")

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
            raise diagnose(error, stream, name) from error


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
        detail = describe_os_error(error)
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
            with _pillow_allows(max_pixels):
                image = Image.open(stream, formats=_decode_formats())
        except (OSError, *_BROKEN_DATA_ERRORS) as error:
            # A plugin took the file on weak evidence ("BM" starts a BMP, and some text) and
            # then failed on the header: unless it really looks like an image, it is not one.
            fmt, head = sniff(stream)
            if fmt is None and not getattr(error, "errno", None):
                raise ImageReadError(
                    name, SkipReason.NOT_AN_IMAGE.value, looks_like(head)
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


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_allows(max_pixels: float) -> Iterator[None]:
    """Let ``Image.open`` take images up to the caller's own limit.

    Pillow refuses images over twice its global ``MAX_IMAGE_PIXELS`` (~179 MP) in ``Image.open``
    itself, before our check can speak; a caller who asked for a higher ``max_megapixels`` must
    get it without changing a process-wide setting for good (the CLI used to set the global, so
    the library refused what the CLI accepted). Only then, and only for the header parse, the
    limit is raised under a lock and put back.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels < 2 * limit:
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


@functools.cache
def _decode_formats() -> tuple[str, ...]:
    Image.init()
    _register_plugins()
    return tuple(fmt for fmt in _DECODE_FORMATS if fmt in Image.OPEN)


def _register_plugins() -> None:
    """pillow-heif's opener, and pillow-avif-plugin where Pillow (< 11.3) has no AVIF of its
    own, when installed (imported only when the first image is decoded)."""
    try:
        import pillow_heif
    except ImportError:
        logger.debug("pillow-heif is not installed: HEIC/HEIF files will be skipped")
    else:
        pillow_heif.register_heif_opener()
    if "AVIF" not in Image.OPEN:
        with contextlib.suppress(ImportError):
            import pillow_avif  # noqa: F401  (registers AVIF on import)


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
