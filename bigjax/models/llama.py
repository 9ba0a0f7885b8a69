"""The decoder LM: Llama style (RMSNorm, RoPE with its scaling options, SwiGLU, grouped-query
attention) or GPT-2 style (LayerNorm, learned positions, GELU, biases), by config switches
(config.FAMILY_DEFAULTS); layers stacked and scanned (or unrolled)."""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax import stages
from bigjax.config import ModelConfig
from bigjax.layers import (
    RESIDUAL,
    Attention,
    Embed,
    Rope,
    _param,
    compute_dtype,
    dense_init,
    embed_init,
    make_mlp,
    make_norm,
    project,
)
from bigjax.moe import MoE, Routing
from bigjax.sharding import Rules, constrain, num_stages

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


def rope_of(cfg: ModelConfig) -> Rope | None:
    if cfg.positions != "rope":
        return None
    return Rope(
        theta=cfg.rope_theta,
        scaling=cfg.rope_scaling,
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_positions=cfg.rope_original_max_positions,
    )


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
            rope=rope_of(cfg),
            use_bias=cfg.use_bias,
            impl=cfg.attention,
            causal=cfg.causal,
            rngs=rngs,
            param_dtype=pd,
            dtype=dt,
            rules=rules,
            fp8=cfg.matmul_precision == "fp8",
        )
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.mlp = (
            MoE(
                cfg.d_model,
                cfg.d_ff,
                routing_of(cfg),
                rngs=rngs,
                param_dtype=pd,
                dtype=dt,
                rules=rules,
                fp8=cfg.matmul_precision == "fp8",
            )
            if cfg.num_experts
            else make_mlp(
                cfg.mlp,
                cfg.d_model,
                cfg.d_ff,
                use_bias=cfg.use_bias,
                rngs=rngs,
                param_dtype=pd,
                dtype=dt,
                rules=rules,
                fp8=cfg.matmul_precision == "fp8",
            )
        )

    def _mlp(
        self, x_BLD: jax.Array, valid_BL: jax.Array, decode: bool = False
    ) -> tuple[jax.Array, dict]:
        """The feed-forward sublayer and its auxiliary outputs (MoE: balance and drops)."""
        if isinstance(self.mlp, MoE):
            return self.mlp(x_BLD, valid_BL, decode)
        return self.mlp(x_BLD, decode), {}

    def __call__(
        self,
        x_BLD: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        rng: jax.Array | None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        rng_attn, rng_mlp = jax.random.split(rng) if rng is not None else (None, None)
        h_BLD = self.attn(self.attn_norm(x_BLD), segment_ids_BL, positions_BL)
        x_BLD = constrain(x_BLD + _dropout(h_BLD, self.dropout, rng_attn), RESIDUAL, self.rules)
        h_BLD, aux = self._mlp(self.mlp_norm(x_BLD), segment_ids_BL > 0)
        x_BLD = x_BLD + _dropout(h_BLD, self.dropout, rng_mlp)
        return constrain(x_BLD, RESIDUAL, self.rules), aux

    def decode(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        cache_k_BSGK: jax.Array,
        cache_v_BSGK: jax.Array,
        slot: jax.Array,
        mask_B1TS: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on T new tokens against its KV cache (no dropout)."""
        h_BTD, k, v = self.attn.decode(
            self.attn_norm(x_BTD), positions_BT, cache_k_BSGK, cache_v_BSGK, slot, mask_B1TS
        )
        x_BTD = x_BTD + h_BTD
        h_BTD, _ = self._mlp(self.mlp_norm(x_BTD), jnp.ones(x_BTD.shape[:2], bool), decode=True)
        return x_BTD + h_BTD, k, v


def routing_of(cfg: ModelConfig) -> Routing:
    """The MoE layer's routing: each of its fields is the model config's `moe_<field>`."""
    keys = [f.name for f in dataclasses.fields(Routing) if hasattr(cfg, f"moe_{f.name}")]
    return Routing(
        cfg.num_experts, cfg.experts_per_token, **{k: getattr(cfg, f"moe_{k}") for k in keys}
    )


def stacked_blocks(cfg: ModelConfig, rules: Rules, rngs: nnx.Rngs) -> Block:
    """`num_layers` blocks as one module whose params carry a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rules, rngs=rngs)

    return build(rngs)


class BlockStack(typing.Protocol):
    """What `run_blocks` reads of a model (the decoder, the ViT)."""

    @property
    def blocks(self) -> Block: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def remat(self) -> str: ...
    @property
    def scan_layers(self) -> bool: ...
    @property
    def moe_aux_weight(self) -> float: ...
    @property
    def rules(self) -> Rules: ...
    @property
    def pipeline_microbatches(self) -> int: ...
    @property
    def pipeline_interleave(self) -> int: ...


def run_blocks(
    model: BlockStack,
    x_BLD: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`model.blocks` over the residual stream, scanned or unrolled, rematerialised as the
    model says, in pipeline stages where the mesh has them (bigjax/stages.py); returns the
    stream and the auxiliary outputs averaged over layers."""
    block_def, block_params = nnx.split(model.blocks)
    layer_rngs = None if rng is None else jax.random.split(rng, model.num_layers)

    def layers(
        params: nnx.State,
        x_BLD: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        rngs_N: jax.Array | None,
        lap: jax.Array | int | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The blocks over `params` stacked on layers; or, with `lap` (a pipeline stage),
        over chunk `lap` of `params` [laps, layers, ...], each layer slicing its weights
        inside its remat region: the backward slices them again from the stage's weights,
        kept once, where a slice taken before would be kept for every tick of the pipeline
        (docs/scaling.md, "Deep models")."""
        if lap is not None and model.remat == "none":
            # Without a remat region every layer keeps its inputs, weights included, for the
            # backward: slicing inside saves nothing (measured: 4 % more temporaries).
            params, lap = jax.tree.map(lambda a: a[lap], params), None
        num_layers = jax.tree.leaves(params)[0].shape[0 if lap is None else 1]

        def apply_block(x_BLD: jax.Array, layer: tuple) -> tuple[jax.Array, dict]:
            layer_params, layer_rng = layer
            if lap is not None:  # `layer_params` is the layer's index in the chunk
                layer_params = jax.tree.map(lambda a: a[lap, layer_params], params)
            block = nnx.merge(block_def, layer_params)
            return block(x_BLD, segment_ids_BL, positions_BL, layer_rng)

        if model.remat != "none":
            apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICY[model.remat])
        per_layer_params = params if lap is None else jnp.arange(num_layers)
        if model.scan_layers:
            return jax.lax.scan(apply_block, x_BLD, (per_layer_params, rngs_N))
        per_layer = []
        for i in range(num_layers):
            layer = jax.tree.map(lambda a, i=i: a[i], (per_layer_params, rngs_N))
            x_BLD, aux = apply_block(x_BLD, layer)
            per_layer.append(aux)
        return x_BLD, jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

    mesh = jax.sharding.get_abstract_mesh()
    count = 1 if mesh.empty else num_stages(model.rules, mesh.shape, model.num_layers)
    if count > 1:
        num_micro = stages.microbatches(model.pipeline_microbatches, count)
        x_BLD, means = stages.run(
            layers, block_params, x_BLD, segment_ids_BL, positions_BL, layer_rngs,
            stages=count, num_micro=num_micro, interleave=model.pipeline_interleave,
            rules=model.rules,
        )  # fmt: skip
        per_layer = {}  # the pipeline reports the means over layers only
    else:
        x_BLD, aux_N = layers(block_params, x_BLD, segment_ids_BL, positions_BL, layer_rngs)
        means = {k: jnp.mean(v) for k, v in aux_N.items()}
        # each layer's expert load too (TensorBoard groups them): collapse shows per layer
        per_layer = {
            f"moe_{k}/layer_{i}": v[i]
            for k, v in aux_N.items()
            if k.startswith("load_")
            for i in range(v.shape[0])
        }

    aux = {f"moe_{k}": v for k, v in means.items()}
    if "moe_balance_loss" in aux:
        aux["aux_loss"] = model.moe_aux_weight * aux["moe_balance_loss"]
    if "moe_router_loss" in aux:  # z-loss and the balancing bias's signal
        aux["aux_loss"] = aux["aux_loss"] + aux["moe_router_loss"]
    return x_BLD, {**aux, **per_layer}


def class_head(cfg: ModelConfig, rngs: nnx.Rngs) -> tuple:
    """(weight [D, C], bias [C]) of a classification head, or (None, None) without classes;
    as nnx.data, so the attributes are never static."""
    if cfg.num_classes <= 0:
        return nnx.data(None), nnx.data(None)
    pd = jnp.dtype(cfg.param_dtype)
    w = _param(rngs, dense_init, (cfg.d_model, cfg.num_classes), ("embed", None), pd)
    b = nnx.Param(jnp.zeros((cfg.num_classes,), pd), out_sharding=(None,))
    return nnx.data(w), nnx.data(b)


def apply_class_head(h_BD: jax.Array, w_DC: nnx.Param, b_C: nnx.Param) -> jax.Array:
    """Class logits [B, C] in float32."""
    return h_BD.astype(jnp.float32) @ w_DC[...].astype(jnp.float32) + b_C[...].astype(jnp.float32)


class Llama(nnx.Module):
    """Decoder LM. Blocks are stacked on a leading `layers` axis and run by scan (or a loop)."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), compute_dtype(cfg.dtype)
        self.num_layers, self.scan_layers, self.remat = cfg.num_layers, cfg.scan_layers, cfg.remat
        self.moe_aux_weight = cfg.moe_aux_weight
        self.pipeline_microbatches = cfg.pipeline_microbatches
        self.pipeline_interleave = cfg.pipeline_interleave
        self.dtype, self.rules = dt, rules
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, rngs=rngs, param_dtype=pd, dtype=dt, rules=rules
        )

        self.blocks = stacked_blocks(cfg, rules, rngs)
        self.cls_head_DC, self.cls_bias_C = class_head(cfg, rngs)
        # nnx.data: a Param [P, D] for learned positions (GPT-2), None with RoPE.
        self.pos_table_PD = nnx.data(
            nnx.Param(
                embed_init(rngs.params(), (cfg.max_positions, cfg.d_model), pd),
                out_sharding=(None, "table_embed"),
            )
            if cfg.positions == "learned"
            else None
        )
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
        embed_delta: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, V] in the compute dtype. `rng` enables dropout; `embed_delta`
        [B, L, D] is added to the input embeddings (adversarial training)."""
        return self.logits_and_aux(tokens_BL, segment_ids_BL, positions_BL, rng, embed_delta)[0]

    def logits_and_aux(
        self,
        tokens_BL: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        rng: jax.Array | None = None,
        embed_delta: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The logits and {"aux_loss": what to add to the objective, diagnostics...}: for MoE
        the load-balancing loss and the share of dropped assignments, averaged over layers."""
        x_BLD, aux = self._trunk(tokens_BL, segment_ids_BL, positions_BL, rng, embed_delta)
        return self.logits(x_BLD), aux

    def classify(
        self,
        tokens_BL: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        rng: jax.Array | None = None,
        embed_delta: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Class logits [B, C] (float32) from the final hidden state of each row's last real
        token (rows hold one example each, left-aligned: data.packing=pad), and the auxiliary
        outputs (as `logits_and_aux`'s)."""
        x_BLD, aux = self._trunk(tokens_BL, segment_ids_BL, positions_BL, rng, embed_delta)
        last_B = jnp.maximum(jnp.sum(segment_ids_BL > 0, axis=1) - 1, 0)
        h_BD = jnp.take_along_axis(self.final_norm(x_BLD), last_B[:, None, None], axis=1)[:, 0]
        return apply_class_head(h_BD, self.cls_head_DC, self.cls_bias_C), aux

    def _trunk(
        self,
        tokens_BL: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        rng: jax.Array | None,
        embed_delta: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Embedding and blocks: the residual stream [B, L, D] before the final norm, and the
        auxiliary outputs averaged over layers."""
        x_BLD = self.input_embeddings(tokens_BL, positions_BL)
        if embed_delta is not None:
            x_BLD = x_BLD + embed_delta.astype(x_BLD.dtype)
        return run_blocks(self, x_BLD, segment_ids_BL, positions_BL, rng)

    def input_embeddings(self, tokens_BL: jax.Array, positions_BL: jax.Array) -> jax.Array:
        """What the first block reads: token embeddings, plus learned positions if any."""
        x_BLD = self.embed(tokens_BL)
        if self.pos_table_PD is None:
            return x_BLD
        pos_BLD = jnp.take(self.pos_table_PD[...].astype(self.dtype), positions_BL, axis=0)
        return constrain(x_BLD + pos_BLD, RESIDUAL, self.rules)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """Logits [B, L, V] from the last block's output (the final norm, then the head)."""
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
        *,
        unroll: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Logits [B, T, V] for T new tokens written into cache slots [slot, slot + T) of
        every layer's KV cache [N layers, B, S, G, K]; returns (logits, k cache, v cache).
        `unroll`: the layers as a Python loop even when stacked for a scan. A scan passes
        each layer's whole cache through its stacked inputs and outputs (copies); unrolled,
        a one-token step writes in place: 1.3x faster decode at 8 slots on a CPU."""
        x_BTD = self.input_embeddings(tokens_BT, positions_BT)
        block_def, block_params = nnx.split(self.blocks)

        def apply_block(x_BTD: jax.Array, layer: tuple) -> tuple[jax.Array, tuple]:
            params, k_BSGK, v_BSGK = layer
            block = nnx.merge(block_def, params)
            x_BTD, k_BSGK, v_BSGK = block.decode(
                x_BTD, positions_BT, k_BSGK, v_BSGK, slot, mask_B1TS
            )
            return x_BTD, (k_BSGK, v_BSGK)

        layers = (block_params, cache_k_NBSGK, cache_v_NBSGK)
        if self.scan_layers and not unroll:
            x_BTD, (k_NBSGK, v_NBSGK) = jax.lax.scan(apply_block, x_BTD, layers)
        else:
            ks, vs = [], []
            for i in range(self.num_layers):
                x_BTD, (k, v) = apply_block(x_BTD, jax.tree.map(lambda a, i=i: a[i], layers))
                ks.append(k)
                vs.append(v)
            k_NBSGK, v_NBSGK = jnp.stack(ks), jnp.stack(vs)
        return self.logits(x_BTD), k_NBSGK, v_NBSGK


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int, int, int]:
    """(D, F, V, H, G, K) in the shape-legend letters of layers.py."""
    return (cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head)


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count; tests check it against the built model."""
    D, F, V, H, G, K = _dims(cfg)
    attention = D * H * K * 2 + D * G * K * 2  # q, o; k, v
    mlp = (3 if cfg.mlp == "swiglu" else 2) * D * F
    if cfg.use_bias:
        attention += H * K + 2 * G * K + D
        mlp += (2 if cfg.mlp == "swiglu" else 1) * F + D
    if cfg.num_experts:  # E routed and S shared experts (no biases), the router, its bias
        mlp = (cfg.num_experts + cfg.moe_shared_experts) * 3 * D * F + D * cfg.num_experts
        mlp += cfg.num_experts if cfg.moe_bias_rate > 0 else 0
    norm = 2 * D if cfg.norm == "layernorm" else D  # scale (and bias)
    per_layer = attention + mlp + 2 * norm
    head = 0 if cfg.tie_embeddings else D * V
    positions = cfg.max_positions * D if cfg.positions == "learned" else 0
    classifier = (D + 1) * cfg.num_classes
    return V * D + positions + cfg.num_layers * per_layer + norm + head + classifier


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward = 3x forward; remat not counted).

    Matmuls cost 2 FLOPs per weight. Causal attention scores and the value mix cost
    2 * 2 * L * H * K per token for full attention; causality halves that.
    """
    D, F, V, H, G, K = _dims(cfg)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * D * F
    if cfg.num_experts:  # active weights: k routed and the shared experts, and the router
        mlp = (cfg.experts_per_token + cfg.moe_shared_experts) * 3 * D * F + D * cfg.num_experts
    matmul_weights = cfg.num_layers * (2 * D * H * K + 2 * D * G * K + mlp) + D * V
    # 4 L H K per token over all keys; a causal mask halves it
    attention = cfg.num_layers * (2 if cfg.causal else 4) * seq_len * H * K
    return 3.0 * (2.0 * matmul_weights + attention)
