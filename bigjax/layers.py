"""Transformer building blocks (NNX) with logical axis names on every weight and activation.

Shape legend for names: B batch, L length (queries), S key length, D model, H heads,
G kv heads, K head dim, F mlp, V vocab. E.g. `x_BLD`, `logits_BLV`, `q_BLHK`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax import fp8 as fp8_ops
from bigjax.attention import attend, dot_product_attention
from bigjax.sharding import CONTEXT_AXIS, Rules, constrain, mesh_sizes

# The residual stream [B, L, D] between blocks and sublayers (sequence-parallel on `tensor`).
RESIDUAL = ("act_batch", "act_res_seq", "act_embed")

Initializer = nnx.initializers.Initializer
Names = tuple[str | None, ...]  # a logical axis name per dim; None: never sharded

# Fan-in scaled truncated normal keeps activations ~unit variance at any width.
dense_init: Initializer = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# Table [V, D] entries ~ N(0, 1/D): unit-norm input vectors, and unit-scale logits when tied.
embed_init: Initializer = nnx.initializers.variance_scaling(1.0, "fan_out", "normal")


def compute_dtype(name: str, platform: str | None = None) -> jnp.dtype:
    """'auto' is float32 on CPU (no fast bf16 matmuls there) and bfloat16 on GPU/TPU;
    `platform` defaults to the default backend's."""
    if name == "auto":
        on_cpu = (platform or jax.default_backend()) == "cpu"
        return jnp.dtype(jnp.float32 if on_cpu else jnp.bfloat16)
    return jnp.dtype(name)


