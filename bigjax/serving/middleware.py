"""The ASGI middleware around the HTTP API, outermost first: CORS (when origins are allowed),
the body limit (bigjax/serving/limits.py), and the answer to a server bug.

A server bug is answered here, inside CORS, not by a FastAPI handler for `Exception`: Starlette
runs that handler in its outermost middleware, outside CORS, so a 500 reached a browser page
without `Access-Control-Allow-Origin`, and the page saw a bare CORS failure instead of the
error. Here it is OpenAI's error object (what clients parse) with the CORS headers of every
other answer, and the log has the traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from bigjax.serving.limits import BodyLimit, send_error

log = logging.getLogger("bigjax.serve")


class ServerErrors:
    """Answers an exception that escapes the app with a 500 and OpenAI's error object, unless
    the answer had begun (a stream: the connection is closed, as uvicorn does)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            log.exception("serve: request failed")
            if started:
                raise
            await send_error(send, 500, f"internal error: {type(e).__name__}: {e}")


def add(app: FastAPI, max_body_bytes: int, allowed_origins: tuple[str, ...]) -> None:
    """Wraps `app` in the API's middleware. Each one added is outside the ones before it."""
    app.add_middleware(ServerErrors)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if allowed_origins:
        # outermost: a 413, 408 or 500 carries the headers too, and a browser page can read
        # the refusal instead of a bare CORS failure. A preflight is answered here, before the
        # key is checked: browsers never send credentials on one.
        app.add_middleware(
            CORSMiddleware, allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600,
            expose_headers=["Retry-After", "retry-after-ms"],  # a page's client backs off
        )  # fmt: skip
