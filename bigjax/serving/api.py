"""The OpenAI-compatible HTTP API over an engine (FastAPI): completions, chat completions and
responses, streamed or not, the model list, health, Prometheus metrics and vLLM's tokenizer
endpoints.

Every request body is read whole (up to `max_body_bytes`) and validated by the strict models
of protocol.py before anything is queued; every error is OpenAI's JSON error object with a
one-line message. Each request's sequences report to one asyncio queue; a client that goes
away (mid-stream or while waiting) cancels its sequences, which frees their slots at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bigjax.data import tokenizer as tokenizers
from bigjax.serving import bodies, chat, middleware, protocol, responses, text
from bigjax.serving.engine import (
    Engine,
    Event,
    Finished,
    Params,
    PromptScored,
    QueueFull,
    Sequence_,
    Token,
)
from bigjax.serving.monitor import Monitor


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


@dataclasses.dataclass(frozen=True)
class Served:
    """What the API serves: one model behind one engine."""

    engine: Engine
    tokenizer: Any
    model_name: str
    max_len: int  # prompt plus generated tokens
    chat_template: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    allowed_origins: tuple[str, ...] = ()  # browser pages (CORS) that may call the API


def make_app(served: Served, monitor: Monitor) -> FastAPI:
    app = FastAPI(title="bigjax", docs_url=None, redoc_url=None, openapi_url=None)
    middleware.add(app, served.max_body_bytes, served.allowed_origins)
    vocab = served.engine.shapes.vocab

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(
            protocol.error_body(e.message, e.kind, e.status), e.status, headers=e.headers
        )

    def guarded(fn: Callable[[Request], Awaitable[Response]]) -> Callable:
        async def handler(request: Request) -> Response:
            _authorize(request, served.api_key)
            if not served.engine.ready:
                raise ApiError(503, "the model is still compiling; retry when /health is 200",
                               "service_unavailable")  # fmt: skip
            return await fn(request)

        return handler

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what some uptime checks send
    async def health() -> Response:
        ok = served.engine.ready
        return JSONResponse({"status": "ok" if ok else "starting"}, 200 if ok else 503)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> Response:
        return Response(monitor.text(), media_type="text/plain; version=0.0.4")

    the_model = {"id": served.model_name, "object": "model", "created": _STARTED,
                 "owned_by": "bigjax", "max_model_len": served.max_len}  # fmt: skip

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [the_model]})

    async def model(request: Request) -> Response:
        # `client.models.retrieve(name)`: what clients call to check a model exists
        _check_model(request.path_params["name"], served.model_name)
        return JSONResponse(the_model)

    async def tokenizer_info(request: Request) -> Response:
        specials = {v: k for k, v in tokenizers.special_tokens(served.tokenizer).items()}
        tok = served.tokenizer
        return JSONResponse({
            "tokenizer_class": type(tok).__name__, "kind": tok.kind,
            "bos_token": specials[tok.bos_id], "eos_token": specials[tok.eos_id],
            "pad_token": specials[tok.pad_id], "vocab_size": vocab,
            "model_max_length": served.max_len, "chat_template": served.chat_template,
        })  # fmt: skip

    async def tokenize(request: Request) -> Response:
        req = await _parse(request, protocol.TokenizeRequest)
        _check_model(req.model, served.model_name)
        if req.messages is not None:
            prompt = _chat_prompt(served, req.messages, req.add_generation_prompt)
        else:
            prompt = req.prompt or ""
        ids = tokenizers.encode_prompt(served.tokenizer, prompt, add_bos=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": served.max_len, "tokens": ids})

    async def detokenize(request: Request) -> Response:
        req = await _parse(request, protocol.DetokenizeRequest)
        _check_model(req.model, served.model_name)
        _check_ids(req.tokens, vocab, "tokens")
        return JSONResponse({"prompt": served.tokenizer.decode(req.tokens)})

    async def completions(request: Request) -> Response:
        req = await _parse(request, protocol.CompletionRequest)
        _check_model(req.model, served.model_name)
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                prompts.append((p, tokenizers.encode_prompt(served.tokenizer, p, add_bos=True)))
            else:
                _check_ids(p, vocab, "prompt")
                prompts.append((served.tokenizer.decode(p), list(p)))
        job = Job(served, monitor, request, "cmpl", req, req.logprobs)
        scores = req.echo and req.logprobs is not None
        for prompt_text, ids in prompts:
            budget = _budget(len(ids), req.max_tokens, served.max_len)
            for j in range(req.n):
                params = _params(req, budget, j, served, echo_scores=scores,
                                 top=req.logprobs is not None)  # fmt: skip
                prefix = prompt_text if req.echo else ""
                job.add(ids, params, prefix=prefix, echo=req.echo, first=j == 0)
        return await job.respond()

    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, protocol.ChatRequest)
        _check_model(req.model, served.model_name)
        prompt = _chat_prompt(served, req.messages, True)
        ids = tokenizers.encode_prompt(served.tokenizer, prompt, add_bos=True)
        budget = _budget(len(ids), req.token_budget(), served.max_len)
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = Job(served, monitor, request, "chatcmpl", req, top)
        for j in range(req.n):
            params = _params(req, budget, j, served, echo_scores=False, top=top is not None)
            job.add(ids, params, prefix="", echo=False, first=j == 0)
        return await job.respond()

    async def create_response(request: Request) -> Response:
        req = await _parse(request, protocol.ResponsesRequest)
        _check_model(req.model, served.model_name)
        prompt = _chat_prompt(served, req.messages(), True)
        ids = tokenizers.encode_prompt(served.tokenizer, prompt, add_bos=True)
        budget = _budget(len(ids), req.max_output_tokens, served.max_len)
        top = req.logprobs()
        job = Job(served, monitor, request, "resp", req, top)
        job.add(ids, _params(req, budget, 0, served, echo_scores=False, top=top is not None),
                prefix="", echo=False, first=True)  # fmt: skip
        return await job.respond()

    for path, fn, method in (
        ("/v1/models", models, "GET"),
        ("/v1/models/{name:path}", model, "GET"),  # path: a name may hold a slash (org/model)
        ("/tokenizer_info", tokenizer_info, "GET"),
        ("/tokenize", tokenize, "POST"),
        ("/detokenize", detokenize, "POST"),
        ("/v1/completions", completions, "POST"),
        ("/v1/chat/completions", chat_completions, "POST"),
        ("/v1/responses", create_response, "POST"),
    ):
        methods = [method, "HEAD"] if method == "GET" else [method]
        app.add_api_route(path, guarded(fn), methods=methods)

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(
            protocol.error_body(f"no route {request.url.path}", "not_found", 404), 404
        )

    @app.exception_handler(405)
    async def _wrong_method(request: Request, _: Exception) -> JSONResponse:
        message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(protocol.error_body(message, "invalid_request_error", 405), 405)

    return app


_STARTED = int(time.time())


# --- one request's sequences ----------------------------------------------------------------
class Job:
    """The sequences of one request, their events, the metrics they feed."""

    def __init__(self, served: Served, monitor: Monitor, request: Request, kind: str,
                 req: Any, top: int | None):  # fmt: skip
        """`top`: how many top log-probabilities per token (None: no log-probabilities)."""
        self.served, self.monitor, self.request, self.top = served, monitor, request, top
        self.stream, options = req.stream, req.stream_options
        self.include_usage = isinstance(options, protocol.StreamOptions) and options.include_usage
        self.stop = tuple(req.stop)
        self.kind = kind
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrived = time.perf_counter()
        self.choices: list[bodies.Choice] = []
        # the Responses API's object as the request set it (kind "resp" only)
        resp = kind == "resp"
        self.head = responses.response_head(req, served.model_name, self.created) if resp else {}
        self.prompt_tokens = 0
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def add(self, ids: list[int], params: Params, *, prefix: str, echo: bool, first: bool) -> None:
        """One choice; `first`: the first choice of its prompt (usage counts a prompt once)."""
        index = len(self.choices)

        def emit(event: Event) -> None:  # on the engine thread
            self._loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

        det = text.Detokenizer(self.served.tokenizer, self.stop, prefix=prefix)
        choice = bodies.Choice(index, Sequence_(ids, params, emit), det, echo)
        if echo and not params.prompt_scores:
            choice.prompt_scored(None)
        self.choices.append(choice)
        self.prompt_tokens += len(ids) if first else 0

    async def respond(self) -> Response:
        limit = self.served.engine.max_waiting
        if len(self.choices) > limit:  # could never be queued: a 429 would ask for retries
            raise ApiError(
                400,
                f"this request asks for {len(self.choices)} sequences (prompts x "
                f"n); the server queues at most {limit}: send fewer per request",
            )
        try:
            self.served.engine.submit([c.seq for c in self.choices])
        except QueueFull as e:
            self.monitor.rejected.inc()
            raise ApiError(429, str(e), "rate_limit_exceeded", _retry_headers(e)) from None
        if self.stream:
            events = self._response_events() if self.kind == "resp" else self._sse()
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            async for _ in self._pieces():
                pass
        finally:
            self._cancel_unfinished()
        failed = [c.error for c in self.choices if c.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0]}", "server_error")
        if self.kind == "resp":
            c = self.choices[0]
            return JSONResponse(responses.body(self.head, c, self._usage(), self._logprobs))
        whole = bodies.chat_choice if self.kind == "chatcmpl" else bodies.completion_choice
        tok = self.served.tokenizer
        return JSONResponse({
            "id": self.id, "object": _OBJECT[self.kind], "created": self.created,
            "model": self.served.model_name, "usage": self._usage(),
            "choices": [whole(c, tok, self.top) for c in self.choices],
        })  # fmt: skip

    async def _pieces(self) -> AsyncIterator[tuple[bodies.Choice, str]]:
        """(choice, new text) as events arrive, until every choice finished; a client gone
        for good ends it (the caller cancels what is left). Events already waiting are taken
        together, one piece per choice: a stream that falls behind the engine (many slots
        decoding, a slow client) catches up in fewer, longer chunks instead of one per token."""
        open_ = len(self.choices)
        while open_:
            try:
                events = [await asyncio.wait_for(self.events.get(), 1.0)]
            except TimeoutError:
                if await self.request.is_disconnected():
                    return
                continue
            while not self.events.empty():
                events.append(self.events.get_nowait())
            pieces: dict[int, str] = {}  # choice index -> its new text, in arrival order
            for index, event in events:
                c = self.choices[index]
                if c.finish_reason is not None:
                    continue
                if isinstance(event, PromptScored):
                    c.prompt_scored(event)
                    continue
                if isinstance(event, Token):
                    self._timing(c)
                    c.token(event)
                    piece = c.det.add(event.id)
                    if c.det.stopped:
                        c.seq.cancel()
                        open_ -= 1
                        self._finished(c, "stop")
                else:
                    assert isinstance(event, Finished)
                    c.error = event.message
                    open_ -= 1
                    self._finished(c, event.reason)
                    piece = c.det.flush()
                pieces[index] = pieces.get(index, "") + piece
            for index, piece in pieces.items():
                yield self.choices[index], piece

    def _finished(self, c: bodies.Choice, reason: str) -> None:
        c.finish_reason = reason
        self.monitor.finished(reason)
        self.monitor.e2e.observe(time.perf_counter() - self.arrived)

    def _timing(self, c: bodies.Choice) -> None:
        now = time.perf_counter()
        if not c.generated:
            self.monitor.ttft.observe(now - self.arrived)
            self.monitor.prompt_tokens.inc(len(c.seq.prompt))
        else:
            self.monitor.itl.observe(now - c.last_at)
        self.monitor.generation_tokens.inc()
        c.last_at = now

    async def _sse(self) -> AsyncIterator[str]:
        chunk = bodies.chat_chunk if self.kind == "chatcmpl" else bodies.completion_chunk
        envelope = {"id": self.id, "object": _CHUNK[self.kind], "created": self.created,
                    "model": self.served.model_name}  # fmt: skip
        try:
            if self.kind == "chatcmpl":
                for c in self.choices:
                    body = {**envelope, "choices": [bodies.chat_role_chunk(c)]}
                    yield f"data: {json.dumps(body)}\n\n"
            async for c, piece in self._pieces():
                if c.finish_reason == "error":
                    body = protocol.error_body(f"generation failed: {c.error}", "server_error", 500)
                    yield f"data: {json.dumps(body)}\n\n"
                    continue
                if c.echo and c.streamed == 0:
                    piece = c.det.prefix + piece
                if piece or c.finish_reason:
                    choice = chunk(c, self.served.tokenizer, self.top, piece)
                    body = {**envelope, "choices": [choice]}
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
            if self.include_usage:
                body = {**envelope, "choices": [], "usage": self._usage()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._cancel_unfinished()

    def _logprobs(self, c: bodies.Choice, start: int, end: int) -> list[dict]:
        """The Responses API's per-token entries of tokens [start, end) ([] if not asked)."""
        if self.top is None:
            return []
        return bodies.chat_logprobs(c, self.served.tokenizer, self.top, start, end)["content"]

    async def _response_events(self) -> AsyncIterator[str]:
        try:
            pieces = self._pieces()
            async for chunk in responses.stream(pieces, self.head, self._usage, self._logprobs):
                yield chunk
        finally:
            self._cancel_unfinished()

    def _usage(self) -> dict[str, Any]:
        completion = sum(c.generated for c in self.choices)
        if self.kind == "resp":
            return responses.response_usage(self.prompt_tokens, completion)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def _cancel_unfinished(self) -> None:
        """Cancels what the client no longer waits for (it went away, or its request
        failed), counted as cancelled: the engine's own report of it is never read."""
        for c in self.choices:
            if c.finish_reason is None:
                c.seq.cancel()
                c.finish_reason = "cancelled"
                self.monitor.finished("cancelled")


