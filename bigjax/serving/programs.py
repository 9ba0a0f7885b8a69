"""The serving engine's two compiled programs over a fixed set of decode slots.

`prefill` runs one prompt (right-padded to a length bucket) and writes its keys and values
into one slot's row of the KV cache; `decode` advances every slot by one token at once. A
slot's row holds its own sequence from cache position 0, so positions equal cache positions
and rows at different lengths share one program: each row writes its new token's keys at its
own length (`layers.write_cache` with per-row indices).

Both programs take the slots' arrays donated and return them updated, so the cache is never
copied. Sampling is per row (each request has its own temperature, top-k, top-p and seed),
and both programs also return the log-probabilities the API reports: the chosen token's and
the TOP_N most likely under the model's own distribution (before temperature, filtering, bias
and penalties, as vLLM reports them by default).

A request's logit adjustments (OpenAI's `logit_bias`, `presence_penalty`, `frequency_penalty`,
and vLLM's `repetition_penalty`) live in its slot: the prefill writes the bias as a dense row,
marks the prompt's tokens and clears the row's token counts, and every token is sampled from
the logits plus the bias, then the repetition penalty (a positive logit divided by it, a
negative one multiplied, on every token of the prompt or generated so far, as vLLM and
Hugging Face apply it), then `- frequency * count - presence * (count > 0)`, counting the
tokens the row generated (as vLLM: the prompt's tokens are not counted). Neutral values leave
the sampled tokens bit-identical (adding zeros, dividing by one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax import tree
from bigjax.layers import decode_mask
from bigjax.sharding import Rules, constrain

T = TypeVar("T")

TOP_N = 20  # top log-probs computed for every token (vLLM's limit; OpenAI's legacy API: 5)
MAX_LOGIT_BIAS = 300  # entries in one request's logit_bias (a fixed shape: one compile)
# [N layers, B slots, S positions, G kv heads, K]: the slots are replicated over data and
# fsdp (each device decodes every slot), kv heads split over the tensor axis
SLOT_CACHE_NAMES = (None, None, None, "act_kv_heads", None)


class Slots(NamedTuple):
    """The decode slots on device: donated to and returned by every program call."""

    cache_k: jax.Array  # [N, B, S, G, K]
    cache_v: jax.Array  # [N, B, S, G, K]
    valid_BS: jax.Array  # bool: cache positions holding a real token
    length_B: jax.Array  # int32: tokens in the cache (the next token's position)
    last_B: jax.Array  # int32: the last sampled token, the next decode input
    bias_BV: jax.Array  # float32: each row's logit_bias, dense
    counts_BV: jax.Array  # int32: how often each row generated each token (the penalties')
    prompt_BV: jax.Array  # bool: the tokens of each row's prompt (the repetition penalty's)
    presence_B: jax.Array  # float32: subtracted from every token the row generated
    frequency_B: jax.Array  # float32: subtracted once per time the row generated the token
    repetition_B: jax.Array  # float32: divides the logits of tokens seen (1: none)


class Adjustments(NamedTuple):
    """One request's logit adjustments, written into its slot by the prefill."""

    bias_ids_K: jax.Array | np.ndarray  # int32 [MAX_LOGIT_BIAS]: token ids, zero-padded
    bias_K: jax.Array | np.ndarray  # float32: their biases (0 for the padding)
    presence: jax.Array | np.ndarray  # float32 []
    frequency: jax.Array | np.ndarray  # float32 []
    repetition: jax.Array | np.ndarray  # float32 []


