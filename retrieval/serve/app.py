"""The ASGI app of ``retrieve serve``: a page and a JSON API over one open :class:`Index`.

Handlers are as thin as click commands: parse the request, call the Index (off the event loop:
the model through :class:`QueryBatcher`, searches and row lookups in worker threads), shape the
JSON. Only rows of the index are ever served, looked up by id: no part of a request's path
reaches the file system. Every refusal is a 4xx with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import os
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from retrieval import Index, QueryResult, RetrieveError
from retrieval.errors import ImageReadError
from retrieval.images.class_names import name_of
from retrieval.results import MAX_K
from retrieval.serve.batcher import QueryBatcher, Upload, top_classes
from retrieval.serve.collection import CollectionViews, links
from retrieval.serve.fetch import FetchError, fetch_image
from retrieval.serve.guards import TokenGuard, UploadLimit
from retrieval.serve.params import Refused, int_param
from retrieval.serve.thumbs import DEFAULT_SIZE, ThumbCache, fit_size

log = logging.getLogger(__name__)

STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
ROW_ID = re.compile(r"[0-9]{1,18}")  # SQLite ids are int64: longer digit strings are no row
MAX_PAGE = 500
MAX_OFFSET = 2**62  # SQLite integers are 64-bit


@dataclass(frozen=True)
class ServeOptions:
    max_upload: int = 20 << 20  # bytes; larger request bodies get 413
    token: str | None = None  # every API call needs "Authorization: Bearer <token>"
    allow_url: bool = False  # POST /api/query may give {"url": ...} to fetch
    url_timeout: float = 10.0
    reload_every: float = 2.0  # seconds between checks for a newer generation
    warm_model: bool = True  # load the model at start, not on the first upload


class JSON(JSONResponse):
    """ASCII escapes, as ``retrieve query --json`` prints: a file name that is not valid UTF-8
    (kept as surrogate escapes) stays exact instead of failing to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode("ascii")


