"""Per-token log-likelihoods of many token sequences, packed and batched, compiled once:
what benchmark harnesses ask of a model (`loglikelihood`, `loglikelihood_rolling`)
and what `bigjax serve` must agree with (its `echo` log-probabilities).

Each sequence is a context followed by a continuation, cut from the left to the model's
context. Sequences that share a context (a multiple-choice item's choices) share its forward
pass: the context once, then each continuation attending to it and to itself only (a tree
mask); groups are packed into rows (see Scorer) and scored by one forward pass a batch.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.models import decoder
from bigjax.tree import Params


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


def make_score_fn(graphdef: nnx.GraphDef, shared: bool) -> Callable:
    """Jitted `score(params, Rows) -> (target log-prob [B, L], target is argmax [B, L])`.
    `shared`: some rows hold contexts shared by several continuations, run through the
    cached-attention path under a dense tree mask; without, the training forward pass (the
    backend's attention kernel, segment ids: no [L, L] mask for long perplexity windows)."""

    def score(params: Any, rows: Rows) -> tuple[jax.Array, jax.Array]:
        model = decoder(nnx.merge(graphdef, params))
        inputs_BL, positions_BL = jnp.asarray(rows.inputs_BL), jnp.asarray(rows.positions_BL)
        if shared:
            b, length = rows.inputs_BL.shape
            _, _, g, _, k = model.blocks.attn.kv_DGCK.shape  # stacked: [N, D, G, 2, K]
            # the cache is only where this one pass writes its keys and values (slot 0)
            zeros = jnp.zeros((model.num_layers, b, length, g, k), model.dtype)
            logits_BLV, _, _ = model.decode(
                inputs_BL, positions_BL, zeros, zeros, jnp.int32(0), tree_mask(rows)
            )
        else:
            logits_BLV = model(inputs_BL, jnp.asarray(rows.seg_BL), positions_BL)
        logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
        target_BL = jnp.take_along_axis(logp_BLV, rows.targets_BL[..., None], axis=-1)[..., 0]
        return target_BL, jnp.argmax(logp_BLV, axis=-1) == rows.targets_BL

    return jax.jit(score)


class Rows(NamedTuple):
    """A batch of packed rows: `seg` numbers the groups in a row (0: padding), `branch` the
    continuations in a group (0: the shared context)."""

    inputs_BL: np.ndarray
    targets_BL: np.ndarray
    seg_BL: np.ndarray
    branch_BL: np.ndarray
    positions_BL: np.ndarray


def tree_mask(rows: Rows) -> jax.Array:
    """[B, 1, L, L]: a token sees the earlier tokens of its group's context and of its own
    continuation. Every token sees itself, so a padding token's softmax is never over nothing
    (its NaN would reach the real tokens through the values in the next layer)."""
    q_L, k_L = jnp.arange(rows.seg_BL.shape[1])[:, None], jnp.arange(rows.seg_BL.shape[1])[None]
    seg_BL, branch_BL = jnp.asarray(rows.seg_BL), jnp.asarray(rows.branch_BL)
    same_BLL = (seg_BL[:, :, None] == seg_BL[:, None, :]) & (seg_BL[:, None, :] > 0)
    tree_BLL = (branch_BL[:, None, :] == 0) | (branch_BL[:, None, :] == branch_BL[:, :, None])
    return ((same_BLL & tree_BLL & (k_L <= q_L)) | (k_L == q_L))[:, None]


@dataclasses.dataclass(frozen=True)
class Group:
    """Sequences scored in one stretch of a row: `trunk` (shared context tokens, inputs only)
    then each branch's inputs, whose targets are the branch's scored tokens at the end."""

    trunk: tuple[int, ...]
    branches: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]  # (index, inputs, targets)

    def __len__(self) -> int:
        return len(self.trunk) + sum(len(inputs) for _, inputs, _ in self.branches)


