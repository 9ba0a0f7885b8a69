"""Continuous batching: requests wait in a bounded queue, each is prefilled into a free decode
slot as soon as one is free, and one compiled decode step advances every busy slot at once; a
finished or cancelled sequence frees its slot for the next waiting one at the next step.

The engine runs on its own thread and speaks in token ids only. It reports to each sequence
through the sequence's `emit` callback (called on the engine thread: the HTTP layer hands the
events to its event loop), so text, stop strings and the wire format stay out of it. Prompt
lengths are rounded up to a few buckets and every program is compiled and run once in
`warm_up`: nothing compiles while serving.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bigjax import tree
from bigjax.scoring import length_buckets
from bigjax.serving import hosts
from bigjax.serving import programs as pg
from bigjax.sharding import Rules

log = logging.getLogger("bigjax.serve")


class QueueFull(Exception):
    """The waiting queue is full: the caller answers 429, telling the client to come back in
    `retry_after_s` seconds (None: no estimate, as when the server is shutting down)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# Retry-After: the OpenAI clients honour a server's value under 60 s (past it they fall back
# to their own backoff), and one under 50 ms would bring a client back before a step.
RETRY_AFTER_S = (0.05, 59.0)


@dataclasses.dataclass(frozen=True)
class Params:
    """One sequence's generation parameters (validated by the HTTP layer)."""

    max_tokens: int  # 0: score the prompt only (echo)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()  # the sequence ends after emitting one
    prompt_scores: bool = False  # report the prompt tokens' log-probabilities
    top: bool = False  # report each token's most likely alternatives (Token.top)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias): distinct ids
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (id, log-probability), most likely first


@dataclasses.dataclass(frozen=True)
class PromptScored:
    logprobs: tuple[float, ...]  # of prompt tokens 1..n-1
    top: tuple[tuple[tuple[int, float], ...], ...]  # at positions 0..n-2 (for tokens 1..n-1)


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (a stop token), "length" (max_tokens), "cancelled" or "error"
    message: str = ""


Event = Token | PromptScored | Finished


class Sequence_:
    """One prompt being completed: what the engine needs and where it reports."""

    def __init__(self, prompt: Sequence[int], params: Params, emit: Callable[[Event], None]):
        self.prompt = list(prompt)
        self.params = params
        self.emit = emit
        self.generated = 0
        self.cancelled = False  # set from any thread; read by the engine at its next step

    def cancel(self) -> None:
        self.cancelled = True


def buckets_for(max_len: int) -> tuple[int, ...]:
    """Prompt lengths compiled: powers of two from 16, and max_len itself."""
    return length_buckets(max_len, smallest=16)


