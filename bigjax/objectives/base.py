"""What a run's objective is made of: plain functions, composed by wrapping.

  task      the loss a task sums over a batch (next token, classify, images): a `Task`
  LossFn    (model, Inputs) -> (value, sums, logits): the task's loss as the step
            minimises it, and every modifier's `LossFn -> LossFn` (distillation,
            adversarial training) wraps whatever loss it is given
  Corrupt   a batch transform run every step before the loss (MLM masks, text noise)
  GradRule  how a micro-batch's gradient is taken and the summed gradient finished: the plain
            one, or DP-SGD's per-row clipping and noise, over whatever loss it is given
  EvalFn    (model, batch) -> sums of held-out losses, wrapped by an eval attack

A sum's name says how the step reports it: "per_weight:NAME" becomes the metric NAME divided
by the batch's total weight, "per_row:NAME" divided by its rows; `nll_sum` and `z_sq_sum` are
the task's loss; any other (the model's MoE outputs) is a per-micro-batch mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from bigjax.config import TrainConfig
from bigjax.models import Model
from bigjax.resources import Resources

Batch = dict[str, jax.Array]  # the task's fields (bigjax/tasks.py)
Metrics = dict[str, jax.Array]
Params = Any  # a pytree of arrays (nnx.State or its pure dict); its structure is the model's
PER_WEIGHT, PER_ROW = "per_weight:", "per_row:"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What one evaluation of a loss sees."""

    batch: Batch
    rng: jax.Array | None  # dropout key, None without dropout
    total_weight: jax.Array  # the denominator: the global batch's (tokens, or rows)
    extra: Params | None = None  # the step's extra input (a teacher's parameters)
    embed_delta: jax.Array | None = None  # a perturbation of the input embeddings
    aux_divisor: int = 1  # micro-batches the model's auxiliary (mean) losses are spread over


LossFn = Callable[[Model, Inputs], tuple[jax.Array, Metrics, jax.Array]]
Modifier = Callable[[LossFn], LossFn]
Corrupt = Callable[[Batch, jax.Array, bool], Batch]  # (batch, key, train) -> batch
EvalFn = Callable[[Model, Batch], Metrics]
# (params, inputs) -> (value, sums): the loss of the parameters, what a GradRule differentiates
ParamLoss = Callable[[Params, Inputs], tuple[jax.Array, Metrics]]


class Task(Protocol):
    """A task's loss over a batch of its fields."""

    def sums(
        self, model: Model, batch: Batch, rng: jax.Array | None, embed_delta: jax.Array | None
    ) -> tuple[Metrics, jax.Array]:
        """Summed losses ({'nll_sum', 'z_sq_sum', ...}) and the logits."""
        ...

    def weight(self, batch: Batch) -> jax.Array:
        """What the summed losses are divided by."""
        ...

    def tokens(self, batch: Batch, seq_len: int) -> jax.Array:
        """Tokens trained on, for throughput."""
        ...

    def eval_sums(self, model: Model, batch: Batch) -> Metrics:
        """Held-out sums: {'nll_sum', 'weight_sum', ...}."""
        ...


def task_loss(task: Task, z_loss: float) -> LossFn:
    """The task's loss per total weight, with z-loss: what every modifier wraps."""

    def loss(model: Model, x: Inputs) -> tuple[jax.Array, Metrics, jax.Array]:
        sums, logits = task.sums(model, x.batch, x.rng, x.embed_delta)
        return (sums["nll_sum"] + z_loss * sums["z_sq_sum"]) / x.total_weight, sums, logits

    return loss


@dataclasses.dataclass(frozen=True)
class GradRule:
    """A micro-batch's (gradient, sums), and the summed gradient's finish before the update
    (its `key` is the step's, `rows` the global batch's)."""

    micro: Callable[[ParamLoss, Params, Inputs], tuple[Params, Metrics]]
    finish: Callable[[Params, jax.Array, int], Params]


def _value_and_grad(objective: ParamLoss, params: Params, x: Inputs) -> tuple[Params, Metrics]:
    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params, x)
    return grads, sums


PLAIN = GradRule(_value_and_grad, lambda grads, key, rows: grads)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A run's objective, composed once from the config (`objectives.build`)."""

    task: Task
    loss: LossFn  # task_loss(task), wrapped by the modifiers
    eval: EvalFn  # task.eval_sums, or wrapped by an eval attack
    corrupt: tuple[Corrupt, ...] = ()  # in order, every train and eval step
    grads: GradRule = PLAIN


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a piece of an objective is chosen from: the config, the run's resources, the
    task's loss and which parameters train."""

    cfg: TrainConfig
    resources: Resources
    task: Task
    trainable: Callable[[str], bool]


def frozen_zeroed(trainable: Callable[[str], bool]) -> Callable[[Params], Params]:
    """A gradient tree with the entries of frozen parameters zeroed (by parameter path)."""
    from bigjax.tree import path_name

    def mask(grads: Params) -> Params:
        return jax.tree_util.tree_map_with_path(
            lambda p, g: g if trainable(path_name(p)) else jnp.zeros_like(g), grads
        )

    return mask


def model_inputs(
    batch: Batch, rng: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """The model's positional inputs for a token batch."""
    return batch["inputs"], batch["segment_ids"], batch["positions"], rng
