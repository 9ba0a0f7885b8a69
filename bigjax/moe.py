"""Mixture of experts: top-k routed SwiGLU experts (and optional shared ones) in place of the
dense MLP.

Routing (`Routing`): the router scores each token's experts by softmax (Mixtral, Switch) or
sigmoid (DeepSeek-V3) of its logits and picks the top k. With `bias_rate` > 0 the pick uses
scores + a per-expert bias that is not learned by gradient descent but nudged after every
step towards balance (DeepSeek-V3's auxiliary-loss-free balancing): b_e -= rate * sign(load_e
- 1/E), applied by the optimizer (bigjax/optim.py) to the "gradient" this layer gives the bias,
the load imbalance. The gates (mixing weights) are the unbiased scores of the chosen experts,
renormalised to sum to 1 (softmax with k > 1, or sigmoid) and scaled by `route_scale`.

Dispatch:
- `capacity` (GShard / Switch): each expert takes at most C tokens of a sequence, first
  choices before second choices, earlier tokens before later ones; a token over capacity skips
  that expert and the fraction dropped is reported. One-hot einsums of size L x E x C: plain
  dense algebra that GSPMD shards any way the rules say.
- `dropless`: every assignment through its expert by grouped matmuls, with expert parallelism
  by all-to-all (bigjax/experts.py). Memory grows with k, not E x C.

Auxiliary losses: Switch's balance loss E * sum_e f_e * P_e (f_e: share of assignments to e,
P_e: mean router probability of e; 1.0 when balanced) scaled by `model.moe_aux_weight`, and
the router z-loss mean(logsumexp(logits)^2) (ST-MoE) scaled by `z_weight`; the layer reports
its load (E * max_e f_e: 1 balanced, E collapsed onto one expert; E * min_e f_e: 0 when an
expert is dead) so the metrics show collapse per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax import experts
from bigjax import fp8 as fp8_ops
from bigjax.config.schema import MoEDispatch, MoEGating
from bigjax.context import in_balanced_order, in_row_order
from bigjax.layers import MLP, RESIDUAL, _param, dense_init, project
from bigjax.sharding import CONTEXT_AXIS, Rules, constrain, logical_to_spec, mesh_sizes


@dataclass(frozen=True)
class Routing:
    """How tokens pick and reach their experts (ModelConfig's `moe_*` keys)."""

    num_experts: int
    top_k: int
    capacity_factor: float = 1.25
    dispatch: MoEDispatch = "capacity"
    gating: MoEGating = "softmax"
    shared_experts: int = 0  # always-on experts of the same width: one SwiGLU S x F wide
    route_scale: float = 1.0
    bias_rate: float = 0.0
    z_weight: float = 0.0
    exchange_factor: float = 0.0


class MoE(nnx.Module):
    """E SwiGLU experts [E, D, F, 2] / [E, F, D], a router [D, E] (and its balancing bias
    [E]), and shared experts as one SwiGLU [D, S x F, 2]."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        routing: Routing,
        *,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rules: Rules,
        fp8: bool = False,
    ):
        self.routing, self.dtype, self.rules, self.fp8 = routing, dtype, rules, fp8
        E, D, F = routing.num_experts, d_model, d_ff
        self.router_DE = _param(rngs, dense_init, (D, E), ("embed", None), param_dtype)
        if routing.bias_rate > 0:
            self.router_bias_E = nnx.Param(jnp.zeros((E,), jnp.float32), out_sharding=(None,))
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
        if routing.shared_experts:
            self.shared = MLP(D, routing.shared_experts * F, use_bias=False, rngs=rngs,
                              param_dtype=param_dtype, dtype=dtype, rules=rules,
                              fp8=fp8)  # fmt: skip

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def capacity(self, length: int) -> int:
        """Slots per expert per sequence; capacity_factor 0: every token fits (no drops)."""
        e, factor = self.routing.num_experts, self.routing.capacity_factor
        if factor <= 0:
            return length
        return min(length, max(1, math.ceil(factor * length * self.top_k / e)))

    def __call__(
        self, x_BLD: jax.Array, valid_BL: jax.Array, decode: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (out [B, L, D], auxiliary outputs); `valid_BL` masks padding. The experts'
        matmuls are in fp8 if asked, except in cached decoding (as the MLP's)."""
        r = self.routing
        fp8 = self.fp8 and not decode
        x_BLD = constrain(x_BLD, ("act_batch", "act_seq", "act_embed"), self.rules)
        logits_BLE = project(x_BLD.astype(jnp.float32), self.router_DE[...].astype(jnp.float32), 1)
        probs_BLE = (
            jax.nn.softmax(logits_BLE, axis=-1)
            if r.gating == "softmax"
            else jax.nn.sigmoid(logits_BLE)
        )
        top_p_BLK, top_e_BLK = self._choose(probs_BLE)
        # softmax, k > 1: the chosen experts' weights renormalised to sum to 1 (Mixtral); k = 1
        # keeps the raw probability, else the router would get no gradient (Switch). Sigmoid
        # scores are independent, so they are always renormalised (DeepSeek-V3).
        renorm = r.top_k > 1 or r.gating == "sigmoid"
        weights_BLK = top_p_BLK / jnp.sum(top_p_BLK, -1, keepdims=True) if renorm else top_p_BLK
        if r.route_scale != 1.0:
            weights_BLK = weights_BLK * r.route_scale

        valid_BL = valid_BL.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(valid_BL), 1.0)
        if r.dispatch == "dropless":
            out_BLD, dropped = experts.dropless(
                x_BLD.astype(self.dtype), top_e_BLK, weights_BLK * valid_BL[..., None],
                self.gate_up_EDFC[...].astype(self.dtype), self.down_EFD[...].astype(self.dtype),
                rules=self.rules, exchange_factor=r.exchange_factor, fp8=fp8,
            )  # fmt: skip
            # padding rows are routed too (their weight is 0): their assignments' drops count
            dropped_share = dropped / (x_BLD.shape[0] * x_BLD.shape[1] * r.top_k)
        else:
            out_BLD, dropped_share = self._capacity(x_BLD, top_e_BLK, weights_BLK, valid_BL, n, fp8)
        if r.shared_experts:
            out_BLD = out_BLD + self.shared(x_BLD, decode)

        choice_BLE = jnp.sum(jax.nn.one_hot(top_e_BLK, r.num_experts), axis=2)
        share_E = jnp.sum(choice_BLE * valid_BL[..., None], axis=(0, 1)) / (n * r.top_k)
        mean_prob_E = jnp.sum(probs_BLE * valid_BL[..., None], axis=(0, 1)) / n
        aux = {
            "balance_loss": r.num_experts * jnp.sum(share_E * mean_prob_E),
            "dropped": dropped_share,
            "load_max": r.num_experts * jnp.max(share_E),
            "load_min": r.num_experts * jnp.min(share_E),
        }
        router_loss = self._router_loss(logits_BLE, valid_BL, n, share_E)
        if router_loss is not None:
            aux["router_loss"] = router_loss
        return constrain(out_BLD, RESIDUAL, self.rules), aux

    def _choose(self, probs_BLE: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(scores [B, L, K], experts [B, L, K]) of each token's top k; the balancing bias
        moves the choice, never the scores."""
        if self.routing.bias_rate <= 0:
            return jax.lax.top_k(probs_BLE, self.top_k)
        bias_E = jax.lax.stop_gradient(self.router_bias_E[...])
        _, top_e_BLK = jax.lax.top_k(probs_BLE + bias_E, self.top_k)
        return jnp.take_along_axis(probs_BLE, top_e_BLK, axis=-1), top_e_BLK

    def _router_loss(
        self, logits_BLE: jax.Array, valid_BL: jax.Array, n: jax.Array, share_E: jax.Array
    ) -> jax.Array | None:
        """z-loss, plus the balancing bias's signal: a term worth 0 whose gradient is the
        load imbalance, which the optimizer turns into the bias's sign step."""
        r, terms = self.routing, []
        if r.z_weight > 0:
            z_BL = jax.nn.logsumexp(logits_BLE, axis=-1)
            terms.append(r.z_weight * jnp.sum(jnp.square(z_BL) * valid_BL) / n)
        if r.bias_rate > 0:
            bias_E = self.router_bias_E[...]
            imbalance_E = jax.lax.stop_gradient(share_E - 1.0 / r.num_experts)
            terms.append(jnp.sum((bias_E - jax.lax.stop_gradient(bias_E)) * imbalance_E))
        return sum(terms[1:], terms[0]) if terms else None

    def _capacity(
        self,
        x_BLD: jax.Array,
        top_e_BLK: jax.Array,
        weights_BLK: jax.Array,
        valid_BL: jax.Array,
        n: jax.Array,
        fp8: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Token-choice dispatch with per-sequence capacity, as one-hot einsums (the experts'
        products in fp8 if asked; dispatch and combine, exact selections, never)."""
        b, length, _ = x_BLD.shape
        e, k, c = self.routing.num_experts, self.top_k, self.capacity(length)
        choice_BLKE = jax.nn.one_hot(top_e_BLK, e) * valid_BL[:, :, None, None]
        # Slot of each assignment in its expert: count in priority order (all first choices of
        # the sequence, then all second choices, ...), along the row's order of tokens on any
        # mesh (a context axis holds each sequence load-balanced: bigjax/context.py).
        order_BKLE = in_row_order(choice_BLKE, self.rules).transpose(0, 2, 1, 3)
        slot_BKLE = jnp.cumsum(order_BKLE.reshape(b, k * length, e), axis=1).reshape(
            order_BKLE.shape
        )
        slot_BLKE = in_balanced_order(slot_BKLE.transpose(0, 2, 1, 3), self.rules) - 1.0
        kept_BLKE = choice_BLKE * (slot_BLKE < c)
        slot_BLK = jnp.sum(slot_BLKE * kept_BLKE, axis=-1).astype(jnp.int32)
        # the slots one-hot over c, padded with never-filled slots to a width the context
        # axis divides (so `_slots_split` always splits them: the drops stay the same)
        slot_onehot_BLKC = jax.nn.one_hot(slot_BLK, _split_width(c))
        dispatch_BLEC = jnp.einsum("blke,blkc->blec", kept_BLKE, slot_onehot_BLKC)
        combine_BLEC = jnp.einsum("blke,blkc,blk->blec", kept_BLKE, slot_onehot_BLKC, weights_BLK)

        dt = self.dtype
        product = fp8_ops.einsum if fp8 else jnp.einsum
        x_BECD = jnp.einsum("blec,bld->becd", dispatch_BLEC.astype(dt), x_BLD.astype(dt))
        x_BECD = _slots_split(x_BECD, self.rules)
        h_BECFC = product("becd,edfz->becfz", x_BECD, self.gate_up_EDFC[...].astype(dt))
        h_BECF = jax.nn.silu(h_BECFC[..., 0]) * h_BECFC[..., 1]
        y_BECD = product("becf,efd->becd", h_BECF, self.down_EFD[...].astype(dt))
        out_BLD = jnp.einsum("blec,becd->bld", combine_BLEC.astype(dt), y_BECD)
        return out_BLD, 1.0 - jnp.sum(kept_BLKE) / (n * k)


def _split_width(slots: int) -> int:
    """`slots` rounded up to a multiple of the mesh's context axis (1 outside a mesh)."""
    parts = mesh_sizes().get(CONTEXT_AXIS, 1)
    return -(-slots // parts) * parts


def _slots_split(x_BECD: jax.Array, rules: Rules) -> jax.Array:
    """The experts' inputs with their capacity slots split as the sequence is (over
    `context`): each device then runs the experts on its share of every sequence's slots.
    The slots have no sequence dim, so XLA otherwise ran every expert on every slot on each
    context device and all-reduced the products (measured on a v5p compile at context 4:
    3.3x the temporary memory of FSDP 4). Their count is padded to a multiple of the
    context axis (`_split_width`), so the split always applies. The other dims stay XLA's
    to choose (the experts' own axes, the batch)."""
    sizes = mesh_sizes()
    if not sizes:
        return x_BECD
    slots = logical_to_spec(("act_seq",), rules, sizes, (x_BECD.shape[2],))[0]
    if slots is None:
        return x_BECD
    free = jax.sharding.PartitionSpec.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(
        x_BECD, jax.sharding.PartitionSpec(free, free, slots, free)
    )
