"""Pipeline parallelism: layers split into stages over the `stage` mesh axis train like one
device; checkpoints move between meshes with and without stages."""

import math
import re

import jax
import numpy as np
import pytest
from conftest import tiny_config
from helpers import (
    assert_one_line_config_error,
    assert_same_losses,
    corpus_batches,
    run_steps,
    train_tiny,
)

from bigjax import stages
from bigjax.mesh import make_mesh
from bigjax.program import for_config


def _config(**model):
    return tiny_config(
        model={"num_layers": 8, "pipeline_microbatches": 4, **model},
        optim={"grad_accum_steps": 2},
        data={"batch_size": 16, "seq_len": 64},
    )


def test_bubble_fraction():
    assert stages.bubble_fraction(1, 8) == 0
    assert stages.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert stages.bubble_fraction(4, 27) == pytest.approx(0.1)  # 3 idle ticks of 30
    assert stages.microbatches(0, 4) == 4 and stages.microbatches(8, 4) == 8


def test_interleaved_layers_sit_stage_major():
    # 8 layers, 2 stages, 2 laps: chunks of 2; stage 0 runs chunks 0 and 2, stage 1 chunks
    # 1 and 3, each stage's slots side by side
    assert stages.layer_order(8, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7]
    assert stages.layer_order(8, 4, 1) == list(range(8))
    schedule = stages.ticks(2, 4, 2)
    assert len(schedule.fresh) == 2 * 4 + 2 - 1  # V M + S - 1 ticks
    # never two micro-batches on one stage; each does every (stage, lap) exactly once
    done = {(int(m), s, int(lap))
            for t in range(len(schedule.fresh)) for s in range(2)
            if schedule.working[t, s]
            for m, lap in [(schedule.micro[t, s], schedule.lap[t, s])]}  # fmt: skip
    assert done == {(m, s, lap) for m in range(4) for s in range(2) for lap in range(2)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "interleave", "model"),
    # (data, stage, fsdp, context, tensor): 2 stages alone and with fsdp + tensor inside each
    # stage; interleaved (circular): 4 stages x 2 laps, 2 stages x 4 laps; with remat (each
    # layer slices its lap's weights inside its remat region), scanned and unrolled
    [((1, 2, 1, 1, 1), 1, {}), ((1, 2, 2, 1, 2), 1, {}), ((1, 4, 1, 1, 1), 2, {}),
     ((1, 2, 1, 1, 1), 4, {}), ((1, 2, 2, 1, 1), 2, {"remat": "full"}),
     ((1, 2, 1, 1, 1), 2, {"remat": "save_matmuls", "scan_layers": False})],
)  # fmt: skip
def test_pipelined_training_matches_one_device(shape, interleave, model):
    cfg = _config(pipeline_interleave=interleave, **model)
    batches = corpus_batches(3, 16, 64)
    got, state, prog = run_steps(cfg, batches, jax.devices()[: math.prod(shape)], shape)
    ref, ref_state, _ = run_steps(cfg, batches, jax.devices()[:1], (1, 1, 1))
    # the stacked layers back in the model's order for the comparison
    state = state.replace(params=stages.take_layers(state.params, np.argsort(prog.layer_order)))
    # f32; the same sums in another order (micro-batches of 2 rows, sharded reductions):
    # ~1e-7 relative per op. A stage applied twice or skipped, a micro-batch lost in the
    # bubble or a wrong roll moves the loss by > 1e-2.
    for m, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert prog.train_step._cache_size() == 1  # no recompile across steps
    # The layers really are split: each stage holds its own quarter/half of the stack, and
    # activations move between stages by collective permutes.
    blocks = [s for p, s in jax.tree_util.tree_leaves_with_path(prog.shardings.params)
              if "blocks" in jax.tree_util.keystr(p)]  # fmt: skip
    assert all(s.spec[0] == "stage" for s in blocks)
    state_in, batch_in = prog.abstract_inputs()
    with jax.set_mesh(prog.mesh):
        hlo = prog.train_step.lower(state_in, batch_in).compile().as_text()
    assert re.search(r"collective-permute", hlo)


def _compiled_temp_mib(shape, **model):
    cfg = tiny_config(
        model={"num_layers": 8, "d_model": 512, "d_ff": 2048, "num_heads": 4, "num_kv_heads": 4,
               "remat": "full", **model},
        data={"batch_size": 16, "seq_len": 32},
        mesh={"shape": shape},
    )  # fmt: skip
    mesh = make_mesh(cfg.mesh, jax.devices()[: math.prod(shape)])
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        compiled = prog.train_step.lower(*prog.abstract_inputs()).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


@pytest.mark.slow
def test_laps_keep_no_weights_per_tick():
    # XLA's own accounting of the compiled step (deterministic), weights outweighing the
    # activations. A stage's weights sliced per tick were kept for the backward once per tick
    # (interleave 2 / 4: 140 / 120 MiB against 68 without laps and 51 unpipelined); sliced
    # inside each layer's remat region they are not: 68 / 52.
    flat = _compiled_temp_mib((1, 1, 8, 1, 1))
    laps = {v: _compiled_temp_mib((1, 2, 4, 1, 1), pipeline_microbatches=4, pipeline_interleave=v)
            for v in (1, 2, 4)}  # fmt: skip
    assert max(laps[2], laps[4]) <= 1.05 * laps[1], laps
    assert laps[1] <= 1.4 * flat, (laps, flat)  # the pipeline's buffers, not the weights again


@pytest.mark.slow
def test_checkpoints_move_between_meshes_with_and_without_stages(tmp_path):
    def groups(laps):
        return {"model": {"num_layers": 8, "pipeline_microbatches": 4, "pipeline_interleave": laps},
                "data": {"batch_size": 16, "seq_len": 64}}  # fmt: skip

    train_tiny(tmp_path / "ref", 4, (1, 1, -1, 1, 1), **groups(1))
    # written with 2 interleaved stages (stage-major layers), resumed with none; written
    # without stages, resumed on 4 interleaved ones
    moves = {"circular": ((2, 2), (1, 1)), "into_circular": ((1, 1), (4, 2))}
    for run, ((first, laps), (then, laps_then)) in moves.items():
        train_tiny(tmp_path / run, 2, (1, first, -1, 1, 1), **groups(laps))
        train_tiny(tmp_path / run, 4, (1, then, -1, 1, 1), **groups(laps_then))
    for run in moves:
        # same data order and state across the move; f32 sums in another order only
        assert_same_losses(tmp_path / run, tmp_path / "ref", (1, 2, 3, 4), rtol=1e-5)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"mesh": {"shape": (1, 4, 1, 1, 1)}, "model": {"num_layers": 2}},
         "model.num_layers: 2 layers cannot be split into 4"),
        ({"mesh": {"shape": (1, 2, 1, 1, 1), "rules": {"layers": None}}},
         "mesh.rules.layers: must include 'stage'"),
        ({"mesh": {"shape": (1, 2, 1, 1, 1)}, "model": {"pipeline_microbatches": 3}},
         "model.pipeline_microbatches: 3 pipeline micro-batches do not divide the 16 rows"),
        ({"mesh": {"shape": (1, 2, 1, 1, 1)},
          "privacy": {"noise_multiplier": 0.5, "num_examples": 1000}},
         "mesh.shape: stage 2 with DP-SGD"),
    ],
)  # fmt: skip
def test_impossible_stage_combinations_are_named_in_one_line(groups, message):
    assert_one_line_config_error(groups, message)