def adjustments(bias: Sequence[tuple[int, float]] = (), presence: float = 0.0,
                frequency: float = 0.0, repetition: float = 1.0) -> Adjustments:  # fmt: skip
    """Host arrays for the prefill from (token id, bias) pairs and the three penalties."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias holds {len(bias)} tokens; at most {MAX_LOGIT_BIAS}")
    ids_K = np.zeros((MAX_LOGIT_BIAS,), np.int32)
    bias_K = np.zeros((MAX_LOGIT_BIAS,), np.float32)
    for k, (token, value) in enumerate(bias):
        ids_K[k], bias_K[k] = token, value
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return Adjustments(ids_K, bias_K, f32(presence), f32(frequency), f32(repetition))


class RowSampling(NamedTuple):
    """Per-row sampling parameters ([B] each, or [1] for a prefill)."""

    temperature: jax.Array | np.ndarray  # float32; 0 is greedy
    top_k: jax.Array | np.ndarray  # int32; 0 keeps all
    top_p: jax.Array | np.ndarray  # float32; 1 keeps all
    min_p: jax.Array | np.ndarray  # float32; 0 keeps all
    seed: jax.Array | np.ndarray  # uint32
    step: jax.Array | np.ndarray  # int32: tokens this row has sampled (the rng's fold-in)
    top: jax.Array | np.ndarray  # bool: the row reports its TOP_N most likely tokens


class Emitted(NamedTuple):
    """What one program call produced per row."""

    token_B: jax.Array  # int32
    logprob_B: jax.Array  # float32: the sampled token's log-probability
    top_ids_BN: jax.Array  # int32 [B, TOP_N]
    top_logprobs_BN: jax.Array  # float32 [B, TOP_N]


@dataclasses.dataclass(frozen=True)
class Shapes:
    layers: int
    slots: int
    max_len: int  # S: prompt plus generated tokens, per slot
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: Any


def shapes_of(graphdef: nnx.GraphDef, params: tree.Params, slots: int, max_len: int) -> Shapes:
    model = nnx.merge(graphdef, params)
    if not model.blocks.attn.causal:
        raise ValueError("this model is a bidirectional encoder (model.causal=false); "
                         "only causal decoders serve text.")  # fmt: skip
    _, _, g, _, k = model.blocks.attn.kv_DGCK.shape  # stacked: [N, D, G, 2, K]
    vocab = model.embed.table_VD.shape[0]
    return Shapes(model.num_layers, slots, max_len, g, k, vocab, model.dtype)


def empty_slots(s: Shapes, rules: Rules) -> Slots:
    cache = jnp.zeros((s.layers, s.slots, s.max_len, s.kv_heads, s.head_dim), s.dtype)
    cache = constrain(cache, SLOT_CACHE_NAMES, rules)
    zeros_B = jnp.zeros((s.slots,), jnp.int32)
    zeros_BV = jnp.zeros((s.slots, s.vocab), jnp.float32)
    f_B = jnp.zeros((s.slots,), jnp.float32)
    return Slots(cache, cache, jnp.zeros((s.slots, s.max_len), bool), zeros_B, zeros_B,
                 zeros_BV, zeros_BV.astype(jnp.int32), zeros_BV.astype(bool), f_B, f_B,
                 jnp.ones((s.slots,), jnp.float32))  # fmt: skip


def adjusted(logits_BV: jax.Array, slots: Slots) -> jax.Array:
    """The logits a row samples from, in f32: the bias, then the repetition penalty on every
    token of the prompt or generated (vLLM's and Hugging Face's), then OpenAI's presence and
    frequency penalties over the generated ones."""
    counts_BV = slots.counts_BV.astype(jnp.float32)
    x_BV = logits_BV.astype(jnp.float32) + slots.bias_BV
    seen_BV = slots.prompt_BV | (counts_BV > 0)
    r_B1 = slots.repetition_B[:, None]
    x_BV = jnp.where(seen_BV, jnp.where(x_BV > 0, x_BV / r_B1, x_BV * r_B1), x_BV)
    frequency_B1, presence_B1 = slots.frequency_B[:, None], slots.presence_B[:, None]
    return x_BV - frequency_B1 * counts_BV - presence_B1 * (counts_BV > 0)


def sample_rows(logits_BV: jax.Array, p: RowSampling) -> jax.Array:
    """One token per row under that row's own parameters: the temperature, min-p (vLLM's:
    tokens less likely than min_p times the most likely one are dropped), top-k, then top-p
    over what they kept (as `generate.filter_logits`), then a draw from the row's key; greedy
    where the temperature is 0. A step where every row is greedy skips the sort and the draws (a
    `cond`): for a small model they cost a fifth of the decode step."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    sample = lambda: jnp.where(p.temperature > 0, _draw_rows(logits_BV, p), greedy_B)  # noqa: E731
    return jax.lax.cond(jnp.any(p.temperature > 0), sample, lambda: greedy_B)


def _draw_rows(logits_BV: jax.Array, p: RowSampling) -> jax.Array:
    logits_BV = logits_BV.astype(jnp.float32)
    vocab = logits_BV.shape[-1]
    scaled_BV = logits_BV / jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
    # min-p: p(x) < min_p * p(best) <=> logit(x) < logit(best) + log(min_p) (log 0 = -inf)
    floor_B1 = sorted_BV[:, :1] + jnp.log(p.min_p)[:, None]
    k_B = jnp.where((p.top_k > 0) & (p.top_k < vocab), p.top_k, vocab)
    kth_B1 = jnp.maximum(jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1), floor_B1)
    sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # the first token always survives; then every token until the mass reaches top_p
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < p.top_p[:, None]
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    filtered_BV = jnp.where(scaled_BV < jnp.maximum(cutoff_B1, kth_B1), -jnp.inf, scaled_BV)

    def draw(seed: Any, step: Any, row_V: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, row_V)

    return jax.vmap(draw)(p.seed, p.step, filtered_BV).astype(jnp.int32)