def _param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: tuple[int, ...],
    names: Names,
    dtype: jnp.dtype,
    fan_in_axes: tuple[int, ...] = (0,),
) -> nnx.Param:
    """A Param with logical names, initialised as its (fan_in, fan_out) matrix so that
    multi-dim weights like [D, H, K] get the same scale as the equivalent dense layer."""
    fan_in = math.prod(shape[a] for a in fan_in_axes)
    matrix = init(rngs.params(), (fan_in, math.prod(shape) // fan_in), dtype)
    return nnx.Param(matrix.reshape(shape), out_sharding=names)


def project(x: jax.Array, w: jax.Array, n_in: int, fp8: bool = False) -> jax.Array:
    """x [B, L, *in] @ w [*in, *out] -> [B, L, *out]: a contraction over `in` with B and L as
    they are, or, where `_rows_merged`, one 2-D matmul [B*L, in] @ [in, out]."""
    b, length = x.shape[:2]
    n = math.prod(w.shape[:n_in])
    w_NO = w.reshape(n, -1)
    if _rows_merged():
        matmul = fp8_ops.matmul if fp8 else jnp.matmul  # bigjax/fp8.py: training's projections
        y = matmul(x.reshape(b * length, n), w_NO)
    else:
        x_BLN = x.reshape(b, length, n)
        y = fp8_ops.einsum("bln,no->blo", x_BLN, w_NO) if fp8 else jnp.matmul(x_BLN, w_NO)
    return y.reshape(b, length, *w.shape[n_in:])


def _rows_merged() -> bool:
    """Whether `project` merges [B, L] into one dim of rows: unless the sequence is split over
    `context`. XLA:CPU runs that 2-D matmul and its gradients much faster than the same
    contraction over [B, L] (measured 1.2x on the MLP, 1.9x on the 32k-vocab head,
    fwd+bwd); XLA:TPU and GPU make the same dot of either. But a merged dim keeps only the
    sharding of its leading part, B: with L split too, XLA all-gathered every projection's
    input and saved activations over the whole sequence (811 against 497 MiB of the step's
    temporaries at context 4 on a v5p compile: docs/scaling.md), the memory context
    parallelism is there to save. Merging weights' dims keeps their shardings for the same
    reason: fused weights put their small "which projection" axis last."""
    return mesh_sizes().get(CONTEXT_AXIS, 1) == 1


def _for_compute(p: nnx.Param, dtype: jnp.dtype, rules: Rules) -> jax.Array:
    """A weight in `dtype`, and with the sequence split over `context` gathered whole on its
    FSDP dim (`embed`) before its product, as FSDP means. Left to itself XLA could instead
    gather the activations over the whole sequence and contract `embed` in parts: it did so
    under context x tensor, so that llama_8b at 131072 tokens on fsdp 8 x context 8 x
    tensor 2 compiled to 54.90 GiB a device, 11.59 with the weights gathered (v5p-256,
    docs/scaling.md). Without a context axis XLA gathers the weights anyway; the program is
    left as it was."""
    w = p[...].astype(dtype)
    names = p.get_metadata().get("out_sharding")
    if _rows_merged() or names is None:
        return w
    # inside a scan over stacked layers the value has lost the leading `layers` dim
    whole = tuple(None if name == "embed" else name for name in names[len(names) - w.ndim :])
    return constrain(w, whole, rules)


def _bias(use: bool, shape: tuple[int, ...], names: Names, dtype: jnp.dtype) -> nnx.Param | None:
    """A zero-initialised bias Param, or None (as nnx.data: the attribute is never static)."""
    return nnx.data(nnx.Param(jnp.zeros(shape, dtype), out_sharding=names) if use else None)


def add_bias(y: jax.Array, bias: nnx.Param | None, dtype: jnp.dtype) -> jax.Array:
    """y [B, L, *out] + bias [*out], or y unchanged without a bias."""
    return y if bias is None else y + bias[...].astype(dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x32 = x_BLD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x_BLD.dtype)


class LayerNorm(nnx.Module):
    """Mean-centred norm with scale and bias (GPT-2, BERT), computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x32 = x_BLD.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(
            jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps
        )
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x_BLD.dtype)


def make_norm(kind: str, dim: int, *, eps: float, param_dtype: jnp.dtype) -> nnx.Module:
    """'rmsnorm' or 'layernorm' (config.NORMS)."""
    cls = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[kind]
    return cls(dim, eps=eps, param_dtype=param_dtype)


class Embed(nnx.Module):
    """Token embedding table, sharded on vocab; `attend` gives tied output logits."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        *,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rules: Rules,
    ):
        self.dtype, self.rules = dtype, rules
        table = embed_init(rngs.params(), (vocab, dim), param_dtype)
        self.table_VD = nnx.Param(table, out_sharding=("table_vocab", "table_embed"))

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        x_BLD = jnp.take(self.table_VD[...].astype(self.dtype), tokens_BL, axis=0)
        return constrain(x_BLD, RESIDUAL, self.rules)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = constrain(x_BLD, ("act_batch", "act_seq", "act_embed"), self.rules)
        logits_BLV = project(x_BLD, self.table_VD[...].astype(self.dtype).T, 1)
        return constrain(logits_BLV, ("act_batch", "act_seq", "act_vocab"), self.rules)


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary position embedding, rotate-half layout (the Hugging Face Llama convention), with
    the context-extension schemes Hugging Face names `rope_type`:
      'default': no scaling;
      'linear': every frequency divided by `factor` (positions interpolated);
      'llama3': Llama 3.1's bands: wavelengths longer than original/low_freq_factor are
        divided by `factor`, shorter than original/high_freq_factor kept, and those between
        interpolated smoothly.
    """

    # every field from the model config (rope_*: bigjax/config/schema.py has the defaults)
    theta: float
    scaling: str
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int

    def inv_freq(self, head_dim: int) -> jax.Array:
        """Angular frequency of each of the head_dim / 2 rotated pairs, float32 [K/2]."""
        half = head_dim // 2
        inv_freq = 1.0 / self.theta ** (jnp.arange(half, dtype=jnp.float32) / half)
        if self.scaling == "linear":
            return inv_freq / self.factor
        if self.scaling == "llama3":
            wavelen = 2 * math.pi / inv_freq
            low_wavelen = self.original_max_positions / self.low_freq_factor
            high_wavelen = self.original_max_positions / self.high_freq_factor
            scaled = jnp.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return jnp.where(medium, smoothed, scaled)
        return inv_freq

    def __call__(self, x_BLHK: jax.Array, positions_BL: jax.Array) -> jax.Array:
        angle_BLK = positions_BL[..., None].astype(jnp.float32) * self.inv_freq(x_BLHK.shape[-1])
        sin_BL1K, cos_BL1K = jnp.sin(angle_BLK)[:, :, None], jnp.cos(angle_BLK)[:, :, None]
        x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
        out = jnp.concatenate([x1 * cos_BL1K - x2 * sin_BL1K, x2 * cos_BL1K + x1 * sin_BL1K], -1)
        return out.astype(x_BLHK.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with a segment-aware causal mask, RoPE (`rope`; None for
    models with learned positions) and optional projection biases (GPT-2). `impl` is the
    training kernel (attention.IMPLS, resolved); cached decoding always uses the einsums."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rope: Rope | None,
        use_bias: bool,
        impl: str,
        causal: bool = True,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rules: Rules,
        fp8: bool = False,
    ):
        self.rope, self.impl, self.dtype, self.rules = rope, impl, dtype, rules
        self.causal, self.fp8 = causal, fp8
        D, H, G, K = d_model, num_heads, num_kv_heads, head_dim
        self.q_DHK = _param(
            rngs, dense_init, (D, H, K), ("embed", "heads", "head_dim"), param_dtype
        )
        # K and V in one weight: one matmul with twice the columns runs faster than two (and
        # its backward sums one product instead of two); the C axis (k, v) is never sharded.
        self.kv_DGCK = _param(
            rngs, dense_init, (D, G, 2, K), ("embed", "kv_heads", None, "head_dim"), param_dtype
        )
        self.o_HKD = _param(
            rngs,
            dense_init,
            (H, K, D),
            ("heads", "head_dim", "embed"),
            param_dtype,
            fan_in_axes=(0, 1),
        )
        self.q_bias_HK = _bias(use_bias, (H, K), ("heads", "head_dim"), param_dtype)
        self.kv_bias_GCK = _bias(use_bias, (G, 2, K), ("kv_heads", None, "head_dim"), param_dtype)
        self.o_bias_D = _bias(use_bias, (D,), ("norm",), param_dtype)

    def qkv(
        self, x_BLD: jax.Array, positions_BL: jax.Array, fp8: bool = False
    ) -> tuple[jax.Array, ...]:
        """Projections (in fp8 if asked) and RoPE: q [B, L, H, K], k and v [B, L, G, K]."""
        w = lambda p: _for_compute(p, self.dtype, self.rules)  # noqa: E731
        act = lambda t, heads: constrain(  # noqa: E731
            t, ("act_batch", "act_seq", heads, None), self.rules
        )
        # the residual stream may be sequence-sharded: gather it once, before the projections
        x_BLD = constrain(x_BLD, ("act_batch", "act_seq", "act_embed"), self.rules)
        q_BLHK = add_bias(project(x_BLD, w(self.q_DHK), 1, fp8), self.q_bias_HK, self.dtype)
        kv_BLGCK = project(x_BLD, w(self.kv_DGCK), 1, fp8)
        kv_BLGCK = add_bias(kv_BLGCK, self.kv_bias_GCK, self.dtype)
        q_BLHK = act(q_BLHK, "act_heads")
        k_BLGK = act(kv_BLGCK[:, :, :, 0], "act_kv_heads")
        v_BLGK = act(kv_BLGCK[:, :, :, 1], "act_kv_heads")
        if self.rope is not None:
            q_BLHK, k_BLGK = self.rope(q_BLHK, positions_BL), self.rope(k_BLGK, positions_BL)
        return q_BLHK, k_BLGK, v_BLGK

    def _out(self, out_BLHK: jax.Array, fp8: bool = False) -> jax.Array:
        out_BLHK = constrain(out_BLHK, ("act_batch", "act_seq", "act_heads", None), self.rules)
        out_BLD = project(out_BLHK, _for_compute(self.o_HKD, self.dtype, self.rules), 2, fp8)
        out_BLD = add_bias(out_BLD, self.o_bias_D, self.dtype)
        return constrain(out_BLD, RESIDUAL, self.rules)  # reduce-scatter, not all-reduce

    def __call__(
        self, x_BLD: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array
    ) -> jax.Array:
        q_BLHK, k_BLGK, v_BLGK = self.qkv(x_BLD, positions_BL, self.fp8)
        out_BLHK = attend(
            self.impl, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal=self.causal, rules=self.rules
        )
        return self._out(out_BLHK, self.fp8)

    def decode(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        cache_k_BSGK: jax.Array,
        cache_v_BSGK: jax.Array,
        slot: jax.Array,
        mask_B1TS: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention for T new tokens written into cache slots [slot, slot + T) and attending
        to the cache under `mask_B1TS`; returns (out, updated k cache, updated v cache).
        `slot` is one index for every row, or [B] indices (rows at different lengths, as a
        serving engine's decode slots are)."""
        q_BTHK, k_BTGK, v_BTGK = self.qkv(x_BTD, positions_BT)
        k_BSGK = write_cache(cache_k_BSGK, k_BTGK, slot)
        v_BSGK = write_cache(cache_v_BSGK, v_BTGK, slot)
        out_BTHK = dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask_B1TS)
        return self._out(out_BTHK), k_BSGK, v_BSGK


