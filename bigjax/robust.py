"""Robustness: adversarial perturbations in embedding space and text corruption, on device.

Adversarial training (Goodfellow et al. 2015; Madry et al. 2018; for text, in embedding
space as Miyato et al. 2017): a perturbation delta of the input embeddings [B, L, D] (token
plus position embeddings, or a ViT's patch embeddings) within an L-infinity ball of radius
`epsilon` that increases the loss: FGSM takes one signed-gradient step of size epsilon; PGD
takes `steps` signed steps of `step_size`, projecting back into the ball after each. The
model then trains on (1 - weight) * clean loss + weight * loss at the perturbed embeddings;
delta carries no gradient into the parameters. The same attack scores a model's robustness at
eval (`eval_adv_loss`).

Text augmentation corrupts the inputs, never the targets: token dropout replaces a share of
real tokens by random ones; span masking replaces spans of `span_length` tokens, starting at a
rate that covers a `span_mask` share on average, by the mask id (the tokenizer's vocab size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bigjax.context import in_balanced_order
from bigjax.sharding import Rules

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Adversary:
    kind: str  # 'fgsm' or 'pgd'
    epsilon: float
    steps: int
    step_size: float
    weight: float  # share of the adversarial loss in the objective


def perturbation(
    loss_of_delta: Callable[[jax.Array], jax.Array], shape: tuple[int, ...], a: Adversary
) -> jax.Array:
    """The attack's delta (no gradient flows through it), with |delta| <= epsilon."""
    delta = jnp.zeros(shape, jnp.float32)
    if a.kind == "fgsm":
        return jax.lax.stop_gradient(a.epsilon * jnp.sign(jax.grad(loss_of_delta)(delta)))

    def pgd_step(_: jax.Array, delta: jax.Array) -> jax.Array:
        step = a.step_size * jnp.sign(jax.grad(loss_of_delta)(delta))
        return jnp.clip(delta + step, -a.epsilon, a.epsilon)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, a.steps, pgd_step, delta))


@dataclasses.dataclass(frozen=True)
class TextNoise:
    token_dropout: float
    span_mask: float
    span_length: int
    mask_id: int
    random_below: int


def corrupt_text(batch: Batch, key: jax.Array, t: TextNoise, rules: Rules = ()) -> Batch:
    """The batch with its inputs corrupted (targets, weights unchanged). `rules`: the run's
    sharding rules; draws and spans are made in the row's order, the same on any mesh
    (`context.in_balanced_order`)."""
    tokens_BL = batch["inputs"]
    real_BL = batch["segment_ids"] > 0
    k_drop, k_random, k_span = jax.random.split(key, 3)
    shape = tokens_BL.shape
    drop_BL = in_balanced_order(jax.random.uniform(k_drop, shape), rules)
    dropped_BL = (drop_BL < t.token_dropout) & real_BL
    random_BL = in_balanced_order(
        jax.random.randint(k_random, shape, 0, t.random_below, tokens_BL.dtype), rules
    )
    out_BL = jnp.where(dropped_BL, random_BL, tokens_BL)
    if t.span_mask > 0:
        starts_BL = jax.random.uniform(k_span, shape) < t.span_mask / t.span_length
        covered_BL = jnp.zeros_like(starts_BL)
        for shift in range(t.span_length):  # a span covers its start and the next length-1
            covered_BL = (
                covered_BL | jnp.pad(starts_BL, ((0, 0), (shift, 0)))[:, : starts_BL.shape[1]]
            )
        out_BL = jnp.where(in_balanced_order(covered_BL, rules) & real_BL, t.mask_id, out_BL)
    return {**batch, "inputs": out_BL}
