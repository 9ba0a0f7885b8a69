"""DP-SGD: every row's gradient of its own mean loss clipped to `clip_norm`, summed, and the
sum noised with N(0, (noise_multiplier * clip_norm)^2) before the mean (bigjax/privacy.py has
the clipping, the noise and the accountant)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bigjax import privacy
from bigjax.models import Model
from bigjax.objectives.base import Batch, Metrics, Objective, Params

DP_STREAM = 0x4450  # a key stream of its own for the noise


@dataclasses.dataclass(frozen=True)
class DPSGD(Objective):
    noise: privacy.Noise
    task: Objective
    model_of: Callable[[Params], Model]
    z_loss: float
    dropout: bool
    trainable: Callable[[Params], Params]  # zeroes the gradients of frozen parameters

    def _row_grad(
        self, params: Params, row: Batch, rng: jax.Array | None
    ) -> tuple[Params, Metrics]:
        """One row's gradient of its own mean loss, clipped."""
        one = jax.tree.map(lambda x: x[None], row)

        def objective(p: Params) -> tuple[jax.Array, Metrics]:
            sums, _ = self.task.loss_sums(self.model_of(p), one, rng)
            value = (sums["nll_sum"] + self.z_loss * sums["z_sq_sum"]) / self.task.weight(one)
            return value + sums.get("aux_loss", 0.0), sums

        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
        clipped, norm = privacy.clip(self.trainable(grads), self.noise.clip_norm)
        return clipped, {**sums, "dp_clipped": (norm > self.noise.clip_norm).astype(jnp.float32)}

    def micro_grads(
        self, loss_fn: Callable[..., Any], params: Params, micro: Batch, rng: jax.Array | None
    ) -> tuple[Params, Metrics]:
        rows = jax.tree.leaves(micro)[0].shape[0]
        keys = (
            jax.random.split(rng, rows) if self.dropout and rng is not None else jnp.zeros((rows,))
        )
        grads, sums = jax.vmap(
            lambda row, key: self._row_grad(params, row, key if self.dropout else None)
        )(micro, keys)
        # per-row sums add up to the micro-batch's (aux means: averaged over rows)
        sums = {k: jnp.mean(v) if k.startswith(("moe_", "aux")) else jnp.sum(v)
                for k, v in sums.items()}  # fmt: skip
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads), sums

    def finalize_grads(self, grads: Params, sums: Metrics, batch: Batch, key: jax.Array) -> Params:
        """Gaussian noise on the sum of clipped gradients, then the mean over rows."""
        rows = jax.tree.leaves(batch)[0].shape[0]
        std = self.noise.noise_multiplier * self.noise.clip_norm
        noise = privacy.noise_like(grads, jax.random.fold_in(key, DP_STREAM), std)
        sums["dp_clipped"] = sums["dp_clipped"] / rows  # the share of rows whose norm was cut
        return jax.tree.map(lambda g, n: (g + n) / rows, grads, self.trainable(noise))

    def metrics(self, sums: Metrics, total_weight: jax.Array) -> Metrics:
        return {"dp_clipped": sums.pop("dp_clipped")}
