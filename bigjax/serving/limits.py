"""Limits on what a client may send the HTTP API: the body's size, its encoding (none) and the
time to send a request.

A body over the limit is refused with OpenAI's JSON error and 413 before the app reads it
(ASGI middleware, under FastAPI's routing). A refused upload is read on (and dropped) before
the 413, up to DRAIN_BYTES and DRAIN_SECONDS: a server that answers and closes with the
client's bytes unread makes the kernel reset the connection, and the reset can drop the 413
before the client reads it (it then sees a connection error, and the openai package retries
the same body). Past the bounds the answer goes out regardless.

A request must arrive whole within the request timeout of its first byte (a connection's
first request: of the connection opening). uvicorn has no such timeout (its keep-alive timer
stops at a connection's first byte), so a client that opens connections and sends nothing, or
sends its head a byte at a time, held each connection, and its file descriptor, for ever: a
few thousand such clients (Slowloris) and the server can accept no one. A head not in by the
deadline gets its connection closed (uvicorn has not called the app yet: there is no request
to answer); a body not in by it gets 408. The deadline does not cover the answer: a long
generation or stream is never cut.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import typing
from collections.abc import Callable
from typing import Any, cast

from bigjax.serving import protocol

DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0
GRACE_SECONDS = 0.1  # past a request's deadline, for the loop to read a head that arrived


class BodyLimit:
    """Refuses a body over `max_bytes` with 413 before the app reads it: by its declared
    length at once, else as soon as the chunks received pass the limit; one not in by its
    connection's deadline (when served by `with_request_deadline`'s protocol) with 408; and a
    compressed one (any Content-Encoding) with 415."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        connection = _CONNECTION.get()
        deadline = None  # served without the deadline protocol (a test client): none
        if connection is not None:
            deadline, send = connection.head_received(), connection.answering(send)
        headers = dict(scope.get("headers") or [])
        coding = headers.get(b"content-encoding", b"identity").strip().lower()
        if coding not in (b"", b"identity"):
            # read as it is, a gzip body is "Invalid JSON", and a plain one labelled gzip
            # would be served: neither says what happened (OpenAI takes no compressed bodies)
            await _drain_unless_waiting(headers, receive)
            name = coding.decode("latin-1")[:40]
            return await send_error(send, 415, f"Content-Encoding {name!r} is not supported: "
                                 "send the request body uncompressed")  # fmt: skip
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _drain_unless_waiting(headers, receive)
            return await send_error(send, 413, f"the request body is over {self.max_bytes} bytes")
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout_at(deadline):
                too_big = await _read(receive, chunks, self.max_bytes)
        except TimeoutError:
            if connection is None:
                raise
            connection.timed_out()
            return await send_error(send, 408, "the request body did not arrive within the "
                                 f"{connection.seconds:g} s request timeout")  # fmt: skip
        if too_big is None:
            return None  # the client went away
        if too_big:
            return await send_error(send, 413, f"the request body is over {self.max_bytes} bytes")
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _read(receive: Callable, chunks: list[bytes], max_bytes: int) -> bool | None:
    """Reads the body into `chunks`: False when whole, True once over `max_bytes` (the rest
    drained), None if the client went away."""
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > max_bytes:
            if more:
                await _drain(receive)
            return True
    return False


async def send_error(send: Callable, status: int, message: str) -> None:
    """Answers with OpenAI's error object and closes the connection (the request's bytes may
    be unread, or the server hit a bug)."""
    kind = {408: "timeout", 500: "server_error"}.get(status, "invalid_request_error")
    body = json.dumps(protocol.error_body(message, kind, status)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _drain_unless_waiting(headers: dict[bytes, bytes], receive: Callable) -> None:
    # a client waiting for `100 Continue` has sent none of its body: nothing to read
    if headers.get(b"expect", b"").lower() != b"100-continue":
        await _drain(receive)


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


class _Deadline(typing.Protocol):
    """What the body reader asks of the connection a request arrived on."""

    seconds: float

    def head_received(self) -> float:
        """The head is in: stops the connection's timer; returns the body's deadline."""

    def answering(self, send: Callable) -> Callable:
        """`send` that marks the connection idle once the answer has ended (the next
        request's first byte starts its timer)."""

    def timed_out(self) -> None:
        """Counts a body that missed its deadline."""


# The connection whose bytes are being parsed. uvicorn starts a request's task while parsing,
# so the task (and the app in it) inherits the connection: a context variable, which each
# connection's tasks see as their own; nothing global is shared between connections.
_CONNECTION: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "bigjax_connection", default=None
)


def with_request_deadline(
    inner: type[asyncio.Protocol], seconds: float, on_timeout: Callable[[], None]
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`inner`, built with its own arguments) wrapped so that
    each request must arrive whole within `seconds` of its first byte (the first request: of
    the connection opening): a head that misses it closes the connection, a body that misses
    it gets 408 (BodyLimit). `on_timeout` counts both. Between an answer and the next
    request's first byte the connection is idle, and uvicorn's keep-alive timeout applies."""

    class Guarded(asyncio.Protocol):
        def __init__(self, *args: Any, **kwargs: Any):
            self.inner = inner(*args, **kwargs)
            self.loop = asyncio.get_running_loop()
            self.seconds = seconds
            self.deadline = 0.0  # set when the connection opens
            self.timer: asyncio.Handle | None = None
            self.idle = False  # answered; the next request has not begun
            self.transport: asyncio.Transport | None = None

        def _arm(self) -> None:
            self._disarm()
            self.idle = False
            self.deadline = self.loop.time() + seconds
            self.timer = self.loop.call_at(self.deadline, self._head_too_late)

        def _disarm(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def _head_too_late(self) -> None:
            # Decided a moment later: a loop that was busy or stopped (SIGSTOP, a paused VM)
            # wakes with the timer due and the head unread, or read with its task not yet
            # run; closing at once cut such a request (the task's head_received cancels this)
            self.timer = self.loop.call_later(GRACE_SECONDS, self._close_if_no_head)

        def _close_if_no_head(self) -> None:
            self.timer = None
            if self.transport is not None and not self.transport.is_closing():
                on_timeout()
                self.transport.close()

        def head_received(self) -> float:
            self._disarm()
            return self.deadline

        def answering(self, send: Callable) -> Callable:
            async def sent(message: dict) -> None:
                await send(message)
                done = message["type"] == "http.response.body" and not message.get("more_body")
                if done:
                    self.idle = True  # the next request's first byte starts its deadline

            return sent

        def timed_out(self) -> None:
            on_timeout()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self._arm()
            self.inner.connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self.idle:
                self._arm()
            token = _CONNECTION.set(self)
            try:
                cast(Any, self.inner).data_received(data)
            finally:
                _CONNECTION.reset(token)

        def eof_received(self) -> bool | None:
            return cast(Any, self.inner).eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self.inner.connection_lost(exc)

        def pause_writing(self) -> None:
            self.inner.pause_writing()

        def resume_writing(self) -> None:
            self.inner.resume_writing()

    return Guarded
