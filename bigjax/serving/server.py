"""`bigjax serve RUN`: a trained run behind the OpenAI-compatible API, on uvicorn.

The listening socket is open before the model compiles (so a deployment's probes reach it),
/health answers 503 until every program is compiled and run once, then 200. SIGTERM and
SIGINT stop accepting connections, let every request in flight finish (the engine drains its
queue and slots), and exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from bigjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the line printed at start names it)
    api_key: str | None = None
    slots: int = 8
    max_waiting: int = 256  # sequences queued for a slot: a prompt each, a few KB
    max_len: int = 0  # 0: the run's data.seq_len
    model_name: str = ""  # "": the run directory's name
    tensor: int = 1  # devices per tensor-parallel group (the KV cache's heads split over them)
    chat_template: str = ""  # a Jinja file; "": the tokenizer's own, else chat.PLAIN
    max_body_bytes: int = 4 << 20
    request_timeout: float = 30.0  # seconds to send a whole request (head and body)
    allowed_origins: tuple[str, ...] = ()  # web origins whose pages may call the API (CORS)

    def __post_init__(self) -> None:
        flags = {"slots": "--slots", "max_waiting": "--max-waiting", "tensor": "--tensor",
                 "max_body_bytes": "--max-body-mb"}  # fmt: skip
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise ConfigError(f"serve: {flag} must be >= 1")
        if self.max_len < 0:
            raise ConfigError(f"serve: --max-len {self.max_len}: give tokens per sequence, or 0 "
                              "for the run's data.seq_len")  # fmt: skip
        if not 0 < self.request_timeout < math.inf:
            raise ConfigError(f"serve: --request-timeout {self.request_timeout} must be a "
                              "number of seconds > 0")  # fmt: skip
        for origin in self.allowed_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ConfigError(f"serve: --allowed-origins {origin!r} is not an origin: give "
                                  "scheme://host[:port] (no path), or *")  # fmt: skip
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve: --port {self.port} is not a port (0..65535)")
        # A header carries ASCII (a client sends UTF-8 bytes the server reads as Latin-1, or
        # refuses to send them) and loses its edge spaces; "" matched "Bearer " alone.
        if self.api_key is not None and not re.fullmatch(r"[!-~]+", self.api_key):
            raise ConfigError("serve: --api-key must be printable ASCII without spaces (an "
                              "HTTP header cannot carry others), e.g. one from `openssl rand "
                              "-hex 24`")  # fmt: skip


def serve_run(workdir: str, overrides: Sequence[str], opts: Options) -> int:
    """Serves until SIGTERM/SIGINT; returns the exit code. With several processes (a
    multi-host mesh) process 0 serves HTTP and the others follow its engine (hosts.py)."""
    import jax

    from bigjax import trained

    if jax.process_index() != 0:
        with trained.open_run(workdir, overrides, "serve", tensor=opts.tensor) as (prog, params, _):
            served, _ = _build(workdir, prog, params, opts)
            served.engine.warm_up()
            served.engine.follow()
        return 0
    _allow_open_files()
    sock = _listen(opts.host, opts.port)  # before compiling: a taken port fails at once
    with trained.open_run(workdir, overrides, "serve", tensor=opts.tensor) as (prog, params, step):
        served, monitor = _build(workdir, prog, params, opts)
        host, port = sock.getsockname()[:2]
        print(f"serve: {served.model_name} (checkpoint step {step}) on http://{host}:{port}/v1; "
              f"{opts.slots} slots, context {served.max_len}; /health is 200 once compiled",
              flush=True)  # fmt: skip
        _run_uvicorn(served, monitor, sock, opts.request_timeout)
    print("serve: stopped after finishing the requests in flight", flush=True)
    return 0


def _build(workdir: str, prog: Any, params: Any, opts: Options) -> tuple[Any, Any]:
    from bigjax.data import dataset
    from bigjax.serving import programs as pg
    from bigjax.serving.api import Served
    from bigjax.serving.engine import Engine
    from bigjax.serving.monitor import Monitor

    cfg = prog.cfg
    max_len = opts.max_len or cfg.data.seq_len
    if cfg.model.positions == "learned" and max_len > cfg.model.max_positions:
        raise ConfigError(f"serve: --max-len {max_len} is more than the model's "
                          f"{cfg.model.max_positions} learned positions; lower it.")  # fmt: skip
    _check_cache(pg.shapes_of(prog.graphdef, params, opts.slots, max_len), prog.mesh)
    tokenizer = prog.resources.tokenizer
    template = _chat_template(opts.chat_template, dataset.tokenizer_dir(cfg.data), Path(workdir))
    engine = Engine(prog.graphdef, params, cfg.mesh.rules, slots=opts.slots, max_len=max_len,
                    max_waiting=opts.max_waiting, mesh=prog.mesh)  # fmt: skip
    name = opts.model_name or Path(workdir).resolve().name
    served = Served(engine, tokenizer, name, max_len, template, opts.api_key, opts.max_body_bytes,
                    opts.allowed_origins)  # fmt: skip
    return served, Monitor(name, engine.counts)


def _check_cache(s: Any, mesh: Any) -> None:
    """The KV cache is allocated whole at start: one that cannot fit even spread evenly over
    the devices is refused in one line (it was XLA's out-of-memory traceback)."""
    import jax
    import numpy as np

    from bigjax import memory

    need = 2 * s.layers * s.slots * s.max_len * s.kv_heads * s.head_dim
    need *= np.dtype(s.dtype).itemsize
    # each slot's logit bias (f32), token counts (int32) and prompt's tokens (bool)
    need += 9 * s.slots * s.vocab
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    what = f"serve: the KV cache of {s.slots} slots x {s.max_len:,} tokens"
    memory.check_fits(need, local, what, "lower --max-len or --slots.")


def _chat_template(path: str, data_dir: Path | None, workdir: Path | None = None) -> str:
    from bigjax.serving import chat

    if path:
        if not Path(path).is_file():
            raise ConfigError(f"serve: --chat-template {path}: no such file.")
        try:
            template = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"serve: --chat-template {path}: not UTF-8 text ({e.reason} at "
                              f"byte {e.start}).") from None  # fmt: skip
    else:
        tokenizer_dir = chat.template_dir(data_dir, workdir)
        template = chat.find_template(tokenizer_dir) or chat.PLAIN
    if problem := chat.syntax_error(template):
        where = f"--chat-template {path}" if path else f"the chat template in {tokenizer_dir}"
        raise ConfigError(f"serve: {where} has a Jinja syntax error ({problem}); fix it, or "
                          "pass --chat-template FILE.")  # fmt: skip
    return template


