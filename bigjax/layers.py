"""Transformer building blocks (NNX) with logical axis names on every weight and activation.

Shape legend for names: B batch, L length (queries), S key length, D model, H heads,
G kv heads, K head dim, F mlp, V vocab. E.g. `x_BLD`, `logits_BLV`, `q_BLHK`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.sharding import Rules, constrain

# The residual stream [B, L, D] between blocks and sublayers (sequence-parallel on `tensor`).
RESIDUAL = ("act_batch", "act_res_seq", "act_embed")

Initializer = nnx.initializers.Initializer

# Fan-in scaled truncated normal keeps activations ~unit variance at any width.
dense_init: Initializer = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# Table [V, D] entries ~ N(0, 1/D): unit-norm input vectors, and unit-scale logits when tied.
embed_init: Initializer = nnx.initializers.variance_scaling(1.0, "fan_out", "normal")


def compute_dtype(name: str) -> jnp.dtype:
    """'auto' is float32 on CPU (no fast bf16 matmuls there) and bfloat16 on GPU/TPU."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def _param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: tuple[int, ...],
    names: tuple[str, ...],
    dtype: jnp.dtype,
    fan_in_axes: tuple[int, ...] = (0,),
) -> nnx.Param:
    """A Param with logical names, initialised as its (fan_in, fan_out) matrix so that
    multi-dim weights like [D, H, K] get the same scale as the equivalent dense layer."""
    fan_in = math.prod(shape[a] for a in fan_in_axes)
    matrix = init(rngs.params(), (fan_in, math.prod(shape) // fan_in), dtype)
    return nnx.Param(matrix.reshape(shape), out_sharding=names)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x32 = x_BLD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x_BLD.dtype)


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
        logits_BLV = jnp.einsum("BLD,VD->BLV", x_BLD, self.table_VD[...].astype(self.dtype))
        return constrain(logits_BLV, ("act_batch", "act_seq", "act_vocab"), self.rules)


def rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half layout (the Hugging Face Llama convention)."""
    half = x_BLHK.shape[-1] // 2
    inv_freq_K = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq_K
    sin_BL1K, cos_BL1K = jnp.sin(angle_BLK)[:, :, None], jnp.cos(angle_BLK)[:, :, None]
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BL1K - x2 * sin_BL1K, x2 * cos_BL1K + x1 * sin_BL1K], -1)
    return out.astype(x_BLHK.dtype)


def attention_mask(segment_ids_BL: jax.Array) -> jax.Array:
    """Causal mask that also stops attention across packed documents: [B, 1, L, S] bool."""
    length = segment_ids_BL.shape[1]
    causal_LS = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_doc_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (causal_LS & same_doc_BLS)[:, None]


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and a segment-aware causal mask."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float,
        impl: str,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rules: Rules,
    ):
        self.rope_theta, self.impl, self.dtype, self.rules = rope_theta, impl, dtype, rules
        D, H, G, K = d_model, num_heads, num_kv_heads, head_dim
        self.q_DHK = _param(
            rngs, dense_init, (D, H, K), ("embed", "heads", "head_dim"), param_dtype
        )
        self.k_DGK = _param(
            rngs, dense_init, (D, G, K), ("embed", "kv_heads", "head_dim"), param_dtype
        )
        self.v_DGK = _param(
            rngs, dense_init, (D, G, K), ("embed", "kv_heads", "head_dim"), param_dtype
        )
        self.o_HKD = _param(
            rngs,
            dense_init,
            (H, K, D),
            ("heads", "head_dim", "embed"),
            param_dtype,
            fan_in_axes=(0, 1),
        )

    def __call__(
        self, x_BLD: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array
    ) -> jax.Array:
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        act = lambda t, heads: constrain(  # noqa: E731
            t, ("act_batch", "act_seq", heads, None), self.rules
        )
        q_BLHK = act(jnp.einsum("BLD,DHK->BLHK", x_BLD, w(self.q_DHK)), "act_heads")
        k_BLGK = act(jnp.einsum("BLD,DGK->BLGK", x_BLD, w(self.k_DGK)), "act_kv_heads")
        v_BLGK = act(jnp.einsum("BLD,DGK->BLGK", x_BLD, w(self.v_DGK)), "act_kv_heads")
        q_BLHK = rope(q_BLHK, positions_BL, self.rope_theta)
        k_BLGK = rope(k_BLGK, positions_BL, self.rope_theta)
        out_BLHK = jax.nn.dot_product_attention(
            q_BLHK, k_BLGK, v_BLGK, mask=attention_mask(segment_ids_BL), implementation=self.impl
        )
        out_BLD = jnp.einsum("BLHK,HKD->BLD", act(out_BLHK, "act_heads"), w(self.o_HKD))
        return constrain(out_BLD, RESIDUAL, self.rules)  # reduce-scatter, not all-reduce


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rules: Rules,
    ):
        self.dtype, self.rules = dtype, rules
        self.gate_DF = _param(rngs, dense_init, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.up_DF = _param(rngs, dense_init, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.down_FD = _param(rngs, dense_init, (d_ff, d_model), ("mlp", "embed"), param_dtype)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        names_BLF = ("act_batch", "act_seq", "act_mlp")
        gate_BLF = constrain(
            jnp.einsum("BLD,DF->BLF", x_BLD, w(self.gate_DF)), names_BLF, self.rules
        )
        up_BLF = constrain(jnp.einsum("BLD,DF->BLF", x_BLD, w(self.up_DF)), names_BLF, self.rules)
        out_BLD = jnp.einsum("BLF,FD->BLD", jax.nn.silu(gate_BLF) * up_BLF, w(self.down_FD))
        return constrain(out_BLD, RESIDUAL, self.rules)
