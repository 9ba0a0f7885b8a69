"""The one interface every research objective implements, and the generic pieces they share.

A run's objectives are a tuple: first the task (what the batch holds and the loss it sums),
then any modifiers (text noise, DP-SGD, distillation, adversarial training). The train and
eval steps fold over the tuple, calling each hook in order; every hook has a neutral default,
so an objective overrides only what it changes. A new objective is one module with one class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bigjax.models import Model

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions, weights: all [B, L]
Metrics = dict[str, jax.Array]
Params = Any  # a pytree of arrays (nnx.State or its pure dict); its structure is the model's


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a loss hook sees for one micro-batch."""

    model: Model
    batch: Batch
    rng: jax.Array | None  # dropout key, None without dropout
    task: Objective  # the run's task: modifiers re-run its loss (adversarial)
    total_weight: jax.Array  # the global batch's denominator (tokens, or rows)
    extra: Params | None  # the step's extra input (a teacher's parameters), or None
    outputs: jax.Array | None = None  # the task's logits on this micro-batch


class Objective:
    """Hooks of the train and eval steps, in the order they run."""

    def corrupt(self, batch: Batch, key: jax.Array, train: bool) -> Batch:
        """Per-step corruption of the inputs (a fresh key every train step)."""
        return batch

    def loss_sums(
        self,
        model: Model,
        batch: Batch,
        rng: jax.Array | None,
        embed_delta: jax.Array | None = None,
    ) -> tuple[Metrics, jax.Array | None]:
        """The task's summed losses ({'nll_sum', 'z_sq_sum', ...}) and its logits."""
        raise NotImplementedError(f"{type(self).__name__} is not a task")

    def weight(self, batch: Batch) -> jax.Array:
        """What the summed losses are divided by (the task's)."""
        return jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def tokens(self, batch: Batch, seq_len: int) -> jax.Array:
        """Tokens trained on, for throughput (the task's)."""
        return jnp.sum(batch["weights"])

    def combine(
        self, ctx: LossContext, value: jax.Array, sums: Metrics
    ) -> tuple[jax.Array, Metrics]:
        """The objective value after this modifier (and its sums to report)."""
        return value, sums

    def micro_grads(
        self, loss_fn: Callable, params: Params, micro: Batch, rng: jax.Array | None
    ) -> tuple[Params, Metrics] | None:
        """A gradient rule of its own (DP-SGD's per-row clipping), or None for the usual."""
        return None

    def finalize_grads(self, grads: Params, sums: Metrics, batch: Batch, key: jax.Array) -> Params:
        """The accumulated gradient after this modifier (DP-SGD's noise)."""
        return grads

    def metrics(self, sums: Metrics, total_weight: jax.Array) -> Metrics:
        """Metrics from the sums this objective added (it pops them)."""
        return {}

    def eval_sums(self, model: Model, batch: Batch, out: Metrics) -> Metrics:
        """Held-out sums (the task's), or additions to them (an eval attack's)."""
        return out


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
