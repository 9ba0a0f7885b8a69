"""Adversarial training (and evaluation) in embedding space: the loss at an FGSM or PGD
perturbation of the input embeddings, |delta| <= epsilon, mixed into the objective (training)
or reported beside the clean loss (eval attack). The attack maximises the wrapped loss's
`nll_sum`: the task's, whatever else the loss mixes in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from bigjax import robust
from bigjax.models import Model
from bigjax.objectives.base import (
    PER_WEIGHT,
    Batch,
    EvalFn,
    Inputs,
    LossFn,
    Metrics,
    Modifier,
    Setup,
)


def _embed_shape(batch: Batch, seq_len: int, d_model: int) -> tuple[int, int, int]:
    """[B, L, D] of the input embeddings (a ViT's L is its patches plus the class token)."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    length = seq_len if "images" in batch else batch["inputs"].shape[1]
    return rows, length, d_model


@dataclasses.dataclass(frozen=True)
class Attack:
    adversary: robust.Adversary
    seq_len: int
    d_model: int
    weight_of: Callable[[Batch], jax.Array]  # the task's denominator (`Task.weight`)

    def nll_sum(self, loss: LossFn, model: Model, x: Inputs) -> jax.Array:
        """`loss`'s nll_sum at the attack's perturbation of x's input embeddings."""

        def loss_of(delta: jax.Array) -> jax.Array:
            _, sums, _ = loss(model, dataclasses.replace(x, embed_delta=delta))
            return sums["nll_sum"] / self.weight_of(x.batch)

        shape = _embed_shape(x.batch, self.seq_len, self.d_model)
        delta = robust.perturbation(loss_of, shape, self.adversary)
        return loss(model, dataclasses.replace(x, embed_delta=delta))[1]["nll_sum"]


def attack_for(setup: Setup, kind: str) -> Attack | None:
    """The attack robust.adversarial (training) or robust.eval_attack names, if any."""
    cfg, r = setup.cfg, setup.cfg.robust
    if kind == "none":
        return None
    adversary = robust.Adversary(kind, r.epsilon, r.pgd_steps, r.pgd_step_size, r.weight)
    return Attack(adversary, cfg.data.seq_len, cfg.model.d_model, setup.task.weight)


def adversarial_for(setup: Setup) -> Modifier | None:
    attack = attack_for(setup, setup.cfg.robust.adversarial)
    return None if attack is None else adversarial(attack)


def eval_attack_for(setup: Setup, clean: LossFn) -> Callable[[EvalFn], EvalFn] | None:
    attack = attack_for(setup, setup.cfg.robust.eval_attack)
    return None if attack is None else eval_attack(attack, clean)


def adversarial(attack: Attack) -> Modifier:
    """Training: (1 - weight) * loss + weight * nll at the perturbation, per total weight."""

    def wrap(inner: LossFn) -> LossFn:
        def loss(model: Model, x: Inputs) -> tuple[jax.Array, Metrics, jax.Array]:
            value, sums, logits = inner(model, x)
            adv = attack.nll_sum(inner, model, x)
            w = attack.adversary.weight
            value = (1 - w) * value + w * (adv / x.total_weight)
            return value, {**sums, f"{PER_WEIGHT}adv_loss": adv}, logits

        return loss

    return wrap


def eval_attack(attack: Attack, clean: LossFn) -> Callable[[EvalFn], EvalFn]:
    """Eval: the held-out sums plus the nll under the attack, as 'adv_nll_sum'."""

    def wrap(inner: EvalFn) -> EvalFn:
        def sums(model: Model, batch: Batch) -> Metrics:
            x = Inputs(batch, None, attack.weight_of(batch))
            return {**inner(model, batch), "adv_nll_sum": attack.nll_sum(clean, model, x)}

        return sums

    return wrap
