"""Mixture of experts: a top-k routed set of SwiGLU experts in place of the dense MLP.

Token choice with per-expert capacity (GShard / Switch Transformer): each token picks its top-k
experts by router probability; each expert takes at most C tokens of a sequence, first choices
before second choices, earlier tokens before later ones; a token over capacity skips that
expert (its residual stream passes on), and the fraction dropped is reported. Dispatch and
combine are one-hot einsums, so the layer is plain dense algebra that GSPMD shards any way the
rules say: expert weights [E, ...] carry the logical axis `experts` (default: split over the
`fsdp` mesh axis, i.e. expert parallelism across the data-parallel devices).

The load-balancing loss is Switch's E * sum_e f_e * P_e (f_e: share of top-k assignments to
expert e, P_e: mean router probability of e), 1.0 when balanced, averaged over layers and
scaled by `model.moe_aux_weight` into the objective.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.layers import RESIDUAL, _param, dense_init, project
from bigjax.sharding import Rules, constrain


class MoE(nnx.Module):
    """E SwiGLU experts [E, D, F, 2] / [E, F, D] and a router [D, E]."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float,
        *,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rules: Rules,
    ):
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.dtype, self.rules = dtype, rules
        E, D, F = num_experts, d_model, d_ff
        self.router_DE = _param(rngs, dense_init, (D, E), ("embed", None), param_dtype)
        self.gate_up_EDFC = _param(
            rngs,
            dense_init,
            (E, D, F, 2),
            ("experts", "embed", "mlp", None),
            param_dtype,
            fan_in_axes=(1,),
        )
        self.down_EFD = _param(
            rngs, dense_init, (E, F, D), ("experts", "mlp", "embed"), param_dtype, fan_in_axes=(1,)
        )

    def capacity(self, length: int) -> int:
        """Slots per expert per sequence; capacity_factor 0: every token fits (no drops)."""
        e = self.router_DE.shape[-1]
        if self.capacity_factor <= 0:
            return length
        return min(length, max(1, math.ceil(self.capacity_factor * length * self.top_k / e)))

    def __call__(
        self, x_BLD: jax.Array, valid_BL: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (out [B, L, D], {"balance_loss", "dropped"}); `valid_BL` masks padding."""
        b, length, _ = x_BLD.shape
        e, k, c = self.router_DE.shape[-1], self.top_k, self.capacity(length)
        x_BLD = constrain(x_BLD, ("act_batch", "act_seq", "act_embed"), self.rules)
        logits_BLE = project(x_BLD.astype(jnp.float32), self.router_DE[...].astype(jnp.float32), 1)
        probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
        top_p_BLK, top_e_BLK = jax.lax.top_k(probs_BLE, k)
        # k > 1: the chosen experts' weights renormalised to sum to 1 (Mixtral); k = 1 keeps
        # the raw probability, else the router would get no gradient (Switch).
        weights_BLK = top_p_BLK / jnp.sum(top_p_BLK, -1, keepdims=True) if k > 1 else top_p_BLK

        valid_BL = valid_BL.astype(jnp.float32)
        choice_BLKE = jax.nn.one_hot(top_e_BLK, e) * valid_BL[:, :, None, None]
        # Slot of each assignment in its expert: count in priority order (all first choices of
        # the sequence, then all second choices, ...).
        order_BKLE = choice_BLKE.transpose(0, 2, 1, 3)
        slot_BKLE = jnp.cumsum(order_BKLE.reshape(b, k * length, e), axis=1).reshape(
            order_BKLE.shape
        )
        slot_BLKE = slot_BKLE.transpose(0, 2, 1, 3) - 1.0
        kept_BLKE = choice_BLKE * (slot_BLKE < c)
        slot_BLK = jnp.sum(slot_BLKE * kept_BLKE, axis=-1).astype(jnp.int32)
        slot_onehot_BLKC = jax.nn.one_hot(slot_BLK, c)
        dispatch_BLEC = jnp.einsum("blke,blkc->blec", kept_BLKE, slot_onehot_BLKC)
        combine_BLEC = jnp.einsum("blke,blkc,blk->blec", kept_BLKE, slot_onehot_BLKC, weights_BLK)

        dt = self.dtype
        x_BECD = jnp.einsum("blec,bld->becd", dispatch_BLEC.astype(dt), x_BLD.astype(dt))
        h_BECFC = jnp.einsum("becd,edfz->becfz", x_BECD, self.gate_up_EDFC[...].astype(dt))
        h_BECF = jax.nn.silu(h_BECFC[..., 0]) * h_BECFC[..., 1]
        y_BECD = jnp.einsum("becf,efd->becd", h_BECF, self.down_EFD[...].astype(dt))
        out_BLD = jnp.einsum("blec,becd->bld", combine_BLEC.astype(dt), y_BECD)

        n = jnp.maximum(jnp.sum(valid_BL), 1.0)
        share_E = jnp.sum(choice_BLKE, axis=(0, 1, 2)) / (n * k)
        mean_prob_E = jnp.sum(probs_BLE * valid_BL[..., None], axis=(0, 1)) / n
        aux = {
            "balance_loss": e * jnp.sum(share_E * mean_prob_E),
            "dropped": 1.0 - jnp.sum(kept_BLKE) / (n * k),
        }
        return constrain(out_BLD, RESIDUAL, self.rules), aux
