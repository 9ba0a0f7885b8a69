"""The train step: accumulation, compilation, randomness, optimizers, schedules, golden values."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from helpers import corpus_batches, run_steps

from bigjax import step
from bigjax.config import OptimConfig
from bigjax.mesh import make_mesh
from bigjax.optim import make_optimizer, make_schedule
from bigjax.program import for_config

# lm_tiny's loss on a fixed synthetic batch (numpy seed 0) at init and after one AdamW step
# (seed 0, lr 3e-3, no warmup). Only the model, init, loss and optimizer code decide these
# numbers. If you changed one of those on purpose, rerun this test and paste the new values;
# if you did not, the test caught a behaviour change.
GOLDEN_LOSSES = (6.7291, 5.0479)


def _synthetic_batch(B=16, L=64):
    tokens = np.random.default_rng(0).integers(0, 256, (B, L + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
        "weights": np.ones((B, L), np.float32),
    }


@pytest.mark.slow
def test_golden_first_steps():
    cfg = tiny_config(optim={"warmup_steps": 0, "schedule": "constant"})
    metrics, _, _ = run_steps(cfg, [_synthetic_batch()] * 2)
    losses = tuple(round(float(m["loss"]), 4) for m in metrics)
    # 1e-3 absolute: bitwise on one machine; leaves room for other CPUs' f32 matmul kernels.
    assert np.allclose(losses, GOLDEN_LOSSES, atol=1e-3), (
        f"losses {losses} != golden {GOLDEN_LOSSES}. Intended change to init/model/loss/"
        "optimizer? Update GOLDEN_LOSSES. Otherwise find what changed the numerics."
    )
    # Near-uniform logits at init: ln(512) = 6.24 plus ~0.5 for unit-variance logits.
    assert 6.0 < losses[0] < 7.2 and losses[1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_big_batch(accum):
    batches = corpus_batches(2, 16, 64)
    ref, ref_state, _ = run_steps(tiny_config(), batches, mesh_shape=(2, 2, 2))
    got, state, _ = run_steps(
        tiny_config(optim={"grad_accum_steps": accum}), batches, mesh_shape=(2, 2, 2)
    )
    # Same global batch, summed in micro-batches then divided by the global weight: equal up
    # to f32 summation order (1e-5 relative).
    for m, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_no_recompilation_after_first_step():
    cfg = tiny_config()
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        fn = step.make_train_step(
            prog.graphdef,
            prog.tx,
            make_schedule(cfg.optim, 10),
            cfg.optim,
            cfg.mesh.rules,
            0,
            dropout=False,
        )
        counted = jax.jit(
            chex.assert_max_traces(fn, n=1),
            in_shardings=(prog.shardings, prog.batch_shardings),
            out_shardings=(prog.shardings, None),
            donate_argnums=0,
        )
        state = prog.init()
        for b in corpus_batches(4, 16, 64):  # real batches, donated state: no retrace
            state, _ = counted(state, prog.to_global(b))
    assert int(state.step) == 4


@pytest.mark.slow
def test_dropout_randomness_comes_from_fold_in_step():
    cfg = tiny_config(model={"dropout": 0.5}, optim={"warmup_steps": 0})
    batches = corpus_batches(2, 16, 64)
    a, _, _ = run_steps(cfg, batches)
    b, _, _ = run_steps(cfg, batches)
    c, _, _ = run_steps(
        tiny_config(seed=1, model={"dropout": 0.5}, optim={"warmup_steps": 0}), batches
    )
    assert [float(m["loss"]) for m in a] == [float(m["loss"]) for m in b]  # same seed: bitwise
    assert float(a[0]["loss"]) != float(c[0]["loss"])  # the seed reaches the dropout masks
    d, _, _ = run_steps(tiny_config(optim={"warmup_steps": 0}), batches)
    assert float(a[0]["loss"]) != float(d[0]["loss"])  # dropout is really on


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_trains_sharded(name):
    lr = {"adamw": 3e-3, "adafactor": 1e-2, "lion": 3e-4, "sgd": 0.3}[name]
    cfg = tiny_config(optim={"name": name, "lr": lr, "warmup_steps": 0, "schedule": "constant"})
    batch = corpus_batches(1, 16, 64)
    metrics, _, _ = run_steps(cfg, batch * 6, mesh_shape=(1, 4, 2))
    losses = [float(m["loss"]) for m in metrics]
    assert losses[-1] < losses[0] - 0.2, (name, losses)  # fits one repeated batch


def test_weight_decay_mask_skips_norms():
    cfg = OptimConfig(
        name="adamw", lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0.0
    )
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    tx = make_optimizer(cfg, 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert jnp.allclose(new["scale"], 1.0)  # no gradient, no decay
    assert jnp.allclose(new["w"], 1.0 - 0.1 * 0.5)  # decoupled decay: lr * wd * w


def test_clipping_bounds_the_update():
    cfg = OptimConfig(
        name="sgd",
        lr=1.0,
        momentum=0.0,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        clip_norm=1.0,
    )
    params = {"w": jnp.zeros((4,))}
    tx = make_optimizer(cfg, 10)
    updates, _ = tx.update({"w": jnp.full((4,), 100.0)}, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules(schedule):
    cfg = OptimConfig(
        lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2
    )
    lr = make_schedule(cfg, 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    end = float(lr(110))
    assert end == pytest.approx(1.0 if schedule == "constant" else 0.1, abs=1e-6)
    if schedule == "wsd":  # flat until the last 20% of the post-warmup steps
        assert float(lr(89)) == pytest.approx(1.0) and float(lr(100)) == pytest.approx(0.55)
    if schedule in ("cosine", "linear"):
        assert 0.1 < float(lr(60)) < 1.0
