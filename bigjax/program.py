"""One config on one mesh: the abstract state, its shardings and the jitted train/eval steps."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigjax import attention, lora, mlm, models, objectives, optim, privacy, step
from bigjax.config import ConfigError, TrainConfig
from bigjax.layers import compute_dtype
from bigjax.sharding import logical_to_spec, placed, tree_shardings
from bigjax.state import Params, TrainState, abstract_state, init_state, state_shardings


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything `train` needs to run steps; built once, before any array exists."""

    cfg: TrainConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    graph_state: nnx.State  # abstract, with logical-axis metadata
    tx: optax.GradientTransformation
    abstract: TrainState
    shardings: TrainState
    batch_sharding: NamedSharding
    train_step: jax.stages.Wrapped | WithTeacher  # (state, batch) -> (state, metrics)
    eval_step: Callable[[Params, step.Batch], step.Metrics]
    accounting: privacy.Accounting | None = None  # DP-SGD runs: what epsilon depends on
    attention: str = "einsum"  # the training kernel model.attention resolves to on this mesh

    def init(self) -> TrainState:
        """A fresh state, materialised directly in its shardings."""
        return init_state(
            self.cfg.model,
            self.cfg.mesh.rules,
            self.tx,
            self.cfg.seed,
            self.shardings,
            self.cfg.finetune,
        )

    def local_rows(self) -> range:
        """The global batch rows this process's devices hold: the rows its data pipeline
        packs. Derived from the batch sharding, so it is right for any mesh, including one
        whose batch axes are replicated across processes."""
        shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
        index = self.batch_sharding.addressable_devices_indices_map(shape).values()
        starts = [idx[0].indices(shape[0]) for idx in index if idx is not None]
        return range(min(s[0] for s in starts), max(s[1] for s in starts))

    def abstract_inputs(self) -> tuple[TrainState, dict[str, jax.ShapeDtypeStruct]]:
        """The train step's (state, token batch) as sharded ShapeDtypeStructs: enough to lower
        and compile it ahead of time without allocating anything."""
        shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
        batch = {
            k: jax.ShapeDtypeStruct(
                shape, "float32" if k == "weights" else "int32", sharding=self.batch_sharding
            )
            for k in BATCH_KEYS
        }
        return placed(self.abstract, self.shardings), batch

    def to_global(self, local: dict[str, np.ndarray]) -> step.Batch:
        """Assembles each process's rows into one global batch array (no replication)."""
        if self.attention == "cudnn" and "segment_ids" in local:
            attention.check_segments(local["segment_ids"], attention.CUDNN_MAX_SEGMENTS)
        return {
            k: jax.make_array_from_process_local_data(_for_ndim(self.batch_sharding, v.ndim), v)
            for k, v in local.items()
        }


BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def _for_ndim(batch_sharding: NamedSharding, ndim: int) -> NamedSharding:
    """The [B, L] batch sharding, or its row part for per-row arrays [B] (class labels)."""
    if ndim == len(batch_sharding.spec):
        return batch_sharding
    spec = (*batch_sharding.spec[:1], *(None,) * (ndim - 1))  # rows split, the rest whole
    return NamedSharding(batch_sharding.mesh, PartitionSpec(*spec[:ndim]))


def batch_shardings(cfg: TrainConfig, batch_sharding: NamedSharding) -> dict[str, NamedSharding]:
    """Shardings of every array of a batch of this config's task."""
    rows = _for_ndim(batch_sharding, 1)
    if cfg.data.task == "images":  # [B, H, W, C] split on rows like the token batches
        return {"images": NamedSharding(rows.mesh, PartitionSpec(rows.spec[0], None, None, None)),
                "labels": rows}  # fmt: skip
    out = {k: batch_sharding for k in BATCH_KEYS}
    if cfg.data.task == "classify":
        out["labels"] = rows
    return out


def check_program(cfg: TrainConfig, mesh: Mesh) -> None:
    """Checks that need the mesh and backend. Raises ConfigError naming the key and fix."""
    axes = dict(cfg.mesh.rules).get("act_batch", ())
    shards = math.prod(mesh.shape[a] for a in axes)
    accum = cfg.optim.grad_accum_steps
    # An indivisible batch would silently be replicated (every device computing all of it).
    if (cfg.data.batch_size // accum) % shards:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} sequences in {accum} micro-batches cannot "
            f"be split over {shards} batch shards (mesh axes {axes}); use a multiple of "
            f"{shards * accum}."
        )
    if cfg.model.attention == "cudnn" and platform_of(mesh) != "gpu":
        raise ConfigError(
            f"model.attention: 'cudnn' needs an NVIDIA GPU, these devices are "
            f"{platform_of(mesh)!r}; use model.attention=auto."
        )


def platform_of(mesh: Mesh) -> str:
    """'cpu', 'gpu' or 'tpu': what the mesh's devices are (TPU for a plan's compile-only
    topology on a CPU host)."""
    return mesh.devices.flat[0].platform


def attention_kernel(cfg: TrainConfig, mesh: Mesh) -> str:
    """The kernel model.attention resolves to for training on `mesh` (attention.resolve)."""
    return attention.resolve(
        cfg.model.attention,
        platform_of(mesh),
        dtype=compute_dtype(cfg.model.dtype, platform_of(mesh)),
        head_dim=cfg.model.dim_per_head,
        seq_len=cfg.data.seq_len,
    )


