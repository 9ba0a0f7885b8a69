"""What a run reads besides its config, loaded once: the tokenizer, the distillation teacher
and the count of training examples (DP-SGD's sampling rate).

`load` is the only place the training setup reads these files; the program, the objectives,
the data pipeline and the evals take what it returns, so building a step reads no file and
the tokenizer is loaded once per process however many evals a run makes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from bigjax import choices, loading, models, privacy, stages
from bigjax.config import ConfigError, TrainConfig, from_configdict
from bigjax.data import examples, images, pipeline
from bigjax.data import tokenizer as tokenizers
from bigjax.sharding import num_stages, placed, tree_shardings
from bigjax.tasks import task_of
from bigjax.tree import Params


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A distillation teacher: its program, its latest parameters and their shardings."""

    graphdef: nnx.GraphDef
    params: Params
    shardings: Params  # the same tree, of NamedShardings


@dataclasses.dataclass(frozen=True)
class Resources:
    tokenizer: tokenizers.Tokenizer
    accounting: privacy.Accounting | None = None  # DP-SGD runs: what epsilon depends on
    teacher: Teacher | None = None
    choice_items: tuple[choices.Item, ...] = ()  # eval.choices: multiple-choice questions


def load(cfg: TrainConfig, mesh: Mesh) -> Resources:
    """Reads what `cfg` names (each once) and checks it against the config."""
    tokenizer = pipeline.tokenizer_for(cfg.data)
    if task_of(cfg).tokenized and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.kind} "
            f"tokenizer's {tokenizer.vocab_size} tokens; set it to at least that."
        )
    # masked LM and span masking: [MASK] is the first id the tokenizer never emits
    if (
        task_of(cfg).masked or cfg.robust.span_mask
    ) and cfg.model.vocab_size <= tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: masked LM needs a [MASK] id past the tokenizer's "
            f"{tokenizer.vocab_size} ids; set model.vocab_size > {tokenizer.vocab_size}."
        )
    accounting = _accounting(cfg) if cfg.privacy.enabled else None
    teacher = _teacher(cfg, mesh) if cfg.distill.teacher else None
    e = cfg.eval
    items = (
        choices.items_for(e.choices, cfg.data.eval_fraction, e.choice_items) if e.choices else []
    )
    return Resources(tokenizer, accounting, teacher, tuple(items))


def _accounting(cfg: TrainConfig) -> privacy.Accounting:
    """Sampling rate from the rows per epoch; the noise multiplier given, or calibrated so
    that the whole run (num_steps) spends exactly the target epsilon."""
    p = cfg.privacy
    rows = p.num_examples or _train_rows(cfg)
    if rows < cfg.data.batch_size:
        raise ConfigError(f"privacy: {rows} training rows, fewer than data.batch_size.")
    q = cfg.data.batch_size / rows
    sigma = p.noise_multiplier or privacy.calibrate_noise(
        p.target_epsilon, q, cfg.num_steps, p.delta, p.accountant
    )
    return privacy.Accounting(sigma, q, p.delta, p.accountant)


def _train_rows(cfg: TrainConfig) -> int:
    """Examples in the train split of data.examples or data.images (one per row)."""
    d, m, task = cfg.data, cfg.model, task_of(cfg)
    if task.source == "images":
        return len(images.load(d.images, "train", d.eval_fraction, m.image_size, m.channels).labels)
    return len(examples.load(d.examples, task.examples, "train", d.eval_fraction).records)


def _teacher(cfg: TrainConfig, mesh: Mesh) -> Teacher:
    """The teacher run's program and latest parameters, sharded by this run's rules on this
    mesh."""
    path = Path(cfg.distill.teacher) / "config.json"
    if not path.is_file():
        raise ConfigError(f"distill.teacher: {path} is missing; pass a run directory.")
    teacher = from_configdict(json.loads(path.read_text()))
    if teacher.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"distill.teacher: its vocab_size {teacher.model.vocab_size} differs from the "
            f"student's {cfg.model.vocab_size}; distillation matches token distributions."
        )
    if teacher.finetune.lora_rank:
        raise ConfigError(
            "distill.teacher: a LoRA run; merge it first (bigjax compress or convert write "
            "merged weights) and distill from that."
        )
    t, rules = teacher.model, cfg.mesh.rules
    graphdef, graph_state = models.abstract(t, rules)
    # the teacher's layers, stacked in the order this mesh's stages keep them
    shardings = nnx.to_pure_dict(tree_shardings(graph_state, mesh, rules))
    count = num_stages(rules, mesh.shape, t.num_layers)
    order = stages.layer_order(t.num_layers, count, t.pipeline_interleave)
    params, _ = loading.load_params(
        cfg.distill.teacher, placed(nnx.to_pure_dict(graph_state), shardings), order
    )
    return Teacher(graphdef, params, shardings)