class Scorer:
    """Scores (context ids, continuation ids) pairs with a model's parameters.

    Groups of sequences are packed into rows as training packs documents (segment ids keep
    them apart, positions restart at each), longest first into the row with the most room: a
    batch is nearly all real tokens whatever the lengths, and every batch of one `score` call
    has one shape, so it compiles once. Pairs with the same context (longer than one token,
    uncut) form one group up to a row's length: the context is run once, not once per choice.

    A row is the smallest length bucket that holds the longest sequence, not the model's whole
    context: attention over a packed row costs its length per token, so 100-token
    multiple-choice items in 2,048-token rows would spend most of the forward pass on pairs
    the mask throws away."""

    def __init__(self, graphdef: nnx.GraphDef, params: Params, max_len: int, tokens: int = 8192,
                 between: Callable[[], None] | None = None):  # fmt: skip
        """`tokens` per batch bounds the logits held at once: tokens x vocabulary floats.
        `between` runs before each batch (a training run's eval: it raises to stop)."""
        self.params, self.max_len, self.tokens = params, max_len, tokens
        self.between = between
        self._score = {shared: make_score_fn(graphdef, shared) for shared in (False, True)}

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
        """One Scored per pair, in order. A context may be empty only if the continuation has
        two or more tokens (its first token is then not scored: nothing predicts it).
        Identical pairs are scored once, so they get identical scores (a tie between two equal
        choices stays a tie, broken by order as any other harness breaks it)."""
        keys = list(dict.fromkeys((tuple(ctx), tuple(cont)) for ctx, cont in pairs))
        longest = max((len(self._sequence(*k)[0]) - 1 for k in keys), default=1)  # checks all
        row_len = self.row_length(longest)
        groups = self._groups(keys, row_len)
        rows_per_batch = max(1, self.tokens // row_len)
        packed = pack([len(g) for g in groups], row_len)
        shared = any(len(g.branches) > 1 for g in groups)  # one program for the whole call
        out: list[Scored | None] = [None] * len(keys)
        for start in range(0, len(packed), rows_per_batch):
            batch = [
                [(groups[i], o) for i, o in row] for row in packed[start : start + rows_per_batch]
            ]
            if self.between is not None:
                self.between()
            logp, greedy = self._run(batch, (rows_per_batch, row_len), shared)
            for r, row in enumerate(batch):
                for group, offset in row:
                    end = offset + len(group.trunk)
                    for i, inputs, targets in group.branches:
                        end += len(inputs)
                        first = end - len(targets)
                        out[i] = Scored(tuple(float(x) for x in logp[r, first:end]),
                                        bool(greedy[r, first:end].all()))  # fmt: skip
        scored = dict(zip(keys, out, strict=True))
        return [scored[(tuple(ctx), tuple(cont))] for ctx, cont in pairs]  # type: ignore[misc]

    def _sequence(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[list[int], int]:
        if not cont:
            raise ValueError("a continuation needs at least one token")
        seq = (list(ctx) + list(cont))[-(self.max_len + 1) :]
        n_cont = min(len(cont), len(seq) - 1)
        if n_cont < 1:
            raise ValueError("a one-token sequence has nothing to score; give a context")
        return seq, n_cont

    def _groups(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], row_len: int
    ) -> list[Group]:
        """Pairs sharing a context in groups no longer than a row; every other pair alone.
        The context's last token is each branch's first input (its prediction is the
        continuation's first token, which differs by branch), so the trunk is the rest."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        singles: list[Group] = []
        for i, (ctx, cont) in enumerate(pairs):
            if len(ctx) > 1 and len(ctx) + len(cont) <= self.max_len + 1:
                by_context.setdefault(tuple(ctx), []).append(i)
            else:
                seq, n = self._sequence(ctx, cont)
                singles.append(Group((), ((i, tuple(seq[:-1]), tuple(seq[-n:])),)))
        groups: list[Group] = []
        Branch = tuple[int, tuple[int, ...], tuple[int, ...]]
        for ctx, members in by_context.items():
            trunk, branches = ctx[:-1], list[Branch]()
            for i in members:
                cont = tuple(pairs[i][1])
                branch = (i, (ctx[-1], *cont[:-1]), cont)
                if branches and len(trunk) + sum(len(b[1]) for b in branches) + len(cont) > row_len:
                    groups.append(Group(trunk, tuple(branches)))
                    branches = []
                branches.append(branch)
            groups.append(Group(trunk, tuple(branches)))
        return groups + singles

    def row_length(self, longest: int) -> int:
        return next(b for b in length_buckets(self.max_len) if b >= min(longest, self.max_len))

    def _run(
        self, rows: list[list[tuple[Group, int]]], shape: tuple[int, int], shared: bool
    ) -> tuple[np.ndarray, ...]:
        a = Rows(*(np.zeros(shape, np.int32) for _ in range(5)))
        for r, row in enumerate(rows):
            for s, (group, o) in enumerate(row, start=1):
                t = len(group.trunk)
                a.inputs_BL[r, o : o + t] = group.trunk
                a.positions_BL[r, o : o + t] = np.arange(t)
                a.seg_BL[r, o : o + len(group)] = s
                o += t
                for b, (_, inputs, targets) in enumerate(group.branches, start=1):
                    n = len(inputs)
                    a.inputs_BL[r, o : o + n] = inputs
                    a.targets_BL[r, o + n - len(targets) : o + n] = targets
                    a.positions_BL[r, o : o + n] = np.arange(t, t + n)
                    a.branch_BL[r, o : o + n] = b
                    o += n
        logp, greedy = self._score[shared](self.params, a)
        return tuple(jax.device_get((logp, greedy)))


def pack(lengths: Sequence[int], row_len: int) -> list[list[tuple[int, int]]]:
    """Rows of (sequence index, offset): longest first, each into the row with the most room
    left (a heap), or a new row."""
    rows: list[list[tuple[int, int]]] = []
    room: list[tuple[int, int]] = []  # (-room left, row)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if room and -room[0][0] >= n:
            left, r = heapq.heappop(room)
            rows[r].append((i, row_len + left))
            heapq.heappush(room, (left + n, r))
        else:
            rows.append([(i, 0)])
            heapq.heappush(room, (n - row_len, len(rows) - 1))
    return rows