_OBJECT = {"cmpl": "text_completion", "chatcmpl": "chat.completion"}
_CHUNK = {"cmpl": "text_completion", "chatcmpl": "chat.completion.chunk"}


# --- request pieces -------------------------------------------------------------------------
async def _parse(request: Request, model: type[protocol.M]) -> protocol.M:
    try:
        return protocol.parse(await request.body(), model)
    except protocol.BadBody as e:
        raise ApiError(400, str(e)) from None


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    # compare_digest: the time taken does not reveal how much of the key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       "authentication_error")  # fmt: skip


def _retry_headers(e: QueueFull) -> dict[str, str] | None:
    """When to come back: `Retry-After` in whole seconds (RFC 9110: curl, urllib3), and
    OpenAI's `retry-after-ms`, which its clients read first."""
    if e.retry_after_s is None:
        return None
    s = e.retry_after_s
    return {"Retry-After": str(max(1, math.ceil(s))), "retry-after-ms": str(round(s * 1000))}


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name)} characters)"
        raise ApiError(404, f"the model {shown} does not exist; this server serves {served!r}",
                       "not_found_error")  # fmt: skip


def _check_ids(ids: list[int], vocab: int, field: str) -> None:
    bad = [i for i in ids if i >= vocab]
    if bad:
        raise ApiError(
            400, f"{field}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
        )


