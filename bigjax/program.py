"""One config on one mesh: the abstract state, its shardings and the jitted train/eval steps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from bigjax import (
    attention,
    checkpoint,
    context,
    lora,
    models,
    objectives,
    optim,
    resources,
    stages,
    step,
)
from bigjax.config import ConfigError, TrainConfig, check_mesh_axes
from bigjax.data import pipeline
from bigjax.layers import compute_dtype
from bigjax.resources import Resources
from bigjax.sharding import context_parts, logical_to_spec, num_stages, placed
from bigjax.state import TrainState, abstract_state, init_state, state_shardings
from bigjax.tasks import task_of
from bigjax.tree import Params


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The run's abstract state, its shardings and its batch's: from the config alone, with no
    FLOPs and no file read (the memory check runs on them before anything is allocated)."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    graph_state: nnx.State  # abstract, with logical-axis metadata
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState
    shardings: TrainState
    batch: dict[str, jax.ShapeDtypeStruct]  # the task's global batch, sharded, by field
    seq_dims: dict[str, int]  # the sequence dim of each field that has one
    context_parts: int  # how many pieces the context axis cuts each sequence into
    attention: str  # the training kernel model.attention resolves to on this mesh
    layout: dict[str, list[int]]  # the parameters' shapes by path, as checkpoints record them
    trainable: Callable[[str], bool]  # by parameter path (finetune.freeze, LoRA)
    layer_order: list[int]  # the stacked layers' order in memory (bigjax/stages.py)
    target: TrainState  # the abstract state placed in its shardings: what a restore fills

    @property
    def batch_shardings(self) -> dict[str, NamedSharding]:
        return {k: v.sharding for k, v in self.batch.items()}

    @property
    def num_params(self) -> int:
        """The model's parameters (adapters not counted)."""
        return models.count_params(self.graph_state)

    @property
    def num_trainable(self) -> int:
        """What trains: LoRA adapters and unfrozen parameters."""
        return lora.count_trainable(self.abstract.params, self.trainable)


@dataclasses.dataclass(frozen=True)
class Program(Shapes):
    """Everything `train` needs to run steps; built once, before any array exists."""

    cfg: TrainConfig
    train_step: jax.stages.Wrapped | WithTeacher  # (state, batch) -> (state, metrics)
    eval_step: Callable[[Params, step.Batch], step.Metrics]
    resources: Resources  # the tokenizer, DP accounting and teacher the step was built with

    def init(self) -> TrainState:
        """A fresh state, materialised directly in its shardings."""
        return init_state(
            self.cfg.model,
            self.cfg.mesh.rules,
            self.tx,
            self.cfg.seed,
            self.shardings,
            self.cfg.finetune,
            self.layer_order,
        )

    def batches(
        self, split: str, seed: int, shuffle: bool | None = None, workers: int | None = None
    ) -> pipeline.Batches:
        """This process's rows of the task's batches of `split`, read with the run's
        tokenizer (`shuffle` and `workers` default to the config's)."""
        m = self.cfg.model
        return pipeline.for_config(
            self.cfg.data,
            split=split,
            seed=seed,
            rows=self.local_rows(),
            shuffle=shuffle,
            workers=workers,
            image_shape=(m.image_size, m.channels),
            tokenizer=self.resources.tokenizer,
        )

    def local_rows(self) -> range:
        """The global batch rows this process's devices hold: the rows its data pipeline
        packs. Derived from the batch sharding, so it is right for any mesh, including one
        whose batch axes are replicated across processes."""
        first = next(iter(self.batch.values()))
        index = first.sharding.addressable_devices_indices_map(first.shape).values()
        starts = [idx[0].indices(first.shape[0]) for idx in index if idx is not None]
        return range(min(s[0] for s in starts), max(s[1] for s in starts))

    def abstract_inputs(self) -> tuple[TrainState, dict[str, jax.ShapeDtypeStruct]]:
        """The train step's (state, batch) as sharded ShapeDtypeStructs, the batch as the
        task declares it: enough to lower and compile the step ahead of time without
        allocating anything."""
        return self.target, dict(self.batch)

    def to_global(self, local: dict[str, np.ndarray]) -> step.Batch:
        """Assembles each process's rows into one global batch array (no replication), the
        sequences in load-balanced order when they are split over the context axis."""
        if self.attention == "cudnn" and "segment_ids" in local:
            attention.check_segments(local["segment_ids"], attention.CUDNN_MAX_SEGMENTS)
        # The global shapes given: a context axis across processes leaves each process
        # the whole sequence of its rows, from which jax takes its devices' parts.
        return {
            k: jax.make_array_from_process_local_data(
                self.batch[k].sharding, v, self.batch[k].shape
            )
            for k, v in context.balance(local, self.seq_dims, self.context_parts).items()
        }


