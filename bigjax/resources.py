"""What a run reads besides its config, loaded once: the tokenizer, the distillation teacher
and the count of training examples (DP-SGD's sampling rate).

`load` is the only place the training setup reads these files; the program, the objectives,
the data pipeline and the evals take what it returns, so building a step reads no file and
the tokenizer is loaded once per process however many evals a run makes.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from bigjax import choices, loading, privacy
from bigjax.config import ConfigError, TrainConfig
from bigjax.data import dataset, examples, images
from bigjax.data import tokenizer as tokenizers
from bigjax.loading import Teacher
from bigjax.tasks import task_of

__all__ = ["Resources", "Teacher", "load"]


@dataclasses.dataclass(frozen=True)
class Resources:
    tokenizer: tokenizers.Tokenizer
    accounting: privacy.Accounting | None = None  # DP-SGD runs: what epsilon depends on
    teacher: Teacher | None = None
    choice_items: tuple[choices.Item, ...] = ()  # eval.choices: multiple-choice questions


def load(cfg: TrainConfig, mesh: Mesh) -> Resources:
    """Reads what `cfg` names (each once) and checks it against the config."""
    task, p, e = task_of(cfg), cfg.privacy, cfg.eval
    # DP-SGD's sampling rate: the training examples per epoch (one per row)
    rows = (p.num_examples or _train_rows(cfg)) if p.enabled else 0
    tokenizer = dataset.tokenizer_for(cfg.data)
    if task.tokenized and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.kind} "
            f"tokenizer's {tokenizer.vocab_size} tokens; set it to at least that."
        )
    # masked LM and span masking: [MASK] is the first id the tokenizer never emits
    if (task.masked or cfg.robust.span_mask) and cfg.model.vocab_size <= tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: masked LM needs a [MASK] id past the tokenizer's "
            f"{tokenizer.vocab_size} ids; set model.vocab_size > {tokenizer.vocab_size}."
        )
    accounting = (
        privacy.accounting(p, cfg.data.batch_size, cfg.num_steps, rows) if p.enabled else None
    )
    teacher = (
        loading.teacher(cfg.distill.teacher, cfg.model.vocab_size, cfg.mesh.rules, mesh)
        if cfg.distill.teacher
        else None
    )
    items = (
        choices.items_for(e.choices, cfg.data.eval_fraction, e.choice_items) if e.choices else []
    )
    return Resources(tokenizer, accounting, teacher, tuple(items))


def _train_rows(cfg: TrainConfig) -> int:
    """Examples in the train split of data.examples or data.images (one per row)."""
    d, m, task = cfg.data, cfg.model, task_of(cfg)
    if task.source == "images":
        return len(images.load(d.images, "train", d.eval_fraction, m.image_size, m.channels).labels)
    return len(examples.load(d.examples, task.examples, "train", d.eval_fraction).records)
