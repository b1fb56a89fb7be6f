"""Why a file could not be used: what it really is, or what went wrong reading it.

Pillow's errors say little ("cannot identify image file"); a user with a folder of failures
needs to know which are HEIC photos, PDFs, cut-short downloads or a bad disk. This module turns
whatever the decoder raised into one :class:`~retrieval.errors.SkipReason` with a short detail,
from the error itself and the file's first and last bytes.
"""

from __future__ import annotations

import errno
import io
import re
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from retrieval.errors import ImageReadError, SkipReason

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


def diagnose(error: BaseException, stream: BinaryIO, name: str) -> ImageReadError:
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
            return ImageReadError(name, SkipReason.UNREADABLE.value, describe_os_error(error))
        if "truncat" in message.lower():  # "image file is truncated", "Truncated File Read"
            return ImageReadError(name, SkipReason.TRUNCATED.value, message)
        if "not available" in message:  # "decoder jpeg2k not available"
            return ImageReadError(name, SkipReason.UNSUPPORTED_FORMAT.value, message)
    detail = message or type(error).__name__
    return ImageReadError(name, SkipReason.CORRUPT.value, detail)


def _unidentified(stream: BinaryIO, name: str) -> ImageReadError:
    """Pillow could not read a header: say what the file looks like instead."""
    fmt, head = sniff(stream)
    if fmt is None:
        return ImageReadError(name, SkipReason.NOT_AN_IMAGE.value, looks_like(head))
    stream.seek(max(0, stream.seek(0, io.SEEK_END) - 16))
    end_marker = _END_MARKERS.get(fmt)
    if end_marker is not None and not stream.read().endswith(end_marker):
        return ImageReadError(name, SkipReason.TRUNCATED.value, f"{fmt} cut short in its header")
    detail = f"starts like a {fmt} but its header is invalid"
    return ImageReadError(name, SkipReason.CORRUPT.value, detail)


def sniff(stream: BinaryIO) -> tuple[str | None, bytes]:
    """The image format the first bytes clearly announce (or None), and those bytes."""
    stream.seek(0)
    head = stream.read(512)
    fmt = next((fmt for magic, fmt in _IMAGE_MAGIC if head.startswith(magic)), None)
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        fmt = "BMP"
    return fmt, head


def looks_like(head: bytes) -> str:
    """What a file that is not an image seems to be, from its first bytes, for the skip detail."""
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


def describe_os_error(error: OSError) -> str:
    """A few lower-case words for an OS error ("permission denied"), for a skip or walk detail."""
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