def _allow_open_files() -> None:
    """Raises the soft limit on open files to the hard one: each connection holds a file, and
    the usual soft limit (1024; 256 on macOS) stops the server accepting (and answering) at
    about that many clients, although the hard limit allows far more."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit is refused as a soft one on macOS: 2^20 files is plenty
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # not allowed here: keep what there is
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"serve: cannot listen on {host}:{port} ({e.strerror}); pick "
                          "another --port or stop what holds it.") from None  # fmt: skip
    sock.listen(2048)
    return sock


def _run_uvicorn(served: Any, monitor: Any, sock: socket.socket, request_timeout: float) -> None:
    from bigjax.serving.api import make_app

    app = make_app(served, monitor)
    engine = served.engine

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        def warm() -> None:
            try:
                engine.warm_up()
                engine.start()
            except Exception as e:  # noqa: BLE001 - the server cannot serve: say why, stop
                print(f"serve: the model failed to compile: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)  # fmt: skip
                server.should_exit = True

        warmer = threading.Thread(target=warm, name="bigjax-warm-up", daemon=True)
        warmer.start()
        yield
        if warmer.is_alive():
            # A stop during the compile waits for it: XLA's compiler cannot be interrupted,
            # and a thread left inside it when Python exits aborted the process (exit 134).
            print("serve: stopping once the model has compiled", flush=True)
            warmer.join()
        engine.stop()  # every request in flight has been answered by now

    app.router.lifespan_context = lifespan
    server = _Server(uvicorn_config(app, request_timeout, monitor.timed_out.inc))
    server.run(sockets=[sock])


def uvicorn_config(app: Any, request_timeout: float, on_timeout: Callable[[], None]) -> Any:
    """uvicorn's settings for serving `app`: each request must arrive within `request_timeout`
    seconds (limits.py; `on_timeout` counts those that do not), idle connections close after
    30 s, and uvicorn's own logs stay quiet (the access log of a load test would be most of
    the output)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from bigjax.serving.limits import with_request_deadline

    http = with_request_deadline(AutoHTTPProtocol, request_timeout, on_timeout)
    config = uvicorn.Config(app, http=http, log_level="warning", access_log=False,
                            lifespan="on", timeout_keep_alive=30)  # fmt: skip
    logging.getLogger("uvicorn.error").addFilter(_quiet_upgrades)  # once: the same filter
    return config


def _quiet_upgrades(record: logging.LogRecord) -> bool:
    """False for uvicorn's two warnings on a request that offers to upgrade the connection.
    Java's HttpClient, curl --http2 and Go's h2c clients offer HTTP/2 on a first request over
    plain HTTP and expect, as they get, an HTTP/1.1 answer; uvicorn warned twice of each such
    request and advised installing WebSocket libraries, which nothing here needs."""
    msg = record.getMessage()
    return msg != "Unsupported upgrade request." and not msg.startswith("No supported WebSocket")


class _Server(uvicorn.Server):
    """uvicorn's Server with bigjax's signal handling: SIGTERM/SIGINT/SIGHUP start the graceful
    shutdown and the process then exits 0 (uvicorn itself re-raises the signal after its
    shutdown, which would end the process by the signal instead)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # a closed terminal (SIGHUP) drains too, as it stops a training run; under nohup the
        # hangup stays ignored
        wanted = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            wanted.append(signal.SIGHUP)
        previous = {s: signal.getsignal(s) for s in wanted}

        def stop(signum: int, frame: Any) -> None:
            if self.should_exit and signum == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests
            self.should_exit = True

        for s in previous:
            signal.signal(s, stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
