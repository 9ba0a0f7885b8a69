"""Objectives compose as plain functions: DP-SGD over a distilled and over an adversarial loss,
each against a direct per-row reference, and a loss modifier defined in this file alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx
from helpers import clipped_mean, corpus_batches

from bigjax import models, objectives, privacy, step
from bigjax.data.tokenizer import ByteTokenizer
from bigjax.mesh import make_mesh
from bigjax.objectives import PER_WEIGHT, Inputs, LossFn
from bigjax.objectives.distill import kl_sum
from bigjax.program import make_program, shapes
from bigjax.resources import Resources, Teacher
from bigjax.tree import flatten

# Plain SGD at lr 1: the update is minus the (DP) gradient.
SGD = {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "clip_norm": 0.0,
       "warmup_steps": 0, "schedule": "constant"}  # fmt: skip
ROWS, SEQ, CLIP = 4, 32, 0.05
DP = {"noise_multiplier": 1e-12, "clip_norm": CLIP, "num_examples": 1000}  # noise ~ 0


def _teacher(cfg, mesh):
    """A teacher of the student's shape, initialised from another seed (no file)."""
    graphdef, _ = models.abstract(cfg.model, cfg.mesh.rules)
    teacher = models.build(cfg.model, cfg.mesh.rules, seed=7)
    params = nnx.to_pure_dict(nnx.state(teacher))
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return Teacher(graphdef, params, shardings)


def _program(cfg, with_teacher=False):
    mesh = make_mesh(dataclasses.replace(cfg.mesh, shape=(1, 1, 1)), jax.devices()[:1])
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, shape=(1, 1, 1)))
    with jax.set_mesh(mesh):
        teacher = _teacher(cfg, mesh) if with_teacher else None
        accounting = privacy.Accounting(DP["noise_multiplier"], ROWS / 1000, 1e-5)
        res = Resources(ByteTokenizer(), accounting if cfg.privacy.enabled else None, teacher)
        return make_program(cfg, shapes(cfg, mesh), res), mesh


def _dp_update(cfg, with_teacher=False):
    batch = corpus_batches(1, ROWS, SEQ)[0]
    prog, mesh = _program(cfg, with_teacher)
    with jax.set_mesh(mesh):
        state0 = prog.init()
        before = flatten(jax.device_get(state0.params))
        state, metrics = prog.train_step(state0, prog.to_global(batch))
        after = flatten(jax.device_get(state.params))
    return {k: before[k] - after[k] for k in before}, metrics, batch, prog


def _row_reference(prog, batch, row_loss):
    """Each row's gradient of `row_loss(model, row)` alone, clipped to CLIP, then the mean."""
    params = prog.init().params

    def loss_of(p, i):
        row = {k: jax.lax.dynamic_slice_in_dim(jnp.asarray(v), i, 1) for k, v in batch.items()}
        return row_loss(nnx.merge(prog.graphdef, p), row)

    return clipped_mean(jax.jit(jax.grad(loss_of)), params, ROWS, CLIP)


