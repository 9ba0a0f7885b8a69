"""The request body limit of the HTTP API: a body over the limit is refused with OpenAI's
JSON error and 413 before the app reads it (ASGI middleware, under FastAPI's routing).

A refused upload is read on (and dropped) before the 413, up to DRAIN_BYTES and DRAIN_SECONDS:
a server that answers and closes with the client's bytes unread makes the kernel reset the
connection, and the reset can drop the 413 before the client reads it (it then sees a
connection error, and the openai package retries the same body). Past the bounds the answer
goes out regardless.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from bigjax.serving import protocol

DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0


class BodyLimit:
    """Refuses a body over `max_bytes` with 413 before the app reads it: by its declared
    length at once, else as soon as the chunks received pass the limit."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # a client waiting for `100 Continue` has sent none of it: nothing to read
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive)
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive)
                return await self._refuse(send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Callable) -> None:
        message = f"the request body is over {self.max_bytes} bytes"
        body = json.dumps(protocol.error_body(message, "invalid_request_error", 413)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _drain(receive: Callable) -> None:
    """Reads and drops the rest of a request body, within DRAIN_BYTES and DRAIN_SECONDS."""

    async def read() -> None:
        size = 0
        while size <= DRAIN_BYTES:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(read(), DRAIN_SECONDS)
    except TimeoutError:
        pass  # a client that trickles its bytes gets its 413 now
