"""Serving across hosts: process 0 schedules, every process runs the same programs.

On a multi-host mesh every program call is a collective: all processes must make the same
calls, with the same inputs, in the same order. Process 0's engine decides each call (which
prompt goes into which slot, which slots decode, with what sampling) and broadcasts it before
making it; the other processes receive each call and make it too, until process 0 says stop.
A call travels as two fixed-shape arrays (so the broadcast compiles once): ints [kind, bucket,
n, row, top_k, seed, top, tokens (max_len), active (B), top_k (B), seed (B), step (B),
top (B), logit_bias ids (K)] and floats [temperature, top_p, min_p, temperature (B), top_p (B),
min_p (B), logit_bias values (K), presence, frequency, repetition], K = MAX_LOGIT_BIAS.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from bigjax.serving import programs as pg

PREFILL, DECODE, STOP = 1, 2, 3
HEADER = 7  # kind, bucket, n, row, top_k, seed, top
FLOATS = 3  # temperature, top_p, min_p: a prefill's, then a decode's columns of B


@dataclasses.dataclass(frozen=True)
class Call:
    kind: int
    tokens_T: np.ndarray | None = None  # PREFILL: the prompt, right-padded to its bucket
    n: int = 0
    row: int = 0
    active_B: np.ndarray | None = None  # DECODE
    sampling: pg.RowSampling | None = None  # [1] for PREFILL, [B] for DECODE
    adjustments: pg.Adjustments | None = None  # PREFILL: the request's bias and penalties


@dataclasses.dataclass(frozen=True)
class Wire:
    """Packs calls into the two broadcast arrays and back."""

    max_len: int
    slots: int

    def pack(self, c: Call) -> tuple[np.ndarray, np.ndarray]:
        s, b, k = self.max_len, self.slots, pg.MAX_LOGIT_BIAS
        ints = np.zeros(HEADER + s + 5 * b + k, np.int32)
        floats = np.zeros(FLOATS + FLOATS * b + k + 3, np.float32)
        ints[0] = c.kind
        p = c.sampling
        if c.kind == PREFILL and c.tokens_T is not None and p is not None:
            ints[1:HEADER] = (len(c.tokens_T), c.n, c.row, int(p.top_k[0]), _i32(p.seed)[0],
                              int(p.top[0]))  # fmt: skip
            ints[HEADER : HEADER + len(c.tokens_T)] = c.tokens_T
            floats[0:FLOATS] = (float(p.temperature[0]), float(p.top_p[0]), float(p.min_p[0]))
            a = c.adjustments or pg.adjustments()
            ints[HEADER + s + 5 * b :] = a.bias_ids_K
            floats[FLOATS + FLOATS * b :] = (*a.bias_K, a.presence, a.frequency, a.repetition)
        elif c.kind == DECODE and c.active_B is not None and p is not None:
            o = HEADER + s
            for i, column in enumerate((c.active_B, p.top_k, _i32(p.seed), p.step, p.top)):
                ints[o + i * b : o + (i + 1) * b] = column
            for i, column in enumerate((p.temperature, p.top_p, p.min_p)):
                floats[FLOATS + i * b : FLOATS + (i + 1) * b] = column
        return ints, floats

    def unpack(self, ints: np.ndarray, floats: np.ndarray) -> Call:
        s, b, k = self.max_len, self.slots, pg.MAX_LOGIT_BIAS
        kind = int(ints[0])
        if kind == PREFILL:
            bucket, n, row, top_k, seed, top = (int(x) for x in ints[1:HEADER])
            t, top_p, min_p = (float(x) for x in floats[0:FLOATS])
            sampling = pg.row_sampling([(t, top_k, top_p, min_p, seed & 0xFFFFFFFF, 0, bool(top))])
            o = FLOATS + FLOATS * b
            adjust = pg.Adjustments(ints[HEADER + s + 5 * b :].copy(), floats[o : o + k].copy(),
                                    *floats[o + k : o + k + 3])  # fmt: skip
            return Call(PREFILL, ints[HEADER : HEADER + bucket].copy(), n, row, sampling=sampling,
                        adjustments=adjust)  # fmt: skip
        if kind == DECODE:
            o = HEADER + s
            columns = [ints[o + i * b : o + (i + 1) * b].copy() for i in range(5)]
            active_B, top_k_B, seed_B, step_B, top_B = columns
            t_B, top_p_B, min_p_B = (floats[FLOATS + i * b : FLOATS + (i + 1) * b].copy()
                                     for i in range(FLOATS))  # fmt: skip
            sampling = pg.RowSampling(t_B, top_k_B, top_p_B, min_p_B, seed_B.view(np.uint32),
                                      step_B, top_B.astype(bool))  # fmt: skip
            return Call(DECODE, active_B=active_B.astype(bool), sampling=sampling)
        return Call(STOP)


def _i32(x: Any) -> np.ndarray:
    return np.asarray(x, np.uint32).view(np.int32)


def broadcast_outcome(texts: list[str] | None, stopped: int) -> tuple[list[str] | None, int]:
    """Process 0's outcome of a pass it led, on every process (what the others pass is
    ignored): its texts (None: its generations failed or were stopped) and its stop vote (0:
    none). As JSON: its length, then its bytes, so both broadcasts have shapes every process
    knows."""
    import jax
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps([texts, stopped]).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    mine = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
    got = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(mine)).tobytes())
    return got[0], int(got[1])


def broadcast(wire: Wire, call: Call | None) -> Call:
    """Process 0 passes its call and gets it back; the others pass None and get process 0's."""
    from jax.experimental import multihost_utils

    ints, floats = wire.pack(call or Call(STOP))
    ints, floats = multihost_utils.broadcast_one_to_all((ints, floats))
    return wire.unpack(np.asarray(ints), np.asarray(floats))
