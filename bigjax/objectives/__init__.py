"""Research objectives as plug-ins: each one module, one class, one interface (`base.Objective`).

`from_config` chooses them once from the config: the task (`next_token` for lm and sft,
`masked_lm`, `classify` for text and images) first, then the modifiers it asks for
(`text_noise`, `dp_sgd`, `distill`, `adversarial`). The train and eval steps
(bigjax/step.py) call their hooks in that order and have no branch of their own on any of them.
A new objective is a module here with an `Objective` subclass, its config group, and one line
below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from bigjax import lora, mlm, privacy, robust
from bigjax.config import TrainConfig
from bigjax.objectives.adversarial import Adversarial, EvalAttack
from bigjax.objectives.base import Objective, frozen_zeroed
from bigjax.objectives.classify import Classify, Images
from bigjax.objectives.distill import Distill
from bigjax.objectives.dp_sgd import DPSGD
from bigjax.objectives.masked_lm import MaskedLM
from bigjax.objectives.next_token import NextToken
from bigjax.objectives.text_noise import TextNoise


@dataclasses.dataclass(frozen=True)
class Resources:
    """What objectives need that the config alone does not say (resolved by the program from
    the tokenizer, the example count and the teacher run, before the step is built)."""

    masking: mlm.Masking | None = None  # masked LM, span masking: the [MASK] id
    tokenizer_size: int = 0  # random replacements are drawn below it
    noise: privacy.Noise | None = None  # DP-SGD
    teacher: nnx.GraphDef | None = None  # distillation


def task_for(cfg: TrainConfig, resources: Resources) -> Objective:
    task = cfg.data.task
    if task == "mlm":
        if resources.masking is None:
            raise ValueError("data.task=mlm needs Resources.masking (program.resources)")
        return MaskedLM(resources.masking)
    if task == "images":
        return Images()
    if task == "classify":
        return Classify()
    return NextToken()  # lm, sft


def _adversary(cfg: TrainConfig, kind: str) -> robust.Adversary | None:
    r = cfg.robust
    if kind == "none":
        return None
    return robust.Adversary(kind, r.epsilon, r.pgd_steps, r.pgd_step_size, r.weight)


def from_config(
    cfg: TrainConfig, graphdef: nnx.GraphDef, trainable: Callable[[str], bool], resources: Resources
) -> tuple[tuple[Objective, ...], tuple[Objective, ...]]:
    """(train objectives, eval objectives), the task first."""
    task = task_for(cfg, resources)
    train: list[Objective] = [task]
    r = cfg.robust
    if r.token_dropout or r.span_mask:  # [MASK] is the first id the tokenizer never emits
        size = resources.tokenizer_size
        train.append(
            TextNoise(robust.TextNoise(r.token_dropout, r.span_mask, r.span_length, size, size))
        )
    if resources.noise is not None:
        lora_scale = cfg.finetune.lora_scale
        train.append(
            DPSGD(
                resources.noise,
                task,
                lambda p: nnx.merge(graphdef, lora.merged(p, lora_scale)),
                cfg.optim.z_loss,
                cfg.model.dropout > 0,
                frozen_zeroed(trainable),
            )
        )
    if resources.teacher is not None:
        train.append(Distill(resources.teacher, cfg.distill.temperature, cfg.distill.alpha))
    seq_len, d_model = cfg.data.seq_len, cfg.model.d_model
    if adversary := _adversary(cfg, r.adversarial):
        train.append(Adversarial(adversary, seq_len, d_model))
    evals: list[Objective] = [task]
    if attack := _adversary(cfg, r.eval_attack):
        evals.append(EvalAttack(task, attack, seq_len, d_model))
    return tuple(train), tuple(evals)


__all__ = [
    "Adversarial",
    "Classify",
    "DPSGD",
    "Distill",
    "EvalAttack",
    "Images",
    "MaskedLM",
    "NextToken",
    "Objective",
    "Resources",
    "TextNoise",
    "from_config",
]