def check_program(cfg: TrainConfig, mesh: Mesh) -> None:
    """Checks that need the mesh and backend. Raises ConfigError naming the key and fix."""
    check_mesh_axes(cfg, dict(mesh.shape))
    axes = dict(cfg.mesh.rules).get("act_batch", ())
    shards = math.prod(mesh.shape[a] for a in axes)
    accum = cfg.optim.grad_accum_steps
    count = num_stages(cfg.mesh.rules, mesh.shape, cfg.model.num_layers)
    if count > 1:  # each pipeline micro-batch is split over the batch shards too
        accum *= stages.microbatches(cfg.model.pipeline_microbatches, count)
    # An indivisible batch would silently be replicated (every device computing all of it).
    if (cfg.data.batch_size // accum) % shards:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} sequences in {accum} (pipeline) "
            f"micro-batches cannot be split over {shards} batch shards (mesh axes {axes}); "
            f"use a multiple of {shards * accum}."
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


def shapes(cfg: TrainConfig, mesh: Mesh) -> Shapes:
    """Checks the config against the mesh and builds its abstract state and shardings, its
    batch's, and what the mesh makes of it (the attention kernel, the layers' order)."""
    platform = platform_of(mesh)
    check_program(cfg, mesh)
    rules, m = cfg.mesh.rules, cfg.model
    # What the mesh cuts: the stacked layers into stages (the layers' order in memory
    # follows), each sequence into context parts (one device's kernel sees one part).
    count = num_stages(rules, mesh.shape, m.num_layers)
    parts = context_parts(rules, mesh.shape, cfg.data.seq_len)
    # The model, what of it trains, the optimizer: the abstract state and its shardings.
    graphdef, graph_state = models.abstract(m, rules)
    trainable = lora.trainable_fn(cfg.finetune)
    tx = optim.make_optimizer(cfg.optim, cfg.num_steps, trainable, cfg.finetune.keep_sparsity,
                              m.moe_bias_rate)  # fmt: skip
    schedule = optim.make_schedule(cfg.optim, cfg.num_steps)
    abstract = abstract_state(graph_state, tx, cfg.finetune)
    shardings = state_shardings(graph_state, abstract, tx, mesh, rules)
    # The task's batch: every field's global shape, dtype and sharding (its logical names).
    task, mesh_shape = task_of(cfg), dict(mesh.shape)
    batch = {
        k: jax.ShapeDtypeStruct(shape, task.fields[k].dtype, sharding=NamedSharding(
            mesh, logical_to_spec(task.fields[k].axes, rules, mesh_shape, shape)))
        for k, shape in task.shapes(cfg).items()
    }  # fmt: skip
    dtype = compute_dtype(m.dtype, platform)
    kernel = attention.resolve(m.attention, platform, dtype=dtype, head_dim=m.dim_per_head,
                               seq_len=cfg.data.seq_len // parts)  # fmt: skip
    return Shapes(
        mesh=mesh,
        graphdef=graphdef,
        graph_state=graph_state,
        tx=tx,
        schedule=schedule,
        abstract=abstract,
        shardings=shardings,
        batch=batch,
        seq_dims={k: f.dims.index("seq") for k, f in task.fields.items() if "seq" in f.dims},
        context_parts=parts,
        attention=kernel,
        layout=checkpoint.param_layout(abstract.params),
        trainable=trainable or (lambda path: True),
        layer_order=stages.layer_order(m.num_layers, count, m.pipeline_interleave),
        target=placed(abstract, shardings),
    )


def for_config(cfg: TrainConfig, mesh: Mesh) -> Program:
    """The program of `cfg` on `mesh`, its resources loaded here (the tools' one call; a
    training run loads them itself, once)."""
    return make_program(cfg, shapes(cfg, mesh), resources.load(cfg, mesh))


def make_program(cfg: TrainConfig, s: Shapes, res: Resources) -> Program:
    """The jitted train and eval steps for `cfg` on the shapes `s`, built from the run's
    resources; reads no file."""
    objective = objectives.build(cfg, res, s.trainable)
    teacher_shardings = () if res.teacher is None else (res.teacher.shardings,)
    jitted = jax.jit(
        step.make_train_step(
            s.graphdef,
            s.tx,
            s.schedule,
            cfg.optim,
            cfg.mesh.rules,
            cfg.seed,
            dropout=cfg.model.dropout > 0,
            objective=objective,
            skip_nonfinite=cfg.nan_policy == "skip",
            trainable=s.trainable,
            lora_scale=cfg.finetune.lora_scale,
            seq_len=cfg.data.seq_len,
        ),
        in_shardings=(s.shardings, s.batch_shardings, *teacher_shardings),
        out_shardings=(s.shardings, None),
        donate_argnums=0,
    )
    train_step = jitted if res.teacher is None else WithTeacher(jitted, res.teacher.params)
    eval_step = jax.jit(
        step.make_eval_step(s.graphdef, cfg.finetune.lora_scale, objective),
        in_shardings=(s.shardings.params, s.batch_shardings),
    )
    built = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    return Program(**built, cfg=cfg, train_step=train_step, eval_step=eval_step, resources=res)