class Engine:
    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: tree.Params,
        rules: Rules,
        *,
        slots: int,
        max_len: int,
        max_waiting: int,
        buckets: Sequence[int] | None = None,
        mesh: Mesh | None = None,
        wrap: Callable[[Callable], Callable] = lambda f: f,
    ):
        """`mesh`: the mesh the programs are traced under (the engine's threads set it);
        `wrap` is applied to each program before jit (tests count traces with it)."""
        self.params, self.rules, self.mesh = params, rules, mesh
        self.shapes = pg.shapes_of(graphdef, params, slots, max_len)
        self.buckets = tuple(buckets or buckets_for(max_len))
        self.max_waiting = max_waiting
        self._prefill = jax.jit(wrap(pg.make_prefill(graphdef, rules)), donate_argnums=1)
        self._decode = jax.jit(wrap(pg.make_decode(graphdef, rules)), donate_argnums=1)
        self._slots = jax.jit(lambda: pg.empty_slots(self.shapes, self.rules))()
        self._rows: list[Sequence_ | None] = [None] * slots
        self._waiting: collections.deque[Sequence_] = collections.deque()
        # A 429's Retry-After: how long a sequence holds a slot (a moving average; None until
        # one has finished), when each row was filled, and when the last client refused was
        # told to come back.
        self._hold_s: float | None = None
        self._filled_at = [0.0] * slots
        self._told = 0.0
        lock = threading.Lock()
        self._wake = threading.Condition(lock)  # work arrived (or stop)
        self._idle = threading.Condition(lock)  # the engine thread waits with nothing to do
        self._busy = False  # the engine thread is in a step (it may be making a call)
        self._ended = False  # the engine thread has left its loop (stopped, or failed)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = False
        # several processes: process 0 broadcasts each call before making it (hosts.py)
        self._wire = hosts.Wire(max_len, slots) if jax.process_count() > 1 else None

    # --- the HTTP side ----------------------------------------------------------------------
    def submit(self, seqs: Sequence[Sequence_]) -> None:
        """Queues all of `seqs` or none (QueueFull)."""
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            over = len(self._waiting) + len(seqs) - self.max_waiting
            if over > 0:
                wait_s = self._retry_after(over, len(seqs))
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting (the queue holds "
                    f"{self.max_waiting}); retry in {wait_s:.1f} s",
                    wait_s,
                )
            self._waiting.extend(seqs)
            self._wake.notify()

    def _retry_after(self, over: int, n: int) -> float:
        """(Lock held) Seconds until there is room for `n` more sequences if the refused
        clients queued on behind the queue: `over` places must free first, and after them
        those of the clients refused before. Places free as slots do: one every hold time /
        slots. Told one time, the clients refused together would come back as one crowd, to
        be refused again; told their turns, they come back at the rate the queue takes them."""
        now = time.monotonic()
        per_place = (self._hold_s or 1.0) / len(self._rows)  # a second: a guess until measured
        turn = max(now + over * per_place, self._told)
        self._told = turn + n * per_place
        return min(max(turn - now, RETRY_AFTER_S[0]), RETRY_AFTER_S[1])

    def counts(self) -> dict[str, int]:
        running = sum(r is not None for r in self._rows)
        return {"running": running, "waiting": len(self._waiting), "slots": len(self._rows)}

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # --- lifecycle --------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Compiles and runs every program once (a prefill per bucket, the decode step)."""
        with self._in_mesh():
            self._warm_up()

    def _in_mesh(self) -> contextlib.AbstractContextManager:
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _warm_up(self) -> None:
        b = self.shapes.slots
        for t in self.buckets:
            self._slots, *_ = self._prefill(
                self.params, self._slots, np.zeros((t,), np.int32), np.int32(1), np.int32(0),
                pg.row_sampling([(0.0, 0, 1.0, 0.0, 0, 0, True)]), pg.adjustments(),
            )  # fmt: skip
        rows = pg.row_sampling([(0.0, 0, 1.0, 0.0, 0, 0, True)] * b)
        self._slots, out = self._decode(self.params, self._slots, np.zeros((b,), bool), rows)
        jax.block_until_ready(out)
        self.ready = True

    def start(self) -> None:
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="bigjax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stops taking sequences, finishes every queued and running one, then returns."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.end_pass()

    @property
    def leads(self) -> bool:
        """Whether this process schedules (one process alone, or process 0 of several); the
        others `follow` it."""
        return self._wire is None or jax.process_index() == 0

    def end_pass(self) -> None:
        """With several processes, after work process 0 led (or at `stop`): the followers'
        `follow` returns (a benchmark's generations are over; the next, they follow again).
        It waits for the engine thread to be idle first: a sequence cancelled by its stop
        string (or by a stop) is dropped at the engine's next step, and a step in flight
        may still make a call; two threads broadcasting at once would cross the calls."""
        if self._wire is None:
            return
        with self._idle:
            self._idle.wait_for(self._quiet)
        with self._in_mesh():
            hosts.broadcast(self._wire, hosts.Call(hosts.STOP))

    def _quiet(self) -> bool:
        """(Lock held) whether the engine thread will make no call before more work comes."""
        if self._thread is None or self._ended:
            return True
        return not self._busy and not self._waiting and not any(self._rows)

    def follow(self) -> None:
        """On every process but 0: makes the calls process 0 broadcasts, until it stops."""
        assert self._wire is not None, "follow() is for multi-process serving"
        with self._in_mesh():
            while (call := hosts.broadcast(self._wire, None)).kind != hosts.STOP:
                self._execute(call)

    def _issue(self, call: hosts.Call) -> tuple[pg.Emitted, Any]:
        if self._wire is not None:
            hosts.broadcast(self._wire, call)
        return self._execute(call)

    def _execute(self, c: hosts.Call) -> tuple[pg.Emitted, Any]:
        if c.kind == hosts.PREFILL:
            self._slots, out, scores = self._prefill(
                self.params, self._slots, c.tokens_T, np.int32(c.n), np.int32(c.row), c.sampling,
                c.adjustments,
            )  # fmt: skip
            return out, scores
        self._slots, out = self._decode(self.params, self._slots, c.active_B, c.sampling)
        return out, None

    # --- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self._in_mesh():
                self._loop()
        finally:
            with self._idle:
                self._busy, self._ended = False, True
                self._idle.notify_all()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not any(self._rows) and not self._stopping:
                    self._busy = False
                    self._idle.notify_all()
                    self._wake.wait()
                if self._stopping and not self._waiting and not any(self._rows):
                    return
                self._busy = True
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - reported to every sequence, engine goes on
                log.exception("serve: engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                if self._wire is not None:  # the other processes' slots differ now: stop
                    with self._wake:
                        self._stopping, self.ready = True, False
                    return

    def _step(self) -> None:
        self._drop_cancelled()
        for row in range(len(self._rows)):
            if self._rows[row] is None:
                with self._wake:
                    seq = self._waiting.popleft() if self._waiting else None
                if seq is None:
                    break
                if not seq.cancelled:
                    self._admit(row, seq)
        if any(self._rows):
            self._decode_all()

    def _drop_cancelled(self) -> None:
        with self._wake:
            cancelled = [s for s in self._waiting if s.cancelled]
            for s in cancelled:
                self._waiting.remove(s)
        for s in cancelled:
            s.emit(Finished("cancelled"))
        for row, seq in enumerate(self._rows):
            if seq is not None and seq.cancelled:
                self._finish(row, "cancelled")

    def _admit(self, row: int, seq: Sequence_) -> None:
        n, p = len(seq.prompt), seq.params
        tokens_T = np.zeros((self.bucket(n),), np.int32)
        tokens_T[:n] = seq.prompt
        sampling = pg.row_sampling([(p.temperature, p.top_k, p.top_p, p.min_p, p.seed, 0, p.top)])
        adjust = pg.adjustments(p.logit_bias, p.presence_penalty, p.frequency_penalty,
                                p.repetition_penalty)  # fmt: skip
        out, scores = self._issue(
            hosts.Call(hosts.PREFILL, tokens_T, n, row, sampling=sampling, adjustments=adjust)
        )
        self._rows[row], self._filled_at[row] = seq, time.monotonic()
        if p.prompt_scores:
            logp, ids, top = jax.device_get(scores)
            seq.emit(PromptScored(
                tuple(float(x) for x in logp[: n - 1]),
                tuple(_top(ids[t], top[t]) if p.top else () for t in range(n - 1)),
            ))  # fmt: skip
        if p.max_tokens == 0:
            self._finish(row, "length")
            return
        self._emit_token(row, _fetch(out, p.top), 0)

    def _decode_all(self) -> None:
        b = len(self._rows)
        active = np.array([s is not None for s in self._rows])
        rows = []
        for s in self._rows:
            p = s.params if s is not None else Params(max_tokens=1)
            rows.append((p.temperature, p.top_k, p.top_p, p.min_p, p.seed,
                         s.generated if s else 0, p.top))  # fmt: skip
        sampling = pg.row_sampling(rows)
        out, _ = self._issue(hosts.Call(hosts.DECODE, active_B=active, sampling=sampling))
        out = _fetch(out, bool(sampling.top.any()))
        for row in range(b):
            if active[row]:
                self._emit_token(row, out, row)

    def _emit_token(self, row: int, out: pg.Emitted, i: int) -> None:
        seq = self._rows[row]
        assert seq is not None
        token = int(out.token_B[i])
        seq.generated += 1
        # the alternatives only when asked for: 20 pairs per token cost more host time than
        # the rest of a tiny model's decode step
        top = _top(out.top_ids_BN[i], out.top_logprobs_BN[i]) if seq.params.top else ()
        seq.emit(Token(token, float(out.logprob_B[i]), top))
        if token in seq.params.stop_ids:
            self._finish(row, "stop")
        elif seq.generated >= seq.params.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: int, reason: str, message: str = "") -> None:
        seq = self._rows[row]
        self._rows[row] = None
        if seq is not None:
            held = time.monotonic() - self._filled_at[row]
            # over about the last 64: a few aborted streams among them move it little
            last = self._hold_s
            self._hold_s = held if last is None else last + (held - last) / 64
            seq.emit(Finished(reason, message))

    def _fail_all(self, message: str) -> None:
        for row in range(len(self._rows)):
            self._finish(row, "error", message)
        # the donated slots may be gone: start from empty ones
        self._slots = jax.jit(lambda: pg.empty_slots(self.shapes, self.rules))()


def _fetch(out: pg.Emitted, top: bool) -> pg.Emitted:
    """The step's output on the host; the alternatives only when a row asked for them (each
    array fetched is a device-to-host transfer per step)."""
    if top:
        return jax.device_get(out)
    token_B, logprob_B = jax.device_get((out.token_B, out.logprob_B))
    return pg.Emitted(token_B, logprob_B, None, None)  # type: ignore[arg-type]


def _top(ids: Any, logprobs: Any) -> tuple[tuple[int, float], ...]:
    return tuple((int(i), float(lp)) for i, lp in zip(ids, logprobs, strict=True))
