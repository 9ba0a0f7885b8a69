"""Vision Transformer (ViT) for image classification: non-overlapping patches, a class token,
learned positions, the decoder's blocks run bidirectionally, a head on the class token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import ModelConfig
from bigjax.layers import (
    RESIDUAL,
    _param,
    compute_dtype,
    dense_init,
    embed_init,
    make_norm,
    project,
)
from bigjax.models.llama import apply_class_head, class_head, run_blocks, stacked_blocks
from bigjax.models.llama import param_count as decoder_count
from bigjax.models.llama import train_flops_per_token as decoder_flops
from bigjax.sharding import Rules, constrain


def num_patches(cfg: ModelConfig) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def patchify(images_BHWC: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, patch * patch * C], patches in row-major order."""
    b, h, w, c = images_BHWC.shape
    x = images_BHWC.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), -1)


class ViT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), compute_dtype(cfg.dtype)
        self.num_layers, self.scan_layers, self.remat = cfg.num_layers, cfg.scan_layers, cfg.remat
        self.pipeline_microbatches = cfg.pipeline_microbatches
        self.pipeline_interleave = cfg.pipeline_interleave
        self.moe_aux_weight, self.patch, self.dtype, self.rules = (
            cfg.moe_aux_weight,
            cfg.patch_size,
            dt,
            rules,
        )
        patch_dim, d = cfg.patch_size**2 * cfg.channels, cfg.d_model
        self.patch_PD = _param(rngs, dense_init, (patch_dim, d), (None, "embed"), pd)
        self.patch_bias_D = nnx.Param(jnp.zeros((d,), pd), out_sharding=("norm",))
        self.cls_token_D = nnx.Param(
            embed_init(rngs.params(), (1, d), pd)[0], out_sharding=("norm",)
        )
        self.pos_table_PD = nnx.Param(
            embed_init(rngs.params(), (num_patches(cfg) + 1, d), pd),
            out_sharding=(None, "table_embed"),
        )
        self.blocks = stacked_blocks(cfg, rules, rngs)
        self.final_norm = make_norm(cfg.norm, d, eps=cfg.norm_eps, param_dtype=pd)
        self.cls_head_DC, self.cls_bias_C = class_head(cfg, rngs)

    def classify(
        self,
        images_BHWC: jax.Array,
        rng: jax.Array | None = None,
        embed_delta: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Class logits [B, C] (float32) for images [B, H, W, C] in [0, 1], and the auxiliary
        outputs (MoE's)."""
        patches_BNP = patchify(images_BHWC.astype(self.dtype), self.patch)
        x_BND = project(patches_BNP, self.patch_PD[...].astype(self.dtype), 1)
        x_BND = x_BND + self.patch_bias_D[...].astype(self.dtype)
        b, n, d = x_BND.shape
        cls_B1D = jnp.broadcast_to(self.cls_token_D[...].astype(self.dtype), (b, 1, d))
        x_BLD = jnp.concatenate([cls_B1D, x_BND], axis=1) + self.pos_table_PD[...].astype(
            self.dtype
        )
        if embed_delta is not None:  # adversarial training: [B, N + 1, D]
            x_BLD = x_BLD + embed_delta.astype(x_BLD.dtype)
        x_BLD = constrain(x_BLD, RESIDUAL, self.rules)
        segment_ids_BL = jnp.ones((b, n + 1), jnp.int32)  # one image per row: all attend
        positions_BL = jnp.broadcast_to(jnp.arange(n + 1), (b, n + 1))
        x_BLD, aux = run_blocks(self, x_BLD, segment_ids_BL, positions_BL, rng)
        h_BD = self.final_norm(x_BLD[:, 0])  # the class token's final state
        return apply_class_head(h_BD, self.cls_head_DC, self.cls_bias_C), aux


def param_count(cfg: ModelConfig) -> int:
    """The blocks and final norm (the decoder's count without token table, head and
    positions), the patch projection, class token, positions and classification head."""
    d = cfg.d_model
    blocks_and_norm = decoder_count(
        dataclasses.replace(
            cfg, family="llama", vocab_size=0, tie_embeddings=True, num_classes=0, positions="rope"
        )  # fmt: skip
    )
    patch = (cfg.patch_size**2 * cfg.channels + 1) * d
    return blocks_and_norm + patch + d + (num_patches(cfg) + 1) * d + (d + 1) * cfg.num_classes


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Per patch token: the blocks' matmuls and full attention, plus the patch projection."""
    blocks = decoder_flops(dataclasses.replace(cfg, vocab_size=0), seq_len)
    return blocks + 3.0 * 2.0 * cfg.patch_size**2 * cfg.channels * cfg.d_model
