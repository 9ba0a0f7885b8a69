"""The pure train and eval steps, generic over the run's objective (bigjax/objectives/).

`program.py` jits them with explicit shardings. The step knows gradient accumulation, the
optimizer update, the finiteness check and the metrics every run reports; what a task trains
on, how inputs are corrupted, which losses are mixed in and how gradients are taken is the
objective's functions, composed once from the config.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigjax import lora
from bigjax.config import OptimConfig
from bigjax.models import Model
from bigjax.objectives import (
    PER_ROW,
    PER_WEIGHT,
    Batch,
    Inputs,
    Metrics,
    NextToken,
    Objective,
    task_loss,
)
from bigjax.sharding import Rules, constrain
from bigjax.state import TrainState
from bigjax.tree import Params, path_name

__all__ = ["Batch", "Metrics", "make_eval_step", "make_train_step", "next_token"]


def next_token(z_loss: float = 0.0) -> Objective:
    """Plain language modelling: the objective of a run that asks for nothing else."""
    task = NextToken()
    return Objective(task, task_loss(task, z_loss), task.eval_sums)


def _model(graphdef: nnx.GraphDef, params: Params, lora_scale: float) -> Model:
    """The model of `params`, LoRA adapters merged into their weights."""
    return nnx.merge(graphdef, lora.merged(params, lora_scale))


def _split_micro(batch: Batch, num_micro: int, rules: Rules) -> Batch:
    """[B, L] -> [A, B/A, L] taking rows A apart, so every device's shard of the batch feeds
    every micro-batch (a plain reshape would give micro-batch 0 to the first devices only)."""

    def split(x_BL: jax.Array) -> jax.Array:  # also [B] labels and [B, H, W, C] images
        b, *rest = x_BL.shape
        x_ABL = x_BL.reshape(b // num_micro, num_micro, *rest).swapaxes(0, 1)
        names = (None, "act_batch", "act_seq", *(None,) * (x_ABL.ndim - 3))  # images: whole
        return constrain(x_ABL, names[: x_ABL.ndim], rules)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: OptimConfig,
    rules: Rules,
    seed: int,
    dropout: bool,
    objective: Objective | None = None,
    skip_nonfinite: bool = False,
    trainable: Callable[[str], bool] = lambda path: True,
    lora_scale: float = 0.0,
    seq_len: int = 0,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Builds `train_step(state, batch[, extra]) -> (state, metrics)`, a pure function of its
    inputs. `objective` defaults to next_token(cfg.z_loss); `extra` is what a loss needs as an
    input (a distillation teacher's parameters)."""
    base_key = jax.random.key(seed)
    o = next_token(cfg.z_loss) if objective is None else objective
    num_micro = cfg.grad_accum_steps

    def param_loss(params: Params, x: Inputs) -> tuple[jax.Array, Metrics]:
        value, sums, _ = o.loss(_model(graphdef, params, lora_scale), x)
        # auxiliary losses (MoE load balancing) are means per micro-batch: averaged over them
        return value + sums.get("aux_loss", 0.0) / x.aux_divisor, sums

    def train_step(
        state: TrainState, batch: Batch, extra: Params | None = None
    ) -> tuple[TrainState, Metrics]:
        step_key = jax.random.fold_in(base_key, state.step)
        for corrupt in o.corrupt:  # per-step corruption: MLM masks, text noise
            batch = corrupt(batch, step_key, True)
        total_weight = o.task.weight(batch)

        def accumulate(carry: tuple, micro_and_index: tuple) -> tuple[tuple, None]:
            grads, sums = carry
            micro, index = micro_and_index
            m_grads, m_sums = micro_grads(micro, jax.random.fold_in(step_key, index))
            return (
                jax.tree.map(jnp.add, grads, m_grads),
                jax.tree.map(jnp.add, sums, m_sums),
            ), None

        def micro_grads(micro: Batch, rng: jax.Array) -> tuple[Params, Metrics]:
            x = Inputs(micro, rng if dropout else None, total_weight, extra, None, num_micro)
            return o.grads.micro(param_loss, state.params, x)

        micros = (_split_micro(batch, num_micro, rules), jnp.arange(num_micro))
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first_micro = jax.tree.map(lambda x: x[0], micros[0])
        sums_shape = jax.eval_shape(lambda: micro_grads(first_micro, step_key)[1])
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micros)
        rows = jax.tree.leaves(batch)[0].shape[0]
        grads = o.grads.finish(grads, step_key, rows)  # DP-SGD's noise
        added = _reported(sums, total_weight, rows, num_micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # of the trainable gradients only: a frozen one is never computed (XLA drops it)
        grad_norm = optax.tree.norm(
            jax.tree_util.tree_map_with_path(
                lambda p, g: g if trainable(path_name(p)) else jnp.zeros(()), grads
            )
        )
        # Checked on device and reported with the metrics (read a step later): no host sync.
        # The updated parameters too: finite gradients can still overflow them (a huge lr).
        param_norm = optax.tree.norm(params)
        finite = jnp.isfinite(sums["nll_sum"]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        if skip_nonfinite:  # drop the update, keep the old parameters and moments
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {
            "loss": sums["nll_sum"] / total_weight,
            "z_loss": sums["z_sq_sum"] / total_weight,
            "grad_norm": grad_norm,
            "finite": finite,
            "param_norm": param_norm,  # of the update's result, also when it was skipped
            "lr": schedule(state.step),
            "tokens": o.task.tokens(batch, seq_len),
            **added,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _reported(sums: Metrics, total_weight: jax.Array, rows: int, num_micro: int) -> Metrics:
    """The metrics of the sums beyond the task's loss, by their names (objectives/base.py)."""
    out = {}
    for k, v in sums.items():
        if k.startswith(PER_WEIGHT):
            out[k.removeprefix(PER_WEIGHT)] = v / total_weight
        elif k.startswith(PER_ROW):
            out[k.removeprefix(PER_ROW)] = v / rows
        elif k not in ("nll_sum", "z_sq_sum"):
            out[k] = v / num_micro  # the model's per-micro-batch means (MoE)
    return out


def make_eval_step(
    graphdef: nnx.GraphDef, lora_scale: float = 0.0, objective: Objective | None = None
) -> Callable[[Params, Batch], Metrics]:
    """Builds `eval_step(params, batch) -> {'nll_sum', 'weight_sum', ...}` (no dropout, no
    text noise; MLM's mask fixed, so every eval is comparable)."""
    o = next_token() if objective is None else objective

    def eval_step(params: Params, batch: Batch) -> Metrics:
        for corrupt in o.corrupt:
            batch = corrupt(batch, jax.random.key(0), False)
        return o.eval(_model(graphdef, params, lora_scale), batch)

    return eval_step
