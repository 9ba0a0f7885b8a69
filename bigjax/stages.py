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

Interleaving (`model.pipeline_interleave` = V > 1, the circular schedule): the layers are cut
into V S chunks and chunk r S + s runs on stage s, so a micro-batch goes round the ring of
stages V times, each visit 1/V of a stage's layers; the bubble shrinks to
(S - 1) / (V M + S - 1) at V times the permutes. Stage s must then hold the chunks s, S + s,
2S + s, ...: not a contiguous block of the stacked layers. So a run with V > 1 keeps its
stacked layers in stage-major order in memory (`layer_order`: slot p holds layer
order[p]), permuted once at init; each checkpoint records its order, and a restore into a
run with another order permutes once (`reorder`), so checkpoints still move between any
meshes, stages, interleaving or none.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.sharding import STAGE_AXIS as AXIS
from bigjax.sharding import Rules, constrain

# (stacked params [n, ...], x [b, L, D], segment ids [b, L], positions [b, L], layer rngs
#  [n, ...] or None, lap=None) -> (x, {name: per-layer value [n]}); with `lap`, the params
#  are a stage's chunks of every lap [V, n, ...] and the layers run chunk `lap`.
Layers = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def layer_order(num_layers: int, stages: int, interleave: int) -> list[int]:
    """The canonical layer held at each slot of the stacked layers in memory: stage-major
    (stage s's chunks r S + s, r = 0..V-1, side by side) for V > 1, else the identity."""
    if stages == 1 or interleave == 1:
        return list(range(num_layers))
    chunk = num_layers // (stages * interleave)
    return [
        (r * stages + s) * chunk + i
        for s in range(stages)
        for r in range(interleave)
        for i in range(chunk)
    ]


T = typing.TypeVar("T")


def take_layers(tree: T, index: Sequence[int]) -> T:
    """`tree` with slot p of its stacked layers taken from slot index[p]: every leaf under a
    `blocks` path whose leading dim is the layer count (parameters, their optimizer moments,
    LoRA adapters)."""
    count, index_N = len(index), np.asarray(index)

    def one(path: tuple, leaf: jax.Array) -> jax.Array:
        stacked = "blocks" in jax.tree_util.keystr(path) and leaf.ndim and leaf.shape[0] == count
        return jnp.take(leaf, index_N, axis=0) if stacked else leaf

    return jax.tree_util.tree_map_with_path(one, tree)


def reorder(tree: T, saved: Sequence[int] | None, wanted: Sequence[int] | None) -> T:
    """`tree` (parameters, a TrainState) read with its stacked layers in `saved` order, with
    them in `wanted` order instead (None: the identity), each leaf kept in its sharding:
    once, when a checkpoint moves to a run with another order."""
    known = saved if saved is not None else wanted
    if known is None:
        return tree
    identity = list(range(len(known)))
    saved = identity if saved is None else list(saved)
    wanted = identity if wanted is None else list(wanted)
    if sorted(saved) != identity or sorted(wanted) != identity or len(saved) != len(wanted):
        raise ValueError(
            f"layer order {saved} of the checkpoint cannot become {wanted}: not the same "
            "layers (its metadata is damaged, or the model changed its layer count)"
        )
    if saved == wanted:
        return tree
    index = np.argsort(saved)[np.asarray(wanted)]  # the slot in `saved` of each wanted layer
    shardings = jax.tree.map(lambda x: x.sharding, tree)
    return jax.jit(lambda t: take_layers(t, index), out_shardings=shardings)(tree)


def microbatches(requested: int, stages: int) -> int:
    """Pipeline micro-batches for `model.pipeline_microbatches` (0: as many as stages)."""
    return requested or stages


def bubble_fraction(stages: int, num_micro: int, interleave: int = 1) -> float:
    """The share of each stage's ticks spent idle: (S - 1) / (V M + S - 1) when M is a
    multiple of S (or V = 1)."""
    return 1.0 - interleave * num_micro / len(ticks(stages, num_micro, interleave).fresh)


def schedule(stages: int, requested: int, interleave: int) -> dict[str, float] | None:
    """{stages, microbatches, interleave, bubble} of a pipeline of `stages` stages with
    `model.pipeline_microbatches` = `requested` (None without stages): what `plan`, `bench`
    and the memory estimate read."""
    if stages == 1:
        return None
    micro = microbatches(requested, stages)
    bubble = bubble_fraction(stages, micro, interleave)
    return {"stages": stages, "microbatches": micro, "interleave": interleave, "bubble": bubble}


def describe(pipeline: Mapping[str, float]) -> str:
    """One line for a person: stages, micro-batches, laps and the bubble."""
    return (
        f"{pipeline['stages']:g} stages x {pipeline['microbatches']:g} micro-batches, "
        f"interleave {pipeline['interleave']:g}: bubble {pipeline['bubble']:.1%} of each step, "
        "(S - 1) / (V M + S - 1)"
    )


class Ticks(typing.NamedTuple):
    """The static schedule: per tick and stage, the micro-batch, the lap (repeat) and whether
    it is real work; per tick whether stage 0 takes a fresh micro-batch; per micro-batch the
    tick it leaves the last stage for good."""

    micro: np.ndarray  # [T, S] (clipped to a valid index where idle)
    lap: np.ndarray  # [T, S]
    working: np.ndarray  # [T, S] bool
    fresh: np.ndarray  # [T] bool
    finish: np.ndarray  # [M]


