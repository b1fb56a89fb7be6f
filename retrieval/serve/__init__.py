"""``retrieve serve``: the collection in a browser, and a JSON API, over one open Index.

One model and one index stay loaded for the server's life (a query costs a forward pass and a
search, not a process start). ``create_app`` gives the ASGI app; the CLI runs it on uvicorn.
"""

from __future__ import annotations

from retrieval.serve.app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