def write_cache(cache_BSGK: jax.Array, new_BTGK: jax.Array, slot: jax.Array | int) -> jax.Array:
    """`new_BTGK` written into the cache at slot `slot` (a scalar), or at `slot[b]` in row b."""
    if jnp.ndim(slot) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache_BSGK, new_BTGK, slot, axis=1)
    row = functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=0)
    return jax.vmap(row)(cache_BSGK, new_BTGK, slot)


def decode_mask(slot: jax.Array | int, num_new: int, valid_BS: jax.Array) -> jax.Array:
    """[B, 1, T, S]: new token t (cache slot `slot + t`) sees valid slots up to its own."""
    slots_S = jnp.arange(valid_BS.shape[1])
    causal_TS = slots_S[None, :] <= (slot + jnp.arange(num_new))[:, None]
    return (causal_TS[None] & valid_BS[:, None, :])[:, None]


class FeedForward(nnx.Module):
    """What both feed-forward blocks take; each makes its own weights (`make`)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rules: Rules,
        fp8: bool = False,
    ):
        self.dtype, self.rules, self.fp8 = dtype, rules, fp8
        self.make(d_model, d_ff, use_bias, rngs, param_dtype)

    def make(
        self, d_model: int, d_ff: int, use_bias: bool, rngs: nnx.Rngs, param_dtype: jnp.dtype
    ) -> None:
        raise NotImplementedError


class MLP(FeedForward):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up as one [D, F, 2] weight
    (one matmul; measured 1.4x faster fwd+bwd than two on a CPU, docs/benchmarks.md)."""

    def make(
        self, d_model: int, d_ff: int, use_bias: bool, rngs: nnx.Rngs, param_dtype: jnp.dtype
    ) -> None:
        self.gate_up_DFC = _param(
            rngs, dense_init, (d_model, d_ff, 2), ("embed", "mlp", None), param_dtype
        )
        self.down_FD = _param(rngs, dense_init, (d_ff, d_model), ("mlp", "embed"), param_dtype)
        self.gate_up_bias_FC = _bias(use_bias, (d_ff, 2), ("mlp", None), param_dtype)
        self.down_bias_D = _bias(use_bias, (d_model,), ("norm",), param_dtype)

    def __call__(self, x_BLD: jax.Array, decode: bool = False) -> jax.Array:
        w = lambda p: _for_compute(p, self.dtype, self.rules)  # noqa: E731
        fp8 = self.fp8 and not decode  # cached decoding: one row's scale never mixes others'
        names_BLF = ("act_batch", "act_seq", "act_mlp")
        x_BLD = constrain(x_BLD, ("act_batch", "act_seq", "act_embed"), self.rules)
        gate_up_BLFC = project(x_BLD, w(self.gate_up_DFC), 1, fp8)
        gate_up_BLFC = add_bias(gate_up_BLFC, self.gate_up_bias_FC, self.dtype)
        gate_BLF = constrain(gate_up_BLFC[..., 0], names_BLF, self.rules)
        up_BLF = constrain(gate_up_BLFC[..., 1], names_BLF, self.rules)
        out_BLD = project(jax.nn.silu(gate_BLF) * up_BLF, w(self.down_FD), 1, fp8)
        out_BLD = add_bias(out_BLD, self.down_bias_D, self.dtype)
        return constrain(out_BLD, RESIDUAL, self.rules)


