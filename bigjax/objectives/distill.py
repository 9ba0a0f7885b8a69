"""Distillation: the task's loss mixed with T^2 * KL(teacher || student) of the next-token
distributions at temperature T. The teacher's parameters are the step's extra input (an
argument of the jitted step, not a constant baked into the program)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import decoder
from bigjax.objectives.base import LossContext, Metrics, Objective, model_inputs


def kl_sum(
    student_BLV: jax.Array, teacher_BLV: jax.Array, weights_BL: jax.Array, temperature: float
) -> jax.Array:
    """Sum over weighted tokens of T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    t = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / temperature, axis=-1)
    kl_BL = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature**2 * jnp.sum(kl_BL * weights_BL)


@dataclasses.dataclass(frozen=True)
class Distill(Objective):
    graphdef: nnx.GraphDef  # the teacher's program
    temperature: float
    alpha: float  # share of the soft (teacher) loss

    def combine(
        self, ctx: LossContext, value: jax.Array, sums: Metrics
    ) -> tuple[jax.Array, Metrics]:
        teacher = decoder(nnx.merge(self.graphdef, ctx.extra))
        teacher_BLV = jax.lax.stop_gradient(teacher(*model_inputs(ctx.batch, None)))
        assert ctx.outputs is not None  # the task's logits: the step passes them to modifiers
        kl = kl_sum(ctx.outputs, teacher_BLV, ctx.batch["weights"], self.temperature)
        soft = kl / ctx.total_weight
        value = (1 - self.alpha) * value + self.alpha * soft
        return value, {**sums, "distill_sum": kl}

    def metrics(self, sums: Metrics, total_weight: jax.Array) -> Metrics:
        # T^2 * KL(teacher || student) per target token
        return {"distill_kl": sums.pop("distill_sum") / total_weight}
