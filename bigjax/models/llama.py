"""Llama-style decoder: RMSNorm (or LayerNorm), RoPE, SwiGLU, grouped-query attention, scanned
layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import ModelConfig
from bigjax.layers import (
    MLP,
    RESIDUAL,
    Attention,
    Embed,
    _param,
    compute_dtype,
    dense_init,
    make_norm,
    project,
)
from bigjax.sharding import Rules, constrain

REMAT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keeps the weight matmuls' outputs, recomputes elementwise ops and attention scores.
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), compute_dtype(cfg.dtype)
        self.dropout, self.rules = cfg.dropout, rules
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.attn = Attention(
            cfg.d_model,
            cfg.num_heads,
            cfg.kv_heads,
            cfg.dim_per_head,
            rope_theta=cfg.rope_theta,
            impl=cfg.attention,
            rngs=rngs,
            param_dtype=pd,
            dtype=dt,
            rules=rules,
        )
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, rngs=rngs, param_dtype=pd, dtype=dt, rules=rules)

    def __call__(
        self,
        x_BLD: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        rng: jax.Array | None,
    ) -> jax.Array:
        rng_attn, rng_mlp = jax.random.split(rng) if rng is not None else (None, None)
        h_BLD = self.attn(self.attn_norm(x_BLD), segment_ids_BL, positions_BL)
        x_BLD = constrain(x_BLD + _dropout(h_BLD, self.dropout, rng_attn), RESIDUAL, self.rules)
        h_BLD = self.mlp(self.mlp_norm(x_BLD))
        return constrain(x_BLD + _dropout(h_BLD, self.dropout, rng_mlp), RESIDUAL, self.rules)

    def decode(
        self, x_BTD, positions_BT, cache_k_BSGK, cache_v_BSGK, slot, mask_B1TS
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on T new tokens against its KV cache (no dropout)."""
        h_BTD, k, v = self.attn.decode(
            self.attn_norm(x_BTD), positions_BT, cache_k_BSGK, cache_v_BSGK, slot, mask_B1TS
        )
        x_BTD = x_BTD + h_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), k, v


class Llama(nnx.Module):
    """Decoder LM. Blocks are stacked on a leading `layers` axis and run by scan (or a loop)."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), compute_dtype(cfg.dtype)
        self.num_layers, self.scan_layers, self.remat = cfg.num_layers, cfg.scan_layers, cfg.remat
        self.dtype, self.rules = dt, rules
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, rngs=rngs, param_dtype=pd, dtype=dt, rules=rules
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rules, rngs=rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        # nnx.data: the attribute holds a Param or None (tied), never static config.
        self.lm_head_DV = nnx.data(
            None
            if cfg.tie_embeddings
            else _param(rngs, dense_init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)
        )

    def __call__(
        self,
        tokens_BL: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Returns logits [B, L, V] in the compute dtype. `rng` enables dropout."""
        x_BLD = self.embed(tokens_BL)
        block_def, block_params = nnx.split(self.blocks)
        layer_rngs = None if rng is None else jax.random.split(rng, self.num_layers)

        def apply_block(x_BLD: jax.Array, layer: tuple) -> tuple[jax.Array, None]:
            params, layer_rng = layer
            block = nnx.merge(block_def, params)
            return block(x_BLD, segment_ids_BL, positions_BL, layer_rng), None

        if self.remat != "none":
            apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICY[self.remat])
        if self.scan_layers:
            x_BLD, _ = jax.lax.scan(apply_block, x_BLD, (block_params, layer_rngs))
        else:
            for i in range(self.num_layers):
                layer = jax.tree.map(lambda a, i=i: a[i], (block_params, layer_rngs))
                x_BLD, _ = apply_block(x_BLD, layer)

        return self._logits(x_BLD)

    def _logits(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = self.final_norm(x_BLD)
        if self.lm_head_DV is None:
            return self.embed.attend(x_BLD)
        x_BLD = constrain(x_BLD, ("act_batch", "act_seq", "act_embed"), self.rules)
        logits_BLV = project(x_BLD, self.lm_head_DV[...].astype(self.dtype), 1)
        return constrain(logits_BLV, ("act_batch", "act_seq", "act_vocab"), self.rules)

    def decode(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        cache_k_NBSGK: jax.Array,
        cache_v_NBSGK: jax.Array,
        slot: jax.Array,
        mask_B1TS: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Logits [B, T, V] for T new tokens written into cache slots [slot, slot + T) of
        every layer's KV cache [N layers, B, S, G, K]; returns (logits, k cache, v cache)."""
        x_BTD = self.embed(tokens_BT)
        block_def, block_params = nnx.split(self.blocks)

        def apply_block(x_BTD: jax.Array, layer: tuple) -> tuple[jax.Array, tuple]:
            params, k_BSGK, v_BSGK = layer
            block = nnx.merge(block_def, params)
            x_BTD, k_BSGK, v_BSGK = block.decode(
                x_BTD, positions_BT, k_BSGK, v_BSGK, slot, mask_B1TS
            )
            return x_BTD, (k_BSGK, v_BSGK)

        layers = (block_params, cache_k_NBSGK, cache_v_NBSGK)
        if self.scan_layers:
            x_BTD, (k_NBSGK, v_NBSGK) = jax.lax.scan(apply_block, x_BTD, layers)
        else:
            ks, vs = [], []
            for i in range(self.num_layers):
                x_BTD, (k, v) = apply_block(x_BTD, jax.tree.map(lambda a, i=i: a[i], layers))
                ks.append(k)
                vs.append(v)
            k_NBSGK, v_NBSGK = jnp.stack(ks), jnp.stack(vs)
        return self._logits(x_BTD), k_NBSGK, v_NBSGK


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int, int, int]:
    """(D, F, V, H, G, K) in the shape-legend letters of layers.py."""
    return (cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head)


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count; tests check it against the built model."""
    D, F, V, H, G, K = _dims(cfg)
    attention = D * H * K * 2 + D * G * K * 2  # q, o; k, v
    norm = 2 * D if cfg.norm == "layernorm" else D  # scale (and bias)
    per_layer = attention + 3 * D * F + 2 * norm  # + SwiGLU, two norms
    head = 0 if cfg.tie_embeddings else D * V
    return V * D + cfg.num_layers * per_layer + norm + head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward = 3x forward; remat not counted).

    Matmuls cost 2 FLOPs per weight. Causal attention scores and the value mix cost
    2 * 2 * L * H * K per token for full attention; causality halves that.
    """
    D, F, V, H, G, K = _dims(cfg)
    matmul_weights = cfg.num_layers * (2 * D * H * K + 2 * D * G * K + 3 * D * F) + D * V
    attention = cfg.num_layers * 2 * seq_len * H * K  # (4 L H K) / 2 for the causal mask
    return 3.0 * (2.0 * matmul_weights + attention)
