"""The library's exceptions: one small hierarchy, so the CLI can turn each into one line.

Also :class:`SkipReason`, the stable tags an :class:`ImageReadError` carries.
"""

from __future__ import annotations

import enum


class RetrieveError(Exception):
    """Base of every error a user can cause; the CLI prints it as one line and exits 1."""


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


class ImageReadError(RetrieveError):
    """An image file cannot be used; ``reason`` is a SkipReason value such as ``truncated``."""

    def __init__(self, path: object, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        message = f"{self.path}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(message)


class WeightsError(RetrieveError):
    """Weights cannot be loaded: missing or corrupt file, wrong architecture, no download."""


class DataError(RetrieveError):
    """A training or evaluation data set is missing or laid out in a way we cannot read."""


class IndexStoreError(RetrieveError):
    """Base of the errors about an index directory."""


class IndexNotFoundError(IndexStoreError):
    """No index at the given place yet."""


class IndexCorruptError(IndexStoreError):
    """An index directory exists but a file in it is damaged, missing or from another version."""


class IndexMismatchError(IndexStoreError):
    """A query or an update uses a model or preprocessing other than the index was built with."""


class IndexLockedError(IndexStoreError):
    """Another process is writing this index."""
