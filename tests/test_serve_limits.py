"""The request timeout as a hostile client meets it: real uvicorn on loopback with serve's own
settings, an app behind the body limit, and raw sockets that send nothing, send a head or a
body a byte at a time, or read a long answer slowly."""

import asyncio
import json
import socket
import threading
import time

import pytest

from bigjax.serving.limits import BodyLimit
from bigjax.serving.server import uvicorn_config

TIMEOUT = 1.0  # the server's request timeout (s)
# how long a test waits for a close that should come at TIMEOUT: generous for a loaded CI
# machine, yet far under "never", which is what a connection got before the timeout existed
WAIT = 10.0


async def _app(scope, receive, send):
    """`/` answers the body's length; `/slow` answers in three parts over 1.6 s (longer than
    the timeout: an answer is never timed); `/stall` holds the whole event loop for 1.5 s,
    as a stopped or overloaded server does."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stall":
        time.sleep(1.5)
    if scope["path"] == "/slow":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two "):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.8)
        await send({"type": "http.response.body", "body": b"three"})
        return
    answer = json.dumps(len(body)).encode()
    headers = [(b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def port():
    """A uvicorn server in a thread; yields (port, timeouts counted)."""
    import uvicorn

    counted = []
    config = uvicorn_config(BodyLimit(_app, 1 << 20), TIMEOUT, lambda: counted.append(1))
    config.lifespan = "off"
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1], counted
    server.should_exit = True
    thread.join(10)


def _connect(port, first=b""):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(first)
    return s


def _read_to_close(s, wait=WAIT):
    """Everything the server sends until it closes; fails if it is still open after `wait`."""
    s.settimeout(wait)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _answer(s):
    """The body of the next answer on `s` (one with a content-length)."""
    s.settimeout(WAIT)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed without an answer (after {data!r})"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return body


def _trickle(s, data, every=0.1):
    """Sends one byte every `every` s; returns how many went before the server closed."""
    for i in range(len(data)):
        try:
            s.send(data[i : i + 1])
        except OSError:
            return i
        time.sleep(every)
    return len(data)


def test_a_request_not_sent_in_time_is_cut_and_an_answer_is_never_timed(port):
    port, counted = port
    # a whole request that arrives while the loop is stalled, past its connection's deadline:
    # its head is in when the loop wakes, so it is answered (it was cut: the timer ran first)
    late = _connect(port)
    _connect(port, b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)  # the stall has begun
    late.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlate")
    assert _answer(late) == b"4"
    # an answer that takes longer than the timeout (read below, after the others' timeouts)
    kept = _connect(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    opened = time.monotonic()
    silent = [_connect(port) for _ in range(20)]  # Slowloris: connect, send nothing
    head = _connect(port, b"POST / HTTP/1.1\r\nHost: x\r\n")  # a head, never finished
    body = _connect(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
    for s in silent:
        assert _read_to_close(s) == b""
    assert _read_to_close(head) == b""
    assert time.monotonic() - opened < WAIT
    refused = _read_to_close(body)
    assert refused.startswith(b"HTTP/1.1 408") and b"1 s request timeout" in refused
    # a head sent a byte at a time: the connection closes long before its 43 bytes (4.3 s)
    # are in (uvicorn's own keep-alive timer stops at a connection's first byte)
    request = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 2 + b"\r\n"
    assert _trickle(_connect(port), request) < len(request)

    # the long answer, and a second request on its connection after an idle pause longer
    # than the timeout: both whole, because the timer runs only while a request is being
    # sent (an idle connection is uvicorn's keep-alive's)
    kept.settimeout(WAIT)
    seen = b""
    while not seen.endswith(b"three\r\n0\r\n\r\n"):
        seen += kept.recv(65536)
    assert b"one " in seen and b"two " in seen
    time.sleep(1.5 * TIMEOUT)
    kept.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert _answer(kept) == b"3"
    # ... and its next request, sent slowly, is cut: its first byte started its timer
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _trickle(kept, request, every=0.2) < len(request)
    # 20 silent, 1 unfinished head, 1 late body, 2 dribbled heads
    assert len(counted) == 24
    # the server still answers at once
    fresh = _connect(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert _answer(fresh) == b"2"


def test_an_offer_to_upgrade_is_answered_in_http_1_1_without_a_warning(port):
    """Java's HttpClient and curl --http2 offer HTTP/2 (h2c) on a first request: the answer is
    HTTP/1.1, which they expect, and the log stays quiet (uvicorn warned twice per request and
    told the operator to install WebSocket libraries)."""
    import logging

    number, _ = port
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    log = logging.getLogger("uvicorn.error")
    log.addHandler(handler)
    try:
        for upgrade in (b"h2c", b"websocket"):
            s = _connect(number, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                         b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: " + upgrade +
                         b"\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nabc")  # fmt: skip
            assert _answer(s) == b"3"
            s.close()
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in seen] == []
