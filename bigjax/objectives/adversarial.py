"""Adversarial training (and evaluation) in embedding space: the task's loss at an FGSM or PGD
perturbation of the input embeddings, |delta| <= epsilon, mixed into the objective (training)
or reported beside the clean loss (eval attack)."""

from __future__ import annotations

import dataclasses

import jax

from bigjax import robust
from bigjax.models import Model
from bigjax.objectives.base import Batch, LossContext, Metrics, Objective


def _embed_shape(batch: Batch, seq_len: int, d_model: int) -> tuple[int, int, int]:
    """[B, L, D] of the input embeddings (a ViT's L is its patches plus the class token)."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    length = seq_len if "images" in batch else batch["inputs"].shape[1]
    return rows, length, d_model


def adversarial_sums(
    task: Objective,
    model: Model,
    batch: Batch,
    rng: jax.Array | None,
    adversary: robust.Adversary,
    seq_len: int,
    d_model: int,
) -> Metrics:
    """The task's loss sums at the attack's perturbation of the input embeddings."""

    def loss_of(delta: jax.Array) -> jax.Array:
        sums, _ = task.loss_sums(model, batch, rng, delta)
        return sums["nll_sum"] / task.weight(batch)

    delta = robust.perturbation(loss_of, _embed_shape(batch, seq_len, d_model), adversary)
    return task.loss_sums(model, batch, rng, delta)[0]


@dataclasses.dataclass(frozen=True)
class Adversarial(Objective):
    """Training: (1 - weight) * objective + weight * loss at the perturbation."""

    adversary: robust.Adversary
    seq_len: int
    d_model: int

    def combine(
        self, ctx: LossContext, value: jax.Array, sums: Metrics
    ) -> tuple[jax.Array, Metrics]:
        adv = adversarial_sums(
            ctx.task, ctx.model, ctx.batch, ctx.rng, self.adversary, self.seq_len, self.d_model
        )
        w = self.adversary.weight
        value = (1 - w) * value + w * (adv["nll_sum"] / ctx.total_weight)
        return value, {**sums, "adv_nll_sum": adv["nll_sum"]}

    def metrics(self, sums: Metrics, total_weight: jax.Array) -> Metrics:
        return {"adv_loss": sums.pop("adv_nll_sum") / total_weight}


@dataclasses.dataclass(frozen=True)
class EvalAttack(Objective):
    """Eval: the held-out loss under the attack, as 'adv_nll_sum'."""

    task: Objective
    adversary: robust.Adversary
    seq_len: int
    d_model: int

    def eval_sums(self, model: Model, batch: Batch, out: Metrics) -> Metrics:
        adv = adversarial_sums(self.task, model, batch, None, self.adversary, self.seq_len,
                               self.d_model)  # fmt: skip
        return {**out, "adv_nll_sum": adv["nll_sum"]}
