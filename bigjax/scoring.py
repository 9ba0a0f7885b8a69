"""Per-token log-likelihoods of many token sequences, packed and batched, compiled once:
what benchmark harnesses ask of a model (`loglikelihood`, `loglikelihood_rolling`)
and what `bigjax serve` must agree with (its `echo` log-probabilities).

Each sequence is a context followed by a continuation, cut from the left to the model's
context; sequences are packed into rows (see Scorer) and scored by one forward pass a batch.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.models import decoder


@dataclasses.dataclass(frozen=True)
class Scored:
    logprobs: tuple[float, ...]  # of each continuation token
    greedy: bool  # every continuation token is the model's argmax there

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


def length_buckets(max_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Lengths to compile for: powers of two from `smallest`, and max_len itself."""
    out, b = [], min(smallest, max_len)
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


def make_score_fn(graphdef: nnx.GraphDef) -> Callable:
    """Jitted `score(params, inputs, targets, seg, positions) -> (target log-prob [B, L],
    target is argmax [B, L])`."""

    def score(params: Any, inputs_BL: jax.Array, targets_BL: jax.Array, seg_BL: jax.Array,
              positions_BL: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        model = decoder(nnx.merge(graphdef, params))
        logits_BLV = model(inputs_BL, seg_BL, positions_BL).astype(jnp.float32)
        logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
        target_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
        return target_BL, jnp.argmax(logits_BLV, axis=-1) == targets_BL

    return jax.jit(score)


class Scorer:
    """Scores (context ids, continuation ids) pairs with a model's parameters.

    Sequences are packed into rows of the model's context as training packs documents
    (segment ids keep them apart, positions restart at each), longest first into the row with
    the most room: a batch is nearly all real tokens whatever the lengths, and every batch has
    one shape, so an evaluation compiles once."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, max_len: int, tokens: int = 8192):
        """`tokens` per batch bounds the logits held at once: tokens x vocabulary floats."""
        self.params, self.max_len = params, max_len
        self.rows = max(1, tokens // max_len)
        self._score = make_score_fn(graphdef)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
              progress: Callable[[int], None] | None = None) -> list[Scored]:  # fmt: skip
        """One Scored per pair, in order. A context may be empty only if the continuation has
        two or more tokens (its first token is then not scored: nothing predicts it)."""
        seqs = [self._sequence(ctx, cont) for ctx, cont in pairs]
        packed = self._pack([len(seq) - 1 for seq, _ in seqs])
        out: list[Scored | None] = [None] * len(seqs)
        for start in range(0, len(packed), self.rows):
            batch = packed[start : start + self.rows]
            logp, greedy = self._run([[(seqs[i][0], o) for i, o in row] for row in batch])
            for r, row in enumerate(batch):
                for i, offset in row:
                    seq, n_cont = seqs[i]
                    end = offset + len(seq) - 1
                    lp, gr = logp[r, end - n_cont : end], greedy[r, end - n_cont : end]
                    out[i] = Scored(tuple(float(x) for x in lp), bool(gr.all()))
            if progress is not None:
                progress(sum(len(row) for row in batch))
        return [x for x in out if x is not None]

    def _sequence(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[list[int], int]:
        if not cont:
            raise ValueError("a continuation needs at least one token")
        seq = (list(ctx) + list(cont))[-(self.max_len + 1) :]
        n_cont = min(len(cont), len(seq) - 1)
        if n_cont < 1:
            raise ValueError("a one-token sequence has nothing to score; give a context")
        return seq, n_cont

    def _pack(self, lengths: list[int]) -> list[list[tuple[int, int]]]:
        """Rows of (sequence index, offset): longest first, each into the row with the most
        room left (a heap), or a new row."""
        rows: list[list[tuple[int, int]]] = []
        room: list[tuple[int, int]] = []  # (-room left, row)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            n = lengths[i]
            if room and -room[0][0] >= n:
                left, r = heapq.heappop(room)
                rows[r].append((i, self.max_len + left))
                heapq.heappush(room, (left + n, r))
            else:
                rows.append([(i, 0)])
                heapq.heappush(room, (n - self.max_len, len(rows) - 1))
        return rows

    def _run(self, rows: list[list[tuple[list[int], int]]]) -> tuple[np.ndarray, ...]:
        shape = (self.rows, self.max_len)
        inputs, targets, seg, positions = (np.zeros(shape, np.int32) for _ in range(4))
        for r, row in enumerate(rows):
            for k, (seq, o) in enumerate(row, start=1):
                n = len(seq) - 1
                inputs[r, o : o + n], targets[r, o : o + n] = seq[:-1], seq[1:]
                seg[r, o : o + n], positions[r, o : o + n] = k, np.arange(n)
        logp, greedy = self._score(self.params, inputs, targets, seg, positions)
        return tuple(jax.device_get((logp, greedy)))
