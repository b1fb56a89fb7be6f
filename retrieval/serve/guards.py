"""ASGI middleware in front of every handler: the token check and the upload size limit.

Both act before a handler runs, so no handler can forget them. The size limit refuses a body
from its Content-Length before reading a byte of it (413), and counts a body sent without one
(chunked) as it arrives, so an upload never takes more memory than ``--max-upload``.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie

from retrieval.units import human_bytes

# The page stores the token in this cookie so that <img> requests (which cannot send headers)
# are authorised too; it is accepted only for the read-only thumbnail and image routes.
TOKEN_COOKIE = "retrieve_token"
PROTECTED = ("/api/", "/thumb/", "/image/")
COOKIE_OK = ("/thumb/", "/image/")


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class TokenGuard:
    """With a token, every API, thumbnail and image request needs ``Authorization: Bearer T``
    (thumbnails and images also take the page's cookie); the page and its scripts do not."""

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if self.token is None or scope["type"] != "http" or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self._authorised(scope):
            await self.app(scope, receive, send)
            return
        await send_json(
            send,
            401,
            {"error": "this server needs a token: send the header 'Authorization: Bearer TOKEN'"},
            [(b"www-authenticate", b"Bearer")],
        )

    @staticmethod
    def _protected(path: str) -> bool:
        return path.startswith(PROTECTED)

    def _authorised(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:].strip(), self.token):
            return True
        if scope["method"] in ("GET", "HEAD") and scope["path"].startswith(COOKIE_OK):
            cookie = SimpleCookie()
            try:
                cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
            except Exception:  # a malformed cookie header is just no cookie
                return False
            morsel = cookie.get(TOKEN_COOKIE)
            return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.token)
        return False


class UploadLimit:
    """Request bodies over ``max_bytes`` get 413, from the Content-Length before any is read."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refuse(self, send):
        limit = human_bytes(self.max_bytes)
        return send_json(send, 413, {"error": f"upload too large: the limit is {limit}"})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_json(send, 400, {"error": "Content-Length is not a number"})
                return
            if declared > self.max_bytes:
                await self._refuse(send)
                return
        # Without a declared length (or one that lies), the body is read here, counted, and
        # handed on whole: nothing past the limit is ever held.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect as usual
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