def _budget(n: int, max_tokens: int | None, max_len: int) -> int:
    if n == 0:
        raise ApiError(400, "prompt: the prompt has no tokens")
    room = max_len - n
    if max_tokens is None:
        if room < 1:
            raise ApiError(400, f"the prompt is {n} tokens; the model's context is {max_len}")
        return room
    if n + max_tokens > max_len:
        raise ApiError(400, f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) is more "
                       f"than the model's context ({max_len} tokens); lower max_tokens or "
                       "shorten the prompt")  # fmt: skip
    return max_tokens


def _params(req: Any, budget: int, j: int, served: Served, *, echo_scores: bool,
            top: bool) -> Params:  # fmt: skip
    seed = (req.seed + j) % 2**32 if req.seed is not None else int.from_bytes(os.urandom(4))
    stops = frozenset() if req.ignore_eos else frozenset({served.tokenizer.eos_id})
    bias = req.token_bias()
    _check_ids([i for i, _ in bias], served.engine.shapes.vocab, "logit_bias")
    return Params(
        # top_k past the vocabulary keeps every token: clamped, so no value reaches the
        # engine's int32 arrays that could fail the step every other sequence shares
        max_tokens=budget, temperature=req.temperature,
        top_k=min(max(req.top_k, 0), served.engine.shapes.vocab),
        top_p=req.top_p, min_p=req.min_p, seed=seed, stop_ids=stops,
        prompt_scores=echo_scores, top=top, logit_bias=bias,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
    )  # fmt: skip


def _chat_prompt(served: Served, messages: list[protocol.Message], add_generation: bool) -> str:
    specials = {v: k for k, v in tokenizers.special_tokens(served.tokenizer).items()}
    tok = served.tokenizer
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return chat.render(
            served.chat_template,
            plain,
            add_generation_prompt=add_generation,
            bos_token=specials[tok.bos_id],
            eos_token=specials[tok.eos_id],
        )
    except Exception as e:  # noqa: BLE001 - a template's own error (raise_exception) is the reason
        raise ApiError(400, f"messages: the chat template refused them: {e}") from None
