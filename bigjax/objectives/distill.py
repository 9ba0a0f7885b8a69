"""Distillation: the wrapped loss mixed with T^2 * KL(teacher || student) of the next-token
distributions at temperature T. The teacher's parameters are the step's extra input (an
argument of the jitted step, not a constant baked into the program)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import Model, decoder
from bigjax.objectives.base import (
    PER_WEIGHT,
    Inputs,
    LossFn,
    Metrics,
    Modifier,
    Setup,
    model_inputs,
)


def kl_sum(
    student_BLV: jax.Array, teacher_BLV: jax.Array, weights_BL: jax.Array, temperature: float
) -> jax.Array:
    """Sum over weighted tokens of T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    t = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / temperature, axis=-1)
    kl_BL = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature**2 * jnp.sum(kl_BL * weights_BL)


def distill_for(setup: Setup) -> Modifier | None:
    teacher, d = setup.resources.teacher, setup.cfg.distill
    return None if teacher is None else distill(teacher.graphdef, d.temperature, d.alpha)


def distill(teacher: nnx.GraphDef, temperature: float, alpha: float) -> Modifier:
    """(1 - alpha) * loss + alpha * the soft loss, both per total weight."""

    def wrap(inner: LossFn) -> LossFn:
        def loss(model: Model, x: Inputs) -> tuple[jax.Array, Metrics, jax.Array]:
            value, sums, logits_BLV = inner(model, x)
            t_model = decoder(nnx.merge(teacher, x.extra))
            teacher_BLV = jax.lax.stop_gradient(t_model(*model_inputs(x.batch, None)))
            kl = kl_sum(logits_BLV, teacher_BLV, x.batch["weights"], temperature)
            value = (1 - alpha) * value + alpha * (kl / x.total_weight)
            # T^2 * KL(teacher || student) per target token
            return value, {**sums, f"{PER_WEIGHT}distill_kl": kl}, logits_BLV

        return loss

    return wrap
