"""A run's objective, composed from the config by `build`: the task's loss (bigjax/tasks.py
names it), the batch corruptions, the loss modifiers wrapped around it in order (distillation,
adversarial training), the gradient rule (plain or DP-SGD) and the eval (with an attack).

Each piece is a plain function in its own module; the train and eval steps (bigjax/step.py)
call the composed functions and have no branch on any of them. A new loss modifier is a
`LossFn -> LossFn` function in a module here and one line in `build`.
"""

from __future__ import annotations

from collections.abc import Callable

from bigjax.config import TrainConfig
from bigjax.objectives.adversarial import Attack, adversarial_for, eval_attack_for
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
    Setup,
    Task,
    task_loss,
)
from bigjax.objectives.classify import Classify, Images
from bigjax.objectives.distill import distill_for
from bigjax.objectives.dp_sgd import dp_sgd_for
from bigjax.objectives.next_token import NextToken, masking_for
from bigjax.objectives.text_noise import text_noise_for
from bigjax.resources import Resources
from bigjax.tasks import task_of

LOSSES: dict[str, Task] = {"next_token": NextToken(), "classify": Classify(), "images": Images()}
# The plug-ins, in the order they apply. Each reads its own config group and returns its
# piece, or None when the config does not ask for it; a new one is its module and a line here.
CORRUPTIONS: tuple[Callable[[Setup], Corrupt | None], ...] = (masking_for, text_noise_for)
MODIFIERS: tuple[Callable[[Setup], Modifier | None], ...] = (distill_for, adversarial_for)
GRAD_RULES: tuple[Callable[[Setup], GradRule | None], ...] = (dp_sgd_for,)
EVAL_MODIFIERS = (eval_attack_for,)


def build(cfg: TrainConfig, resources: Resources, trainable: Callable[[str], bool]) -> Objective:
    """The objective `cfg` asks for; `trainable(path)` says which parameters train."""
    task = LOSSES[task_of(cfg).loss]
    setup = Setup(cfg, resources, task, trainable)
    corrupt = tuple(c for make in CORRUPTIONS if (c := make(setup)) is not None)
    clean = loss = task_loss(task, cfg.optim.z_loss)
    for make_modifier in MODIFIERS:  # each wraps the loss so far
        loss = wrap(loss) if (wrap := make_modifier(setup)) is not None else loss
    rules = [g for make in GRAD_RULES if (g := make(setup)) is not None]
    evaluate: EvalFn = task.eval_sums
    for make_eval in EVAL_MODIFIERS:  # an eval attack scores the clean loss under attack
        evaluate = add(evaluate) if (add := make_eval(setup, clean)) is not None else evaluate
    return Objective(task, loss, evaluate, corrupt, rules[0] if rules else PLAIN)


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
    "Setup",
    "Objective",
    "Task",
    "build",
    "task_loss",
]
