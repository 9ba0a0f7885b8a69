"""The pure train and eval steps. `train.py` jits them with explicit shardings."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigjax.config import OptimConfig
from bigjax.loss import cross_entropy_sums
from bigjax.sharding import Rules, constrain
from bigjax.state import Params, TrainState

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions, weights: all [B, L]
Metrics = dict[str, jax.Array]


def _forward(
    graphdef: nnx.GraphDef,
    params: Params,
    batch: Batch,
    rng: jax.Array | None,
    with_aux: bool = False,
) -> jax.Array | tuple[jax.Array, Metrics]:
    model = nnx.merge(graphdef, params)
    inputs = (batch["inputs"], batch["segment_ids"], batch["positions"], rng)
    return model(*inputs, with_aux=with_aux) if with_aux else model(*inputs)


def _split_micro(batch: Batch, num_micro: int, rules: Rules) -> Batch:
    """[B, L] -> [A, B/A, L] taking rows A apart, so every device's shard of the batch feeds
    every micro-batch (a plain reshape would give micro-batch 0 to the first devices only)."""

    def split(x_BL: jax.Array) -> jax.Array:
        b, length = x_BL.shape
        x_ABL = x_BL.reshape(b // num_micro, num_micro, length).swapaxes(0, 1)
        return constrain(x_ABL, (None, "act_batch", "act_seq"), rules)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: OptimConfig,
    rules: Rules,
    seed: int,
    dropout: bool,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds `train_step(state, batch) -> (state, metrics)`, a pure function of its inputs."""
    base_key = jax.random.key(seed)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        step_key = jax.random.fold_in(base_key, state.step)
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

        num_micro = cfg.grad_accum_steps

        def loss_fn(params: Params, micro: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
            logits_BLV, aux = _forward(graphdef, params, micro, rng if dropout else None, True)
            nll_sum, z_sq_sum = cross_entropy_sums(logits_BLV, micro["targets"], micro["weights"])
            objective = (nll_sum + cfg.z_loss * z_sq_sum) / total_weight
            # auxiliary losses (MoE load balancing) are means per micro-batch: average them
            objective += aux.get("aux_loss", 0.0) / num_micro
            return objective, {"nll_sum": nll_sum, "z_sq_sum": z_sq_sum, **aux}

        def accumulate(carry: tuple, micro_and_index: tuple) -> tuple[tuple, None]:
            grads, sums = carry
            micro, index = micro_and_index
            rng = jax.random.fold_in(step_key, index)
            (_, m_sums), m_grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, micro, rng
            )
            return (
                jax.tree.map(jnp.add, grads, m_grads),
                jax.tree.map(jnp.add, sums, m_sums),
            ), None

        micros = (_split_micro(batch, num_micro, rules), jnp.arange(num_micro))
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first_micro = jax.tree.map(lambda x: x[0], micros[0])
        sums_shape = jax.eval_shape(lambda: loss_fn(state.params, first_micro, step_key)[1])
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micros)
        nll_sum, z_sq_sum = sums.pop("nll_sum"), sums.pop("z_sq_sum")
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # Checked on device and reported with the metrics (read a step later): no host sync.
        finite = jnp.isfinite(nll_sum) & jnp.isfinite(grad_norm)
        if skip_nonfinite:  # drop the update, keep the old parameters and moments
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {
            "loss": nll_sum / total_weight,
            "z_loss": z_sq_sum / total_weight,
            "grad_norm": grad_norm,
            "finite": finite,
            "param_norm": optax.tree.norm(params),
            "lr": schedule(state.step),
            "tokens": jnp.sum(batch["weights"]),
            **{k: v / num_micro for k, v in sums.items()},  # per-micro-batch means (MoE)
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Params, Batch], Metrics]:
    """Builds `eval_step(params, batch) -> {'nll_sum', 'weight_sum'}` (no dropout)."""

    def eval_step(params: Params, batch: Batch) -> Metrics:
        logits_BLV = _forward(graphdef, params, batch, None)
        nll_sum, _ = cross_entropy_sums(logits_BLV, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "weight_sum": jnp.sum(batch["weights"])}

    return eval_step