def top_logprobs(logp_XV: jax.Array, wanted: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The TOP_N most likely ids and their log-probabilities per row, or zeros when no row
    wants them (a `cond`: most requests ask for none, and a top-k is not free)."""
    n = min(TOP_N, logp_XV.shape[-1])

    def top() -> tuple[jax.Array, jax.Array]:
        values, ids = jax.lax.top_k(logp_XV, n)
        return ids.astype(jnp.int32), values

    def none() -> tuple[jax.Array, jax.Array]:
        shape = (*logp_XV.shape[:-1], n)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, logp_XV.dtype)

    return jax.lax.cond(jnp.any(wanted), top, none)


def emitted(logits_BV: jax.Array, p: RowSampling, sampled_from_BV: jax.Array) -> Emitted:
    """The token drawn from `sampled_from_BV` (the adjusted logits), reported with its and the
    top tokens' log-probabilities under the model's own `logits_BV`."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    token_B = sample_rows(sampled_from_BV, p)
    ids, values = top_logprobs(logp_BV, p.top)
    return Emitted(token_B, jnp.take_along_axis(logp_BV, token_B[:, None], -1)[:, 0], ids, values)


class PromptScores(NamedTuple):
    """Per prompt position t: the log-probability of token t + 1 and the top TOP_N there."""

    logprob_T: jax.Array  # float32 [T]; position T - 1 (no next token) is 0
    top_ids_TN: jax.Array
    top_logprobs_TN: jax.Array


def make_prefill(graphdef: nnx.GraphDef, rules: Rules) -> Callable:
    """`prefill(params, slots, tokens_T, n, row, sampling, adjustments) -> (slots, emitted,
    prompt scores)`: the first n of tokens_T (right-padded) become slot `row`'s sequence, and
    `adjustments` its logit bias and penalties, replacing what it held; the first new token
    is sampled from the last prompt position."""

    def prefill(
        params: Any, slots: Slots, tokens_T: jax.Array, n: jax.Array, row: jax.Array,
        p: RowSampling, a: Adjustments,
    ) -> tuple[Slots, Emitted, PromptScores]:  # fmt: skip
        model = nnx.merge(graphdef, params)
        (t,) = tokens_T.shape
        layers, _, s, g, k = slots.cache_k.shape
        valid_1T = (jnp.arange(t) < n)[None]
        positions_1T = jnp.arange(t, dtype=jnp.int32)[None]
        zeros = jnp.zeros((layers, 1, t, g, k), slots.cache_k.dtype)
        logits_1TV, k_N1TGK, v_N1TGK = model.decode(
            tokens_T[None], positions_1T, zeros, zeros, 0, decode_mask(0, t, valid_1T)
        )
        logits_TV = logits_1TV[0].astype(jnp.float32)
        logp_TV = jax.nn.log_softmax(logits_TV, axis=-1)
        next_T = jnp.concatenate([tokens_T[1:], jnp.zeros((1,), tokens_T.dtype)])
        prompt_logp_T = jnp.take_along_axis(logp_TV, next_T[:, None], -1)[:, 0]
        prompt_logp_T = jnp.where(jnp.arange(t) < n - 1, prompt_logp_T, 0.0)
        scores = PromptScores(prompt_logp_T, *top_logprobs(logp_TV, p.top))
        last_1V = jax.lax.dynamic_slice_in_dim(logits_TV, n - 1, 1)
        # padding entries add 0 to token 0; the request's ids are distinct (protocol.py)
        bias_V = jnp.zeros(last_1V.shape[-1:], jnp.float32).at[a.bias_ids_K].add(a.bias_K)
        # the prompt's tokens (the padding past n points past the vocabulary: dropped)
        (v,) = bias_V.shape
        ids_T = jnp.where(jnp.arange(t) < n, tokens_T, v)
        prompt_V = jnp.zeros((v,), bool).at[ids_T].set(True, mode="drop")
        row_slots = slots._replace(
            bias_BV=bias_V[None], counts_BV=jnp.zeros((1, *bias_V.shape), jnp.int32),
            prompt_BV=prompt_V[None], presence_B=jnp.asarray(a.presence)[None],
            frequency_B=jnp.asarray(a.frequency)[None],
            repetition_B=jnp.asarray(a.repetition)[None],
        )  # fmt: skip
        out = emitted(last_1V, p, adjusted(last_1V, row_slots))  # nothing generated yet
        counts_V = jnp.zeros(bias_V.shape, jnp.int32).at[out.token_B[0]].set(1)

        def put(cache: jax.Array, new_N1TGK: jax.Array) -> jax.Array:
            # the whole row is rewritten (zeros past the prompt): nothing of its last user's
            # sequence stays, not even values under the mask
            row_N1SGK = jnp.zeros((layers, 1, s, g, k), cache.dtype).at[:, :, :t].set(new_N1TGK)
            cache = jax.lax.dynamic_update_slice_in_dim(cache, row_N1SGK, row, axis=1)
            return constrain(cache, SLOT_CACHE_NAMES, rules)

        slots = Slots(
            put(slots.cache_k, k_N1TGK),
            put(slots.cache_v, v_N1TGK),
            slots.valid_BS.at[row].set(jnp.arange(s) < n),
            slots.length_B.at[row].set(n),
            slots.last_B.at[row].set(out.token_B[0]),
            slots.bias_BV.at[row].set(bias_V),
            slots.counts_BV.at[row].set(counts_V),
            slots.prompt_BV.at[row].set(prompt_V),
            slots.presence_B.at[row].set(a.presence),
            slots.frequency_B.at[row].set(a.frequency),
            slots.repetition_B.at[row].set(a.repetition),
        )
        return slots, replicated(out), replicated(scores)

    return prefill


def make_decode(graphdef: nnx.GraphDef, rules: Rules) -> Callable:
    """`decode(params, slots, active_B, sampling) -> (slots, emitted)`: every slot's last token
    is written at its own length and a next token sampled. Inactive rows compute too (one
    shape for every step) but keep their length, so they change nothing a later prefill
    does not replace."""

    def decode(
        params: Any, slots: Slots, active_B: jax.Array, p: RowSampling
    ) -> tuple[Slots, Emitted]:
        model = nnx.merge(graphdef, params)
        b, s = slots.valid_BS.shape
        pos_B = jnp.minimum(slots.length_B, s - 1)
        # every row attends to at least its own token: a free row never takes a softmax over
        # nothing
        valid_BS = slots.valid_BS.at[jnp.arange(b), pos_B].set(True)
        logits_B1V, cache_k, cache_v = model.decode(
            slots.last_B[:, None], pos_B[:, None], slots.cache_k, slots.cache_v, pos_B,
            valid_BS[:, None, None, :], unroll=True,
        )  # fmt: skip
        logits_BV = logits_B1V[:, 0]
        out = emitted(logits_BV, p, adjusted(logits_BV, slots))
        counts_BV = slots.counts_BV.at[jnp.arange(b), out.token_B].add(active_B.astype(jnp.int32))
        valid_BS = jnp.where(active_B[:, None], valid_BS, slots.valid_BS)
        slots = Slots(
            constrain(cache_k, SLOT_CACHE_NAMES, rules),
            constrain(cache_v, SLOT_CACHE_NAMES, rules),
            valid_BS,
            slots.length_B + active_B.astype(jnp.int32),
            jnp.where(active_B, out.token_B, slots.last_B),
            slots.bias_BV,
            counts_BV,
            slots.prompt_BV,
            slots.presence_B,
            slots.frequency_B,
            slots.repetition_B,
        )
        return slots, replicated(out)

    return decode


def replicated(arrays: T) -> T:
    """What the host reads back, whole on every device: with several processes each reads
    its own copy (a value split over other hosts' devices cannot be fetched)."""
    return jax.tree.map(lambda x: constrain(x, (None,) * x.ndim, ()), arrays)


def row_sampling(rows: list[tuple[float, int, float, float, int, int, bool]]) -> RowSampling:
    """Host arrays for the programs from (temperature, top_k, top_p, min_p, seed, step, top)
    per row."""
    t, k, p, min_p, seed, step, top = zip(*rows, strict=True) if rows else ((),) * 7
    return RowSampling(
        np.asarray(t, np.float32),
        np.asarray(k, np.int32),
        np.asarray(p, np.float32),
        np.asarray(min_p, np.float32),
        np.asarray(seed, np.uint32),
        np.asarray(step, np.int32),
        np.asarray(top, bool),
    )
