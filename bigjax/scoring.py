"""Per-token log-likelihoods of many token sequences, batched and compiled once per length
bucket: what benchmark harnesses ask of a model (`loglikelihood`, `loglikelihood_rolling`)
and what `bigjax serve` must agree with (its `echo` log-probabilities).

Each row is a context followed by a continuation; the row is cut from the left to the
model's context, right-padded to the smallest bucket that holds it, and scored by one
forward pass. Rows are grouped by bucket, so short rows never pay for long ones, and every
batch has `rows` rows: one compile per bucket for a whole evaluation.
"""

from __future__ import annotations

import dataclasses
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
    """Scores (context ids, continuation ids) pairs with a model's parameters."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, max_len: int, rows: int = 16):
        self.params, self.max_len, self.rows = params, max_len, rows
        self.buckets = length_buckets(max_len)
        self._score = make_score_fn(graphdef)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
              progress: Callable[[int], None] | None = None) -> list[Scored]:  # fmt: skip
        """One Scored per pair, in order. A context may be empty only if the continuation has
        two or more tokens (its first token is then not scored: nothing predicts it)."""
        rows = [self._row(ctx, cont) for ctx, cont in pairs]
        out: list[Scored | None] = [None] * len(rows)
        by_bucket: dict[int, list[int]] = {}
        for i, (seq, _) in enumerate(rows):
            by_bucket.setdefault(self._bucket(len(seq) - 1), []).append(i)
        for bucket, members in sorted(by_bucket.items()):
            for start in range(0, len(members), self.rows):
                chunk = members[start : start + self.rows]
                logp, greedy = self._run(bucket, [rows[i] for i in chunk])
                for j, i in enumerate(chunk):
                    seq, n_cont = rows[i]
                    n = len(seq) - 1
                    lp, gr = logp[j, n - n_cont : n], greedy[j, n - n_cont : n]
                    out[i] = Scored(tuple(float(x) for x in lp), bool(gr.all()))
                if progress is not None:
                    progress(len(chunk))
        return [s for s in out if s is not None]

    def _row(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[list[int], int]:
        if not cont:
            raise ValueError("a continuation needs at least one token")
        seq = (list(ctx) + list(cont))[-(self.max_len + 1) :]
        n_cont = min(len(cont), len(seq) - 1)
        if n_cont < 1:
            raise ValueError("a one-token sequence has nothing to score; give a context")
        return seq, n_cont

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _run(self, bucket: int, rows: list[tuple[list[int], int]]) -> tuple[np.ndarray, ...]:
        shape = (self.rows, bucket)
        inputs, targets, seg = (np.zeros(shape, np.int32) for _ in range(3))
        for j, (seq, _) in enumerate(rows):
            n = len(seq) - 1
            inputs[j, :n], targets[j, :n], seg[j, :n] = seq[:-1], seq[1:], 1
        positions = np.broadcast_to(np.arange(bucket, dtype=np.int32), shape)
        logp, greedy = self._score(self.params, inputs, targets, seg, positions)
        return tuple(jax.device_get((logp, greedy)))