def _tokenizer_size(cfg: TrainConfig) -> int:
    from bigjax.data import pipeline

    return pipeline.tokenizer_for(cfg.data).vocab_size


def mlm_masking(cfg: TrainConfig) -> mlm.Masking:
    """The mask id is the first id the tokenizer never emits: its vocabulary size."""
    size = _tokenizer_size(cfg)
    if cfg.model.vocab_size <= size:
        raise ConfigError(
            f"model.vocab_size: masked LM needs a [MASK] id past the tokenizer's {size} ids; "
            f"set model.vocab_size > {size}."
        )
    return mlm.Masking(mask_id=size, random_below=size, rate=cfg.data.mlm_rate)


def dp_accounting(cfg: TrainConfig) -> privacy.Accounting:
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
    from bigjax.data import examples, images

    d, m = cfg.data, cfg.model
    if d.task == "images":
        return len(images.load(d.images, "train", d.eval_fraction, m.image_size, m.channels).labels)
    return len(examples.load(d.examples, d.task, "train", d.eval_fraction).records)


@dataclasses.dataclass(frozen=True)
class WithTeacher:
    """A jitted distillation step with the teacher's parameters bound as its last argument
    (an argument, not a constant baked into the program)."""

    jitted: jax.stages.Wrapped
    teacher_params: Params

    def __call__(self, state: TrainState, batch: step.Batch) -> tuple[TrainState, step.Metrics]:
        return self.jitted(state, batch, self.teacher_params)

    def lower(
        self, state: TrainState, batch: step.Batch | dict[str, jax.ShapeDtypeStruct]
    ) -> jax.stages.Lowered:
        return self.jitted.lower(state, batch, self.teacher_params)


def load_teacher(cfg: TrainConfig, mesh: Mesh) -> tuple[nnx.GraphDef, Params, Any]:
    """The teacher run's program and latest parameters, sharded by this run's rules on this
    mesh; returns (graphdef, params, their shardings)."""
    from bigjax import loading
    from bigjax.config import from_configdict

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
    graphdef, graph_state = models.abstract(teacher.model, cfg.mesh.rules)
    shardings = nnx.to_pure_dict(tree_shardings(graph_state, mesh, cfg.mesh.rules))
    params, _ = loading.load_params(
        cfg.distill.teacher, placed(nnx.to_pure_dict(graph_state), shardings)
    )
    return graphdef, params, shardings


def make_program(cfg: TrainConfig, mesh: Mesh) -> Program:
    """Builds the abstract state, shardings and jitted steps for `cfg` on `mesh`."""
    check_program(cfg, mesh)
    rules = cfg.mesh.rules
    graphdef, graph_state = models.abstract(cfg.model, rules)
    trainable = lora.trainable_fn(cfg.finetune)
    tx = optim.make_optimizer(cfg.optim, cfg.num_steps, trainable, cfg.finetune.keep_sparsity)
    schedule = optim.make_schedule(cfg.optim, cfg.num_steps)
    abstract = abstract_state(graph_state, tx, cfg.finetune)
    shardings = state_shardings(graph_state, abstract, tx, mesh, rules)
    spec = logical_to_spec(
        ("act_batch", "act_seq"), rules, dict(mesh.shape), (cfg.data.batch_size, cfg.data.seq_len)
    )
    batch_sharding = NamedSharding(mesh, spec)
    teacher = load_teacher(cfg, mesh) if cfg.distill.teacher else None
    teacher_shardings = () if teacher is None else (teacher[2],)
    accounting = dp_accounting(cfg) if cfg.privacy.enabled else None
    resources = objectives.Resources(
        masking=mlm_masking(cfg) if cfg.data.task == "mlm" or cfg.robust.span_mask else None,
        tokenizer_size=_tokenizer_size(cfg)
        if cfg.robust.token_dropout or cfg.robust.span_mask
        else 0,
        noise=None
        if accounting is None
        else privacy.Noise(accounting.noise_multiplier, cfg.privacy.clip_norm),
        teacher=None if teacher is None else teacher[0],
    )
    trainable = trainable or (lambda path: True)
    train_objectives, eval_objectives = objectives.from_config(cfg, graphdef, trainable, resources)
    jitted = jax.jit(
        step.make_train_step(
            graphdef,
            tx,
            schedule,
            cfg.optim,
            rules,
            cfg.seed,
            dropout=cfg.model.dropout > 0,
            objectives=train_objectives,
            skip_nonfinite=cfg.nan_policy == "skip",
            trainable=trainable,
            lora_scale=cfg.finetune.lora_scale,
            seq_len=cfg.data.seq_len,
        ),
        in_shardings=(shardings, batch_shardings(cfg, batch_sharding), *teacher_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    train_step = jitted if teacher is None else WithTeacher(jitted, teacher[1])
    eval_step = jax.jit(
        step.make_eval_step(graphdef, cfg.finetune.lora_scale, eval_objectives),
        in_shardings=(shardings.params, batch_shardings(cfg, batch_sharding)),
    )
    return Program(
        cfg,
        mesh,
        graphdef,
        graph_state,
        tx,
        abstract,
        shardings,
        batch_sharding,
        train_step,
        eval_step,
        accounting,
        attention_kernel(cfg, mesh),
    )