class GeluMLP(FeedForward):
    """GPT-2 / BERT feed-forward: down(gelu(up(x))), GELU in its tanh form (HF `gelu_new`)."""

    def make(
        self, d_model: int, d_ff: int, use_bias: bool, rngs: nnx.Rngs, param_dtype: jnp.dtype
    ) -> None:
        self.up_DF = _param(rngs, dense_init, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.down_FD = _param(rngs, dense_init, (d_ff, d_model), ("mlp", "embed"), param_dtype)
        self.up_bias_F = _bias(use_bias, (d_ff,), ("mlp",), param_dtype)
        self.down_bias_D = _bias(use_bias, (d_model,), ("norm",), param_dtype)

    def __call__(self, x_BLD: jax.Array, decode: bool = False) -> jax.Array:
        w = lambda p: _for_compute(p, self.dtype, self.rules)  # noqa: E731
        fp8 = self.fp8 and not decode
        x_BLD = constrain(x_BLD, ("act_batch", "act_seq", "act_embed"), self.rules)
        up_BLF = add_bias(project(x_BLD, w(self.up_DF), 1, fp8), self.up_bias_F, self.dtype)
        up_BLF = constrain(up_BLF, ("act_batch", "act_seq", "act_mlp"), self.rules)
        out_BLD = project(jax.nn.gelu(up_BLF, approximate=True), w(self.down_FD), 1, fp8)
        out_BLD = add_bias(out_BLD, self.down_bias_D, self.dtype)
        return constrain(out_BLD, RESIDUAL, self.rules)


def make_mlp(kind: str, d_model: int, d_ff: int, **kwargs: Any) -> MLP | GeluMLP:
    """'swiglu' (Llama) or 'gelu' (GPT-2, BERT) (config.MLPS)."""
    return GeluMLP(d_model, d_ff, **kwargs) if kind == "gelu" else MLP(d_model, d_ff, **kwargs)
