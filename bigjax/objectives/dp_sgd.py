"""DP-SGD, a gradient rule over whatever loss it is given: every row's gradient of its own
mean loss (the loss with the row's own weight as its denominator) clipped to `clip_norm`,
summed, and the sum noised with N(0, (noise_multiplier * clip_norm)^2) before the mean
(bigjax/privacy.py has the clipping, the noise and the accountant). Distillation and
adversarial training compose with it: their losses are per row like any other."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bigjax import privacy
from bigjax.objectives.base import (
    PER_ROW,
    PER_WEIGHT,
    Batch,
    GradRule,
    Inputs,
    Metrics,
    ParamLoss,
    Params,
    Setup,
    frozen_zeroed,
)

DP_STREAM = 0x4450  # a key stream of its own for the noise
CLIPPED = f"{PER_ROW}dp_clipped"  # the share of rows whose gradient norm was cut


def dp_sgd_for(setup: Setup) -> GradRule | None:
    accounting, cfg = setup.resources.accounting, setup.cfg
    if accounting is None:
        return None
    zero_frozen = frozen_zeroed(setup.trainable)
    return dp_sgd(accounting.noise_multiplier, cfg.privacy.clip_norm, setup.task.weight,
                  zero_frozen, cfg.model.dropout > 0)  # fmt: skip


def dp_sgd(
    noise_multiplier: float,
    clip_norm: float,
    weight_of: Callable[[Batch], jax.Array],
    trainable: Callable[[Params], Params],
    dropout: bool,
) -> GradRule:
    """`weight_of`: the task's denominator; `trainable` zeroes frozen parameters' gradients."""

    def row_grad(objective: ParamLoss, params: Params, x: Inputs) -> tuple[Params, Metrics]:
        """One row's gradient of its own mean loss, clipped."""
        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params, x)
        clipped, norm = privacy.clip(trainable(grads), clip_norm)
        return clipped, {**sums, CLIPPED: (norm > clip_norm).astype(jnp.float32)}

    def micro(objective: ParamLoss, params: Params, x: Inputs) -> tuple[Params, Metrics]:
        rows = jax.tree.leaves(x.batch)[0].shape[0]
        keys = (
            jax.random.split(x.rng, rows) if dropout and x.rng is not None else jnp.zeros((rows,))
        )

        def one(row: Batch, key: jax.Array) -> tuple[Params, Metrics]:
            row = jax.tree.map(lambda v: v[None], row)
            rng = key if dropout else None
            row_x = dataclasses.replace(x, batch=row, rng=rng, total_weight=weight_of(row),
                                        aux_divisor=1)  # fmt: skip
            return row_grad(objective, params, row_x)

        grads, sums = jax.vmap(one)(x.batch, keys)
        # per-row sums add up to the micro-batch's (the model's means: averaged over rows)
        summed = ("nll_sum", "z_sq_sum", PER_WEIGHT, PER_ROW)
        sums = {k: jnp.sum(v) if k.startswith(summed) else jnp.mean(v) for k, v in sums.items()}
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads), sums

    def finish(grads: Params, key: jax.Array, rows: int) -> Params:
        """Gaussian noise on the sum of clipped gradients, then the mean over rows."""
        std = noise_multiplier * clip_norm
        noise_tree = privacy.noise_like(grads, jax.random.fold_in(key, DP_STREAM), std)
        return jax.tree.map(lambda g, n: (g + n) / rows, grads, trainable(noise_tree))

    return GradRule(micro, finish)
