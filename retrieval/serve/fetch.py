"""``--allow-url``: fetch a query image from a URL, with a size cap and a timeout.

Off by default: a server that fetches whatever URL it is given lets anyone who can reach it make
requests from inside the user's network. When on, only http(s) is fetched, at most
``max_bytes``, within ``timeout`` seconds.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from retrieval.errors import RetrieveError
from retrieval.units import human_bytes


class FetchError(RetrieveError):
    """The URL could not be fetched; ``too_large`` when it was over the cap."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def fetch_image(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    try:
        scheme = urlsplit(url).scheme
    except ValueError as error:  # e.g. an unclosed [IPv6 address
        raise FetchError(f"not a URL: {error}") from None
    if scheme not in ("http", "https"):
        raise FetchError(f"only http and https URLs are fetched, not {url[:200]!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "retrieve-serve"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(_too_large(max_bytes), too_large=True)
            data = _read_capped(response, max_bytes, time.monotonic() + timeout)
    except FetchError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise FetchError(f"could not fetch {url}: {getattr(error, 'reason', error)}") from None
    if len(data) > max_bytes:
        raise FetchError(_too_large(max_bytes), too_large=True)
    return data


def _read_capped(response, max_bytes: int, deadline: float) -> bytes:
    # The socket timeout bounds each read; the deadline bounds a server that drips bytes.
    chunks, size = [], 0
    while size <= max_bytes:
        chunk = response.read(min(1 << 16, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            raise FetchError("the image took too long to fetch")
    return b"".join(chunks)


def _too_large(max_bytes: int) -> str:
    return f"the image at that URL is over the limit of {human_bytes(max_bytes)}"
