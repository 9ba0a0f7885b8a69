"""DP-SGD: per-example clipping against a hand computation, noise of the right scale, epsilon
from dp-accounting, calibration to a target epsilon, sharded equal to one device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx
from helpers import clipped_mean, corpus_batches, run_steps

from bigjax import privacy
from bigjax.train import train
from bigjax.tree import flatten

# Plain SGD at lr 1, no momentum, decay or clipping: the update is minus the DP gradient.
SGD = {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "clip_norm": 0.0,
       "warmup_steps": 0, "schedule": "constant"}  # fmt: skip
ROWS = 8


def _cfg(noise: float, clip_norm: float = 0.05, optim=SGD, **groups):
    return tiny_config(
        optim=optim,
        data={"batch_size": ROWS, "seq_len": 32},
        privacy={"noise_multiplier": noise, "clip_norm": clip_norm, "num_examples": 1000},
        **groups,
    )


def _update(cfg, mesh=(1, 1, 1)):
    batch = corpus_batches(1, ROWS, 32)
    devices = jax.devices()[: int(np.prod(mesh))]
    (metrics,), state, prog = run_steps(cfg, batch, devices=devices, mesh_shape=mesh)
    before = flatten(jax.device_get(prog.init().params))
    after = flatten(jax.device_get(state.params))
    return {k: after[k] - before[k] for k in before}, metrics, batch[0], prog


def _reference(prog, batch, clip_norm):
    """Per-row gradients one at a time, each clipped to clip_norm, then the mean."""
    params = prog.init().params
    graphdef = prog.graphdef

    def row_loss(p, i):
        model = nnx.merge(graphdef, p)
        take = lambda k: jax.lax.dynamic_slice_in_dim(jnp.asarray(batch[k]), i, 1)  # noqa: E731
        logits = model(take("inputs"), take("segment_ids"), take("positions"))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, take("targets")[..., None], -1)[..., 0]
        return jnp.sum(nll * take("weights")) / jnp.maximum(jnp.sum(take("weights")), 1.0)

    # one row at a time, compiled once for all rows
    return clipped_mean(jax.jit(jax.grad(row_loss)), params, ROWS, clip_norm)


@pytest.mark.slow
def test_per_example_gradients_are_clipped_then_averaged():
    update, metrics, batch, prog = _update(_cfg(noise=0.0 + 1e-12))  # noise ~ 0
    ref, norms = _reference(prog, batch, 0.05)
    assert min(norms) > 0.05  # every row is clipped at this bound...
    assert float(metrics["dp_clipped"]) == 1.0  # ...and the step says so
    for k in ref:  # update = -lr * mean of clipped per-row gradients; f32: 1e-5
        np.testing.assert_allclose(-update[k], ref[k], rtol=1e-4, atol=1e-7, err_msg=k)
    # so the whole step's gradient is bounded by the clip norm
    assert np.sqrt(sum(float(np.sum(v**2)) for v in update.values())) <= 0.05 * (1 + 1e-5)


def test_per_example_clip_bounds_any_gradient():
    for scale in (1e-6, 1e-2, 1.0, 1e6):
        g = {"a": jnp.full((3, 4), scale), "b": {"c": jnp.full((5,), -scale)}}
        clipped, norm = privacy.clip(g, 0.5)
        assert float(optax.tree.norm(clipped)) <= 0.5 * (1 + 1e-6)
        if float(norm) <= 0.5:  # small gradients pass unchanged
            assert float(optax.tree.norm(clipped)) == pytest.approx(float(norm))


@pytest.mark.slow
def test_noise_has_the_calibrated_scale():
    clean, _, _, _ = _update(_cfg(noise=1e-12))
    noisy, _, _, _ = _update(_cfg(noise=2.0))
    # (noisy - clean) * B / (sigma * C) is standard normal in every coordinate
    z = np.concatenate([(noisy[k] - clean[k]).ravel() for k in clean]) * ROWS / (2.0 * 0.05)
    assert abs(z.std() - 1.0) < 0.01 and abs(z.mean()) < 0.01  # ~500k draws


@pytest.mark.slow
def test_reported_epsilon_equals_dp_accounting(tmp_path, capsys):
    import dp_accounting
    from dp_accounting import rdp

    cfg = _cfg(noise=1.1, num_steps=20, metrics={"log_every": 10})
    train(cfg, tmp_path / "dp")
    out = capsys.readouterr().out
    assert "step 20/20" in out and "| ε " in out and "(σ 1.1)" in out  # on the console too
    rows = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").open()]
    logged = {r["step"]: r["dp_epsilon"] for r in rows if "dp_epsilon" in r}
    assert sorted(logged) == [1, 10, 20]
    for steps, eps in logged.items():
        accountant = rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(ROWS / 1000, dp_accounting.GaussianDpEvent(1.1))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_noise_is_calibrated_to_a_target_epsilon():
    sigma = privacy.calibrate_noise(2.0, 0.01, 1000, 1e-5)
    eps = privacy.epsilon(privacy.Accounting(sigma, 0.01, 1e-5), 1000)
    assert 1.98 < eps <= 2.0  # the smallest noise that stays within the budget
    assert privacy.epsilon(privacy.Accounting(sigma * 0.9, 0.01, 1e-5), 1000) > 2.0


def test_pld_accounting_is_tighter_than_rdp_and_calibrates_to_less_noise():
    from dp_accounting.pld import pld_privacy_accountant

    rdp_eps = privacy.epsilon(privacy.Accounting(1.0, 0.01, 1e-5, "rdp"), 1000)
    pld_eps = privacy.epsilon(privacy.Accounting(1.0, 0.01, 1e-5, "pld"), 1000)
    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    direct.compose(privacy._event(1.0, 0.01, 1000))
    assert pld_eps == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert pld_eps < 0.9 * rdp_eps  # 1.83 vs 2.10: the same noise buys a smaller epsilon
    sigma_pld = privacy.calibrate_noise(2.0, 0.01, 1000, 1e-5, "pld")
    assert sigma_pld < privacy.calibrate_noise(2.0, 0.01, 1000, 1e-5, "rdp")
    assert 1.98 < privacy.epsilon(privacy.Accounting(sigma_pld, 0.01, 1e-5, "pld"), 1000) <= 2.0


@pytest.mark.slow
def test_dp_step_on_a_sharded_mesh_equals_one_device():
    cfg = _cfg(noise=1.0, optim={**SGD, "grad_accum_steps": 2})
    one, _, _, _ = _update(cfg)
    sharded, _, _, _ = _update(cfg, mesh=(2, 2, 2))
    for k in one:  # the same per-row clipping and the same noise draws; f32 order: 1e-5
        np.testing.assert_allclose(sharded[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)