def _nll(logits, row):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, row["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * row["weights"])


def _weight(row):
    return jnp.maximum(jnp.sum(row["weights"]), 1.0)


def _inputs(row):
    return row["inputs"], row["segment_ids"], row["positions"]


@pytest.mark.slow
def test_dp_sgd_over_a_distilled_loss_equals_per_row_reference():
    alpha, t = 0.5, 2.0
    distill = {"teacher": "in-memory", "alpha": alpha, "temperature": t}
    cfg = tiny_config(optim=SGD, data={"batch_size": ROWS, "seq_len": SEQ}, privacy=DP,
                      distill=distill)  # fmt: skip
    update, metrics, batch, prog = _dp_update(cfg, with_teacher=True)
    teacher = prog.resources.teacher
    teacher_model = nnx.merge(teacher.graphdef, teacher.params)

    def row_loss(model, row):  # (1 - a) * nll / w + a * T^2 KL(teacher || student) / w
        logits = model(*_inputs(row))
        t_logits = jax.lax.stop_gradient(teacher_model(*_inputs(row)))
        kl = kl_sum(logits, t_logits, row["weights"], t)
        return ((1 - alpha) * _nll(logits, row) + alpha * kl) / _weight(row)

    ref, norms = _row_reference(prog, batch, row_loss)
    assert min(norms) > CLIP and float(metrics["dp_clipped"]) == 1.0  # every row clipped
    assert float(metrics["distill_kl"]) > 0  # the teacher differs: the KL is in the loss
    for k in ref:  # f32, per-row grads summed in another order: 1e-4 relative
        np.testing.assert_allclose(update[k], ref[k], rtol=1e-4, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_dp_sgd_over_an_adversarial_loss_equals_per_row_reference():
    eps, w = 0.05, 0.5
    cfg = tiny_config(optim=SGD, data={"batch_size": ROWS, "seq_len": SEQ}, privacy=DP,
                      robust={"adversarial": "fgsm", "epsilon": eps, "weight": w})  # fmt: skip
    update, metrics, batch, prog = _dp_update(cfg)
    d_model = cfg.model.d_model

    def row_loss(model, row):  # FGSM on the row's own mean loss, delta held fixed
        def attacked(delta):
            return _nll(model(*_inputs(row), embed_delta=delta), row) / _weight(row)

        zero = jnp.zeros((1, SEQ, d_model), jnp.float32)
        delta = jax.lax.stop_gradient(eps * jnp.sign(jax.grad(attacked)(zero)))
        clean = _nll(model(*_inputs(row)), row) / _weight(row)
        return (1 - w) * clean + w * attacked(delta)

    ref, norms = _row_reference(prog, batch, row_loss)
    assert min(norms) > CLIP and float(metrics["adv_loss"]) > float(metrics["loss"])
    for k in ref:  # f32, per-row grads summed in another order: 1e-4 relative
        np.testing.assert_allclose(update[k], ref[k], rtol=1e-4, atol=1e-7, err_msg=k)


def logit_penalty(coef: float):
    """A loss modifier written here alone: coef * mean squared logit, reported as a metric."""

    def wrap(inner: LossFn) -> LossFn:
        def loss(model, x: Inputs):
            value, sums, logits = inner(model, x)
            sq = jnp.sum(jnp.mean(jnp.square(logits.astype(jnp.float32)), -1) * x.batch["weights"])
            return value + coef * sq / x.total_weight, {**sums, f"{PER_WEIGHT}logit_sq": sq}, logits

        return loss

    return wrap


@pytest.mark.slow
def test_a_loss_modifier_defined_in_a_test_file_alone():
    # under DP-SGD, which clips whatever loss it is given, the modifier's included
    cfg = tiny_config(optim=SGD, data={"batch_size": ROWS, "seq_len": SEQ}, privacy=DP)
    prog, mesh = _program(cfg)
    base = objectives.build(cfg, prog.resources, lambda path: True)
    batch = corpus_batches(1, ROWS, SEQ)[0]

    def step_with(objective):
        lr = optax.constant_schedule(1.0)
        fn = step.make_train_step(prog.graphdef, prog.tx, lr, cfg.optim, cfg.mesh.rules, 0,
                                  dropout=False, objective=objective)  # fmt: skip
        with jax.set_mesh(mesh):
            state, m = jax.jit(fn)(prog.init(), prog.to_global(batch))
        return flatten(jax.device_get(state.params)), m

    plain, plain_m = step_with(base)
    penalised, m = step_with(dataclasses.replace(base, loss=logit_penalty(1.0)(base.loss)))
    model = nnx.merge(prog.graphdef, prog.init().params)
    logits = model(*_inputs({k: jnp.asarray(v) for k, v in batch.items()}))
    want = jnp.sum(jnp.mean(jnp.square(logits), -1) * batch["weights"]) / batch["weights"].sum()
    # reported by its name alone, divided by the total weight (f32 sums: 1e-5)
    assert float(m["logit_sq"]) == pytest.approx(float(want), rel=1e-5)
    assert float(m["loss"]) == pytest.approx(float(plain_m["loss"]), rel=1e-6)  # same task loss
    assert "logit_sq" not in plain_m
    # and it trains: the penalty's gradient moves the output layer differently
    assert any(not np.allclose(plain[k], penalised[k]) for k in plain)
    assert float(m["dp_clipped"]) == 1.0  # every row's gradient, penalty included, clipped
