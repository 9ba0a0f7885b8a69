"""The pure train and eval steps, generic over the run's objectives (bigjax/objectives/).

`program.py` jits them with explicit shardings. The step knows gradient accumulation, the
optimizer update, the finiteness check and the metrics every run reports; what a task trains
on, how inputs are corrupted, how gradients are privatised and which losses are mixed in is
each objective's hook, called in the order of the `objectives` tuple.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigjax import lora
from bigjax.config import OptimConfig
from bigjax.objectives.base import Batch, LossContext, Metrics, Objective
from bigjax.objectives.next_token import NextToken
from bigjax.sharding import Rules, constrain
from bigjax.state import Params, TrainState
from bigjax.tree import path_name

__all__ = ["Batch", "Metrics", "make_eval_step", "make_train_step"]


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
    objectives: Sequence[Objective] = (NextToken(),),
    skip_nonfinite: bool = False,
    trainable: Callable[[str], bool] = lambda path: True,
    lora_scale: float = 0.0,
    seq_len: int = 0,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Builds `train_step(state, batch[, extra]) -> (state, metrics)`, a pure function of its
    inputs. `objectives[0]` is the task; `extra` is what an objective needs as an input (a
    distillation teacher's parameters)."""
    base_key = jax.random.key(seed)
    task = objectives[0]
    grad_rules = [o for o in objectives if type(o).micro_grads is not Objective.micro_grads]

    def train_step(
        state: TrainState, batch: Batch, extra: Params | None = None
    ) -> tuple[TrainState, Metrics]:
        step_key = jax.random.fold_in(base_key, state.step)
        for o in objectives:  # per-step corruption: MLM masks, text noise
            batch = o.corrupt(batch, step_key, train=True)
        total_weight = task.weight(batch)
        num_micro = cfg.grad_accum_steps

        def loss_fn(params: Params, micro: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
            model = nnx.merge(graphdef, lora.merged(params, lora_scale))
            dropout_rng = rng if dropout else None
            sums, outputs = task.loss_sums(model, micro, dropout_rng)
            value = (sums["nll_sum"] + cfg.z_loss * sums["z_sq_sum"]) / total_weight
            ctx = LossContext(model, micro, dropout_rng, task, total_weight, extra, outputs)
            for o in objectives:  # mixed-in losses: distillation, adversarial
                value, sums = o.combine(ctx, value, sums)
            # auxiliary losses (MoE load balancing) are means per micro-batch: average them
            return value + sums.get("aux_loss", 0.0) / num_micro, sums

        def micro_grads(micro: Batch, rng: jax.Array) -> tuple[Params, Metrics]:
            for rule in grad_rules:  # DP-SGD's per-row clipping
                if (own := rule.micro_grads(loss_fn, state.params, micro, rng)) is not None:
                    return own
            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, micro, rng)
            return grads, sums

        def accumulate(carry: tuple, micro_and_index: tuple) -> tuple[tuple, None]:
            grads, sums = carry
            micro, index = micro_and_index
            m_grads, m_sums = micro_grads(micro, jax.random.fold_in(step_key, index))
            return (
                jax.tree.map(jnp.add, grads, m_grads),
                jax.tree.map(jnp.add, sums, m_sums),
            ), None

        micros = (_split_micro(batch, num_micro, rules), jnp.arange(num_micro))
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first_micro = jax.tree.map(lambda x: x[0], micros[0])
        sums_shape = jax.eval_shape(lambda: micro_grads(first_micro, step_key)[1])
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micros)
        for o in objectives:  # DP-SGD's noise
            grads = o.finalize_grads(grads, sums, batch, step_key)
        nll_sum, z_sq_sum = sums.pop("nll_sum"), sums.pop("z_sq_sum")
        added = {k: v for o in objectives for k, v in o.metrics(sums, total_weight).items()}
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
        finite = jnp.isfinite(nll_sum) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        if skip_nonfinite:  # drop the update, keep the old parameters and moments
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {
            "loss": nll_sum / total_weight,
            "z_loss": z_sq_sum / total_weight,
            "grad_norm": grad_norm,
            "finite": finite,
            "param_norm": param_norm,  # of the update's result, also when it was skipped
            "lr": schedule(state.step),
            "tokens": task.tokens(batch, seq_len),
            **{k: v / num_micro for k, v in sums.items()},  # per-micro-batch means (MoE)
            **added,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    lora_scale: float = 0.0,
    objectives: Sequence[Objective] = (NextToken(),),
) -> Callable[[Params, Batch], Metrics]:
    """Builds `eval_step(params, batch) -> {'nll_sum', 'weight_sum', ...}` (no dropout, no
    text noise; MLM's mask fixed, so every eval is comparable)."""

    def eval_step(params: Params, batch: Batch) -> Metrics:
        for o in objectives:
            batch = o.corrupt(batch, jax.random.key(0), train=False)
        model = nnx.merge(graphdef, lora.merged(params, lora_scale))
        out: Metrics = {}
        for o in objectives:  # the task's sums, then additions (an eval attack's)
            out = o.eval_sums(model, batch, out)
        return out

    return eval_step
