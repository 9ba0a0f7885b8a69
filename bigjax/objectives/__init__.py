"""A run's objective, composed from the config by `build`: the task's loss (bigjax/tasks.py
names it), the batch corruptions, the loss modifiers wrapped around it in order (distillation,
adversarial training), the gradient rule (plain or DP-SGD) and the eval (with an attack).

Each piece is a plain function in its own module; the train and eval steps (bigjax/step.py)
call the composed functions and have no branch on any of them. A new loss modifier is a
`LossFn -> LossFn` function in a module here and one line in `build`.
"""

from __future__ import annotations

from collections.abc import Callable

from bigjax import mlm, privacy, robust
from bigjax.config import TrainConfig
from bigjax.objectives.adversarial import Attack, adversarial, eval_attack
from bigjax.objectives.base import (
    PER_ROW,
    PER_WEIGHT,
    PLAIN,
    Batch,
    Corrupt,
    EvalFn,
    GradRule,
    Inputs,
    LossFn,
    Metrics,
    Modifier,
    Objective,
    Task,
    frozen_zeroed,
    task_loss,
)
from bigjax.objectives.classify import Classify, Images
from bigjax.objectives.distill import distill
from bigjax.objectives.dp_sgd import dp_sgd
from bigjax.objectives.next_token import NextToken, masking
from bigjax.objectives.text_noise import text_noise
from bigjax.resources import Resources
from bigjax.tasks import task_of

LOSSES: dict[str, Task] = {"next_token": NextToken(), "classify": Classify(), "images": Images()}


def _attack(cfg: TrainConfig, kind: str, task: Task) -> Attack | None:
    r = cfg.robust
    if kind == "none":
        return None
    adversary = robust.Adversary(kind, r.epsilon, r.pgd_steps, r.pgd_step_size, r.weight)
    return Attack(adversary, cfg.data.seq_len, cfg.model.d_model, task.weight)


def build(cfg: TrainConfig, resources: Resources, trainable: Callable[[str], bool]) -> Objective:
    """The objective `cfg` asks for; `trainable(path)` says which parameters train."""
    declared = task_of(cfg)
    task = LOSSES[declared.loss]
    size, r = resources.tokenizer.vocab_size, cfg.robust
    corrupt: list[Corrupt] = []
    if declared.masked:  # [MASK] is the first id the tokenizer never emits: its size
        corrupt.append(
            masking(mlm.Masking(mask_id=size, random_below=size, rate=cfg.data.mlm_rate))
        )
    if r.token_dropout or r.span_mask:
        corrupt.append(text_noise(robust.TextNoise(r.token_dropout, r.span_mask, r.span_length,
                                                   size, size)))  # fmt: skip
    clean = task_loss(task, cfg.optim.z_loss)
    modifiers: list[Modifier] = []
    if resources.teacher is not None:
        modifiers.append(distill(resources.teacher.graphdef, cfg.distill.temperature,
                                 cfg.distill.alpha))  # fmt: skip
    if attack := _attack(cfg, r.adversarial, task):
        modifiers.append(adversarial(attack))
    loss = clean
    for modify in modifiers:
        loss = modify(loss)
    grads = PLAIN
    if resources.accounting is not None:
        noise = privacy.Noise(resources.accounting.noise_multiplier, cfg.privacy.clip_norm)
        grads = dp_sgd(noise, task.weight, frozen_zeroed(trainable), cfg.model.dropout > 0)
    evaluate: EvalFn = task.eval_sums
    if attack := _attack(cfg, r.eval_attack, task):
        evaluate = eval_attack(attack, clean)(evaluate)
    return Objective(task, loss, evaluate, tuple(corrupt), grads)


__all__ = [
    "LOSSES",
    "PER_ROW",
    "PER_WEIGHT",
    "PLAIN",
    "Attack",
    "Batch",
    "Classify",
    "Corrupt",
    "EvalFn",
    "GradRule",
    "Images",
    "Inputs",
    "LossFn",
    "Metrics",
    "Modifier",
    "NextToken",
    "Objective",
    "Task",
    "build",
    "task_loss",
]
