"""Pipeline parallelism: the stacked layers split into stages over the mesh's `stage` axis.

The layers' stacked parameters [N, ...] are sharded on their leading dim over `stage` (the
`layers` rule), so stage s holds layers [s N/S, (s+1) N/S): the same arrays, in the same
order, as without stages, which is why checkpoints move between meshes with and without
stages unchanged. Each micro-batch of the step is cut into M pipeline micro-batches; a
buffer [S, rows / M, L, D] holds what each stage works on, sharded over `stage`. Every tick
all stages run their layers at once (`jax.vmap` over the stage dim with `spmd_axis_name`, so
each stage's work stays on its devices and composes with data/fsdp/tensor inside it), then
the buffer rolls by one stage: XLA turns the roll into a collective permute between
neighbouring stages (over DCN when stages span slices). M + S - 1 ticks move every
micro-batch through every stage; the backward pass is the same scan reversed (GPipe's
schedule: all forwards, then all backwards, each stage's layers rematerialised as
`model.remat` says).

The bubble (ticks a stage idles) is (S - 1) / (M + S - 1) of the step: `plan` and `bench`
report it; more micro-batches shrink it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from bigjax.sharding import Rules, constrain, logical_to_spec

AXIS = "stage"

# (stacked params [n, ...], x [b, L, D], segment ids [b, L], positions [b, L], layer rngs
#  [n, ...] or None) -> (x, {name: per-layer value [n]})
Layers = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def num_stages(rules: Rules, mesh_shape: Mapping[str, int], num_layers: int) -> int:
    """Into how many stages `rules` split `num_layers` stacked layers on a mesh of
    `mesh_shape` (1: no pipeline)."""
    spec = logical_to_spec(("layers",), rules, dict(mesh_shape), (num_layers,))[0]
    axes = spec if isinstance(spec, tuple) else (spec,)
    return mesh_shape.get(AXIS, 1) if AXIS in axes else 1


def microbatches(requested: int, stages: int) -> int:
    """Pipeline micro-batches for `model.pipeline_microbatches` (0: as many as stages)."""
    return requested or stages


def bubble_fraction(stages: int, num_micro: int) -> float:
    """The share of each stage's ticks spent idle: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (num_micro + stages - 1)


def schedule(
    rules: Rules, mesh_shape: Mapping[str, int], num_layers: int, requested: int
) -> dict[str, float] | None:
    """{stages, microbatches, bubble} of the pipeline a config runs on a mesh of
    `mesh_shape` (None without stages): what `plan` and `bench` report."""
    count = num_stages(rules, mesh_shape, num_layers)
    if count == 1:
        return None
    micro = microbatches(requested, count)
    return {"stages": count, "microbatches": micro, "bubble": bubble_fraction(count, micro)}


def describe(pipeline: Mapping[str, float]) -> str:
    """One line for a person: stages, micro-batches and the bubble."""
    return (
        f"{pipeline['stages']:g} stages x {pipeline['microbatches']:g} micro-batches: bubble "
        f"{pipeline['bubble']:.1%} of each step, (S - 1) / (M + S - 1)"
    )


def run(
    layers: Layers,
    params: object,
    x_BLD: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    rngs_N: jax.Array | None,
    *,
    stages: int,
    num_micro: int,
    rules: Rules,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`layers` over all the stacked layers of `params`, pipelined over `stages` with
    `num_micro` micro-batches; returns the stream and each auxiliary output averaged over
    layers and micro-batches."""
    rows = x_BLD.shape[0]
    per_micro = rows // num_micro

    def micro(a: jax.Array) -> jax.Array:
        # Micro-batch m is rows m, m + M, m + 2M, ...: each batch shard keeps its own rows.
        return jnp.swapaxes(a.reshape(per_micro, num_micro, *a.shape[1:]), 0, 1)

    x_MbLD, segment_ids_MbL, positions_MbL = (
        micro(x_BLD),
        micro(segment_ids_BL),
        micro(positions_BL),
    )
    by_stage = lambda a: a.reshape(stages, a.shape[0] // stages, *a.shape[1:])  # noqa: E731
    stage_params = jax.tree.map(by_stage, params)
    stage_rngs = None if rngs_N is None else by_stage(rngs_N)
    names = (AXIS, "act_batch", "act_res_seq", "act_embed")
    stage_layers = jax.vmap(
        layers, in_axes=(0, 0, 0, 0, None if stage_rngs is None else 0), spmd_axis_name=AXIS
    )

    def tick(
        buffer_SbLD: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
        micro_S = t - jnp.arange(stages)  # the micro-batch at each stage this tick
        working_S = (micro_S >= 0) & (micro_S < num_micro)
        index_S = jnp.clip(micro_S, 0, num_micro - 1)
        buffer_SbLD = buffer_SbLD.at[0].set(x_MbLD[jnp.minimum(t, num_micro - 1)])
        buffer_SbLD = constrain(buffer_SbLD, names, rules)
        out_SbLD, aux_Sn = stage_layers(
            stage_params, buffer_SbLD, segment_ids_MbL[index_S], positions_MbL[index_S], stage_rngs
        )
        aux = {
            k: jnp.sum(jnp.where(working_S, jnp.mean(v, axis=1), 0.0)) for k, v in aux_Sn.items()
        }
        # The last stage's micro-batch leaves; the rest move one stage on.
        return jnp.roll(out_SbLD, 1, axis=0), (out_SbLD[stages - 1], aux)

    buffer = jnp.zeros((stages, *x_MbLD.shape[1:]), x_BLD.dtype)
    ticks = jnp.arange(num_micro + stages - 1)
    _, (out_TbLD, aux_T) = jax.lax.scan(tick, buffer, ticks)
    out_MbLD = out_TbLD[stages - 1 :]  # tick t finishes micro-batch t - (S - 1)
    x_BLD = jnp.swapaxes(out_MbLD, 0, 1).reshape(x_BLD.shape)
    aux = {k: jnp.sum(v) / (num_micro * stages) for k, v in aux_T.items()}
    return constrain(x_BLD, ("act_batch", "act_res_seq", "act_embed"), rules), aux