def create_app(index: Index, options: ServeOptions = ServeOptions()) -> Any:
    """The app, wrapped in the token check and the upload limit. The caller owns ``index``."""
    static = {
        name: resources.files("retrieval.serve").joinpath("static", name).read_bytes()
        for name in STATIC
    }
    thumbs = ThumbCache(index.directory / "thumbs")
    collection = CollectionViews(index)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.batcher = QueryBatcher(index)
        tasks = [asyncio.create_task(_follow_generations(index, options.reload_every))]
        if options.warm_model:
            tasks.append(asyncio.create_task(_warm(index)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await to_thread.run_sync(app.state.batcher.close)

    async def page(request: Request) -> Response:
        return Response(static["index.html"], media_type="text/html")

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise Refused(404, "no such file")
        return Response(static[name], media_type=STATIC[name])

    async def info(request: Request) -> Response:
        return JSON(await to_thread.run_sync(index.info))

    async def labels(request: Request) -> Response:
        return JSON(await to_thread.run_sync(index.labels))

    async def query(request: Request) -> Response:
        started = time.perf_counter()
        upload = await _read_upload(request, index, options)
        answer = await request.app.state.batcher.ask(upload)
        if answer.result.error:
            raise Refused(400, answer.result.error)
        return JSON(_shaped(answer.result, answer.classes, started, index))

    async def neighbors(request: Request) -> Response:
        started = time.perf_counter()
        row_id = _row_id(request.path_params["id"])
        k = _k(request.query_params.get("k"))
        try:
            [result] = await to_thread.run_sync(lambda: index.neighbors([row_id], k))
        except KeyError:
            raise Refused(404, f"no indexed image has id {row_id}") from None
        classes = await to_thread.run_sync(top_classes, index, [row_id])
        return JSON(_shaped(result, classes, started, index))

    async def images(request: Request) -> Response:
        params = request.query_params
        offset = int_param(params.get("offset"), "offset", 0, 0, MAX_OFFSET)
        limit = int_param(params.get("limit"), "limit", 60, 1, MAX_PAGE)
        label, contains = params.get("label") or None, params.get("q") or None

        def page_of_rows() -> dict:
            rows = index.rows(label=label, contains=contains, offset=offset, limit=limit)
            total = index.count_rows(label=label, contains=contains)
            return {
                "total": total,
                "offset": offset,
                "limit": limit,
                "images": [_row_json(row) for row in rows],
            }

        return JSON(await to_thread.run_sync(page_of_rows))

    async def thumb(request: Request) -> Response:
        row = await _indexed_row(index, request.path_params["id"])
        size = fit_size(int_param(request.query_params.get("size"), "size", DEFAULT_SIZE, 1, 4096))
        etag = f'"{row.sha256}-{size}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        try:
            data = await to_thread.run_sync(thumbs.get, row.path, row.sha256, size)
        except ImageReadError as error:
            raise Refused(404, f"image {row.id} cannot be read any more: {error}") from None
        return Response(data, media_type="image/jpeg", headers=headers)

    async def image(request: Request) -> Response:
        row = await _indexed_row(index, request.path_params["id"])
        if not os.path.isfile(row.path):
            raise Refused(404, f"image {row.id} is no longer on disk")
        kind = mimetypes.guess_type(row.path)[0] or ""
        return FileResponse(
            row.path,
            media_type=kind if kind.startswith("image/") else "application/octet-stream",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private"},
            filename=None,
        )

    async def duplicates(request: Request) -> Response:
        return JSON(await collection.duplicates(request.query_params))

    async def not_duplicate(request: Request) -> Response:
        form = await request.form()
        if not form.get("a") or not form.get("b"):
            raise Refused(422, "give the two images' ids as form fields a and b")
        first = int_param(form.get("a"), "a", 0, 1, None)
        second = int_param(form.get("b"), "b", 0, 1, None)
        return JSON(await collection.not_duplicate(first, second))

    async def clusters(request: Request) -> Response:
        return JSON(await collection.clusters(request.query_params))

    routes = [
        Route("/", page),
        Route("/static/{name}", static_file),
        Route("/api/info", info),
        Route("/api/labels", labels),
        Route("/api/query", query, methods=["POST"]),
        Route("/api/neighbors/{id}", neighbors),
        Route("/api/images", images),
        Route("/api/duplicates", duplicates),
        Route("/api/not-duplicate", not_duplicate, methods=["POST"]),
        Route("/api/clusters", clusters),
        Route("/thumb/{id}", thumb),
        Route("/image/{id}", image),
    ]
    handlers = {Refused: _refused, HTTPException: _http_error, RetrieveError: _retrieve_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    return TokenGuard(UploadLimit(app, options.max_upload), options.token)


# -- parsing -----------------------------------------------------------------------------------


async def _read_upload(request: Request, index: Index, options: ServeOptions) -> Upload:
    """The query image of POST /api/query: multipart field ``file``, or ``{"url": ...}``."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8)
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise Refused(400, "send the image as the multipart file field 'file'")
        k = _k(form.get("k") or request.query_params.get("k"))
        return Upload(await file.read(), k, file.filename or "<upload>")
    if kind.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "the body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            raise Refused(400, 'send {"url": "http://..."} or a multipart field \'file\'')
        if not options.allow_url:
            raise Refused(403, "this server does not fetch URLs (start it with --allow-url)")
        k = _k(body.get("k") or request.query_params.get("k"))
        url = body["url"]
        try:
            data = await to_thread.run_sync(
                fetch_image, url, options.max_upload, options.url_timeout
            )
        except FetchError as error:
            raise Refused(413 if error.too_large else 400, str(error)) from None
        return Upload(data, k, url)
    raise Refused(415, "send multipart/form-data with the image in the field 'file'")


def _k(text: Any) -> int:
    """At most this many neighbours (an index holding fewer answers with all it holds)."""
    return int_param(text, "k", 6, 1, MAX_K)


def _row_id(text: str) -> int:
    if not ROW_ID.fullmatch(text):
        raise Refused(404, "no such image")
    return int(text)


async def _indexed_row(index: Index, text: str):
    row_id = _row_id(text)
    found = await to_thread.run_sync(lambda: index.rows([row_id], status=None))
    if not found or found[0].status != "indexed":
        raise Refused(404, f"no indexed image has id {row_id}")
    return found[0]


# -- shaping -----------------------------------------------------------------------------------


def _shaped(
    result: QueryResult, classes: list[tuple[str, float]], started: float, index: Index
) -> dict:
    """What ``retrieve query --json`` prints, plus image links, the model's classes (with
    readable names of WordNet ids, as the checkpoint records them) and time."""
    data = result.to_dict()
    for neighbor in data["neighbors"]:
        neighbor.update(links(neighbor["id"]), **_name(neighbor["label"], neighbor["path"]))
    names = index.model.class_names if classes else {}
    data["classes"] = [
        {"label": label, "probability": p, **({"name": names[label]} if label in names else {})}
        for label, p in classes
    ]
    data["took_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return data


def _row_json(row) -> dict:
    return {
        "id": row.id,
        "path": row.path,
        "label": row.label,
        **_name(row.label, row.path),
        **links(row.id),
    }


def _name(label: str, path: str) -> dict:
    """``{"name": "tench"}`` for a WordNet-id folder a ``words.txt`` near the image names."""
    name = name_of(label, path)
    return {"name": name} if name else {}


# -- errors and background work ----------------------------------------------------------------


async def _refused(request: Request, error: Refused) -> Response:
    return JSON({"error": error.message}, status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    message = {404: "not found", 405: "method not allowed"}.get(error.status_code, error.detail)
    return JSON({"error": message}, status_code=error.status_code, headers=error.headers)


async def _retrieve_error(request: Request, error: RetrieveError) -> Response:
    return JSON({"error": str(error)}, status_code=400)


async def _follow_generations(index: Index, every: float) -> None:
    """Switch to a generation ``retrieve index`` committed (reload reads only manifest.json)."""
    while True:
        await asyncio.sleep(every)
        try:
            if await to_thread.run_sync(index.reload):
                log.warning("now serving generation %d (%d images)", index.generation, index.count)
        except Exception:  # a half-written index on disk must not stop the server
            log.exception("could not reload the index")


async def _warm(index: Index) -> None:
    """The searcher (norms, a bf16 copy) and the model, readied before the first query."""
    try:
        await to_thread.run_sync(index.warm)
    except RetrieveError as error:
        log.warning("the model could not be loaded: %s (uploads will fail)", error)