def ticks(stages: int, num_micro: int, interleave: int) -> Ticks:
    """Micro-batch m (group g = m // S, i = m % S) enters stage 0 at tick g V S + i and goes
    round the ring V times, one stage a tick: stage s at tick t works on the micro-batch and
    lap that t - s gives, so no stage ever holds two."""
    done = [(m // stages) * interleave * stages + m % stages + interleave * stages - 1
            for m in range(num_micro)]  # fmt: skip
    count = max(done) + 1
    u = np.arange(count)[:, None] - np.arange(stages)[None, :]
    micro = (u // (interleave * stages)) * stages + u % stages
    working = (u >= 0) & (micro < num_micro)
    lap = (u // stages) % interleave
    fresh = working[:, 0] & (lap[:, 0] == 0)
    return Ticks(np.clip(micro, 0, num_micro - 1), lap, working, fresh, np.asarray(done)[:count])


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
    interleave: int,
    rules: Rules,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`layers` over all the stacked layers of `params` (in `layer_order`), pipelined over
    `stages` with `num_micro` micro-batches and `interleave` laps; returns the stream and
    each auxiliary output averaged over layers and micro-batches."""
    rows = x_BLD.shape[0]
    per_micro = rows // num_micro
    plan = ticks(stages, num_micro, interleave)

    def micro(a: jax.Array) -> jax.Array:
        # Micro-batch m is rows m, m + M, m + 2M, ...: each batch shard keeps its own rows.
        return jnp.swapaxes(a.reshape(per_micro, num_micro, *a.shape[1:]), 0, 1)

    x_MbLD, segment_ids_MbL, positions_MbL = (
        micro(x_BLD),
        micro(segment_ids_BL),
        micro(positions_BL),
    )
    # [S, V, layers per chunk, ...]: stage s's slots hold its chunks of each lap in turn.
    by_stage = lambda a: a.reshape(stages, interleave, -1, *a.shape[1:])  # noqa: E731
    stage_params = jax.tree.map(by_stage, params)
    stage_rngs = None if rngs_N is None else by_stage(rngs_N)
    names = (AXIS, "act_batch", "act_res_seq", "act_embed")

    def stage_layers(
        params_V: object,
        x_bLD: jax.Array,
        segment_ids_bL: jax.Array,
        positions_bL: jax.Array,
        rngs_V: jax.Array | None,
        lap: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        # The chunk of layers this tick's lap names is sliced inside each layer's remat region
        # (`layers(..., lap=)`): a slice taken here would be a per-tick residual of the scan,
        # T copies of a stage's weight shard (compiled temporaries on 8 CPU devices,
        # interleave 2: 556 -> 268 MiB against 202 unpipelined; docs/scaling.md).
        # Without laps the index is static: the slice is loop-invariant wherever it is taken.
        chunk: jax.Array | int = lap if interleave > 1 else 0
        rngs = None if rngs_V is None else rngs_V[chunk]
        return layers(params_V, x_bLD, segment_ids_bL, positions_bL, rngs, lap=chunk)

    all_stages = jax.vmap(
        stage_layers,
        in_axes=(0, 0, 0, 0, None if stage_rngs is None else 0, 0),
        spmd_axis_name=AXIS,
    )

    def tick(
        buffer_SbLD: jax.Array, schedule: tuple[jax.Array, ...]
    ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
        micro_S, lap_S, working_S, fresh = schedule
        first_bLD = jnp.where(fresh, x_MbLD[micro_S[0]], buffer_SbLD[0])
        buffer_SbLD = constrain(buffer_SbLD.at[0].set(first_bLD), names, rules)
        out_SbLD, aux_Sn = all_stages(
            stage_params, buffer_SbLD, segment_ids_MbL[micro_S], positions_MbL[micro_S],
            stage_rngs, lap_S,
        )  # fmt: skip
        aux = {
            k: jnp.sum(jnp.where(working_S, jnp.mean(v, axis=1), 0.0)) for k, v in aux_Sn.items()
        }
        # The last stage's micro-batch goes round again or leaves; the rest move one stage on.
        # The last stage's output, kept per tick, stays split over the batch shards (left to
        # propagation, XLA:TPU kept it whole on every FSDP device: 36 GiB at 70 B).
        last_bLD = constrain(out_SbLD[stages - 1], names[1:], rules)
        return jnp.roll(out_SbLD, 1, axis=0), (last_bLD, aux)

    buffer = jnp.zeros((stages, *x_MbLD.shape[1:]), x_BLD.dtype)
    schedule = tuple(jnp.asarray(a) for a in (plan.micro, plan.lap, plan.working, plan.fresh))
    _, (out_TbLD, aux_T) = jax.lax.scan(tick, buffer, schedule)
    out_MbLD = out_TbLD[plan.finish]
    x_BLD = jnp.swapaxes(out_MbLD, 0, 1).reshape(x_BLD.shape)
    aux = {k: jnp.sum(v) / (num_micro * stages * interleave) for k, v in aux_T.items()}
    return constrain(x_BLD, ("act_batch", "act_res_seq", "act_embed"), rules), aux
