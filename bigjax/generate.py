"""Jitted decoding with a KV cache: batched prompts, greedy or sampled (temperature, top-k,
top-p), stop tokens, a token budget.

Prompts of different lengths are left-padded into one [B, T] batch: every row then writes
cache slot t at step t, and padding is simply never attended to (the cache keeps a validity
mask next to its keys). Positions count real tokens only, so a padded row computes exactly
what it would alone. The prompt is one forward pass (prefill); each new token is one
`decode` step inside a `lax.while_loop`, all in one compiled program that stops early once
every row has hit a stop token. A long generation reports its progress from inside that
program (a host callback every `PROGRESS_EVERY` tokens), so `bigjax generate` shows a bar.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax import tree
from bigjax.errors import UsageError
from bigjax.layers import compute_dtype, decode_mask
from bigjax.progress import Bar
from bigjax.sharding import Rules, constrain

__all__ = [  # decode_mask lives in layers (the serving engine uses it too)
    "Sampling", "decode_mask", "filter_logits", "generate", "generate_from_run", "left_pad",
    "make_generate", "sample",
]  # fmt: skip

CACHE_NAMES = (None, "act_batch", None, "act_kv_heads", None)  # [N, B, S, G, K]
PROGRESS_EVERY = 64  # new tokens between two progress reports: one host call each


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set with this much probability; 1: all
    stop_tokens: tuple[int, ...] = ()  # a row ends after emitting one of these
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # `not (t >= 0)`: a NaN temperature compares false both ways, and sampled NUL bytes
        if not (0 <= self.temperature < math.inf) or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if not -(2**63) <= self.seed < 2**63:  # what a PRNG key takes
            raise ValueError(f"seed {self.seed} is outside [-2**63, 2**63)")


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets every token outside the top-k / top-p set to -inf."""
    logits_BV = logits_BV.astype(jnp.float32)
    if top_k:  # past the vocabulary it keeps every token
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        mass_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # the first token always survives; then every token until the mass reaches top_p
        keep_BV = (mass_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample(logits_BV: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    if s.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV / s.temperature, s.top_k, s.top_p)
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, np.ndarray]:
    """tokens, valid (bool) and positions [B, T], prompts right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p) :] = p
        valid[i, length - len(p) :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "valid": valid, "positions": positions}


def make_generate(
    graphdef: nnx.GraphDef,
    rules: Rules,
    s: Sampling,
    progress: Callable[[int], None] | None = None,
):
    """`generate(params, tokens, valid, positions) -> (new_tokens [B, N], lengths [B])`,
    jitted. Tokens after a row's stop token (and the stop token itself counts) are padding;
    `lengths` says how many of each row's tokens are real. `progress(n)` is called on the
    host after each `PROGRESS_EVERY` new tokens (None: no call, the program has none)."""

    def generate(params, tokens_BT, valid_BT, positions_BT):
        model = nnx.merge(graphdef, params)
        b, t = tokens_BT.shape
        total = t + s.max_new_tokens
        if not model.blocks.attn.causal:
            raise ValueError("this model is a bidirectional encoder (model.causal=false); "
                             "only causal decoders generate text.")  # fmt: skip
        if model.pos_table_PD is not None and total > model.pos_table_PD.shape[0]:
            raise ValueError(
                f"the longest prompt plus max_new_tokens is {total} positions, more than the "
                f"model's {model.pos_table_PD.shape[0]} learned positions; shorten the prompt "
                "or max_new_tokens."
            )
        _, _, g, _, k = model.blocks.attn.kv_DGCK.shape  # stacked: [N, D, G, 2, K]
        cache_shape = (model.num_layers, b, total, g, k)
        cache_k = constrain(jnp.zeros(cache_shape, model.dtype), CACHE_NAMES, rules)
        cache_v = constrain(jnp.zeros(cache_shape, model.dtype), CACHE_NAMES, rules)
        valid_BS = jnp.zeros((b, total), bool).at[:, :t].set(valid_BT)

        # prefill: the whole prompt in one pass
        logits_BTV, cache_k, cache_v = model.decode(
            tokens_BT, positions_BT, cache_k, cache_v, 0, decode_mask(0, t, valid_BS)
        )
        rng = jax.random.key(s.seed)
        first_B = sample(logits_BTV[:, -1], jax.random.fold_in(rng, 0), s)
        stops = jnp.asarray(s.stop_tokens or (-1,), jnp.int32)
        out_BN = jnp.zeros((b, s.max_new_tokens), jnp.int32).at[:, 0].set(first_B)
        done_B = jnp.isin(first_B, stops)
        lengths_B = jnp.ones((b,), jnp.int32)
        next_pos_B = positions_BT[:, -1] + 1

        def cond(carry):
            i, _, _, _, _, done_B, _, _ = carry
            return (i < s.max_new_tokens) & ~jnp.all(done_B)

        def body(carry):
            i, out_BN, cache_k, cache_v, valid_BS, done_B, lengths_B, pos_B = carry
            slot = t + i - 1  # the slot of the token emitted at step i - 1
            valid_BS = valid_BS.at[:, slot].set(True)
            last_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
            logits_B1V, cache_k, cache_v = model.decode(
                last_B1, pos_B[:, None], cache_k, cache_v, slot, decode_mask(slot, 1, valid_BS)
            )
            tok_B = sample(logits_B1V[:, 0], jax.random.fold_in(rng, i), s)
            tok_B = jnp.where(done_B, 0, tok_B)
            out_BN = out_BN.at[:, i].set(tok_B)
            lengths_B = lengths_B + ~done_B
            done_B = done_B | jnp.isin(tok_B, stops)
            if progress is not None:  # the host hears of every PROGRESS_EVERY tokens
                jax.lax.cond((i + 1) % PROGRESS_EVERY == 0,
                             lambda: jax.debug.callback(progress, i + 1), lambda: None)  # fmt: skip
            return i + 1, out_BN, cache_k, cache_v, valid_BS, done_B, lengths_B, pos_B + 1

        carry = (1, out_BN, cache_k, cache_v, valid_BS, done_B, lengths_B, next_pos_B)
        _, out_BN, _, _, _, _, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
        return out_BN, lengths_B

    return jax.jit(generate)


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    s: Sampling,
    rules: Rules = (),
) -> list[list[int]]:
    """New tokens for each prompt (stop token included, padding cut)."""
    batch = left_pad(prompts)
    out_BN, lengths_B = make_generate(graphdef, rules, s)(
        params, batch["tokens"], batch["valid"], batch["positions"]
    )
    out_BN, lengths_B = np.asarray(out_BN), np.asarray(lengths_B)
    return [out_BN[i, : lengths_B[i]].tolist() for i in range(len(prompts))]


def _check_cache(
    params: tree.Params, rows: int, length: int, dtype: str, mesh: jax.sharding.Mesh
) -> None:
    """The KV cache of `rows` x `length` positions (in the compute `dtype`) is allocated
    whole: one that cannot fit is refused in one line (--max-new-tokens 10**9 was XLA's
    out-of-memory traceback)."""
    from bigjax import memory

    layers, _, kv_heads, _, head_dim = params["blocks"]["attn"]["kv_DGCK"].shape  # [N,D,G,2,K]
    itemsize = compute_dtype(dtype, mesh.devices.flat[0].platform).itemsize
    need = 2 * layers * rows * length * kv_heads * head_dim * itemsize
    what = f"generate: the KV cache of {rows} prompt(s) x {length:,} positions"
    memory.check_fits(need, list(mesh.devices.flat), what, "lower --max-new-tokens.")


def generate_from_run(
    workdir: str, overrides: Sequence[str], prompts: Sequence[str], sampling: Sampling
) -> tuple[list[str], dict[str, float]]:
    """Continuations of `prompts` by a trained run's latest checkpoint, and the timings."""
    import sys
    import time

    from bigjax.data.tokenizer import encode_prompt
    from bigjax.trained import open_run

    with open_run(workdir, overrides, "generate") as (prog, params, step):
        tokenizer = prog.resources.tokenizer
        # framed as training framed documents (BOS first), as `bigjax serve` reads prompts
        encoded = [encode_prompt(tokenizer, p, add_bos=True) for p in prompts]
        vocab = prog.cfg.model.vocab_size
        if outside := [t for t in sampling.stop_tokens if not 0 <= t < vocab]:
            raise UsageError(
                f"generate: stop token(s) {outside} are not token ids of this run (0 to "
                f"{vocab - 1}): one is never emitted, so nothing would stop"
            )
        longest, trained = max(map(len, encoded)), prog.cfg.data.seq_len
        length = longest + sampling.max_new_tokens
        _check_cache(params, len(encoded), length, prog.cfg.model.dtype, prog.mesh)
        if longest + sampling.max_new_tokens > trained:  # `serve` refuses this; here a warning
            print(f"warning: a prompt of {longest} tokens plus {sampling.max_new_tokens} new "
                  f"tokens is past the {trained} positions this run trained on "
                  "(data.seq_len); the text there is the model extrapolating.",
                  file=sys.stderr, flush=True)  # fmt: skip
        batch = left_pad(encoded)
        # shown once PROGRESS_EVERY tokens are out: a 10**5-token generation ran for minutes
        # with nothing on the screen (the bar is made after the compile: its rate is decoding's)
        fn = make_generate(prog.graphdef, prog.cfg.mesh.rules, sampling,
                           progress=lambda n: bar.update(int(n)))  # fmt: skip
        inputs = (params, batch["tokens"], batch["valid"], batch["positions"])
        start = time.perf_counter()
        compiled = fn.lower(*inputs).compile()
        compile_s = time.perf_counter() - start
        bar = Bar("generate", total=sampling.max_new_tokens, unit="tokens")
        start = time.perf_counter()
        out, lengths = jax.device_get(compiled(*inputs))
        seconds = time.perf_counter() - start
        if bar.shown_done is not None:  # a bar is on the screen: its last line
            bar.update(int(max(lengths)))
            bar.close()
    texts = [tokenizer.decode(row[:n]) for row, n in zip(out, lengths, strict=True)]
    stats = {"step": step, "tokens": int(sum(lengths)), "seconds": seconds, "compile": compile_s}
    return texts, stats
