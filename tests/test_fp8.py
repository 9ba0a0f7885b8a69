"""FP8 matmuls (bigjax/fp8.py): quantisation error within the formats' bounds, the product and
its gradients against float32, and training in fp8 on the dense projections only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from helpers import corpus_batches, run_steps

from bigjax import fp8

# Round-to-nearest keeps a normal number within half a unit in the last place: 2^-4 of it
# for e4m3 (3 mantissa bits), 2^-3 for e5m2 (2 bits).
REL = {fp8.E4M3: 2.0**-4, fp8.E5M2: 2.0**-3}


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_quantize_round_trip_within_half_an_ulp(dtype):
    x = jax.random.normal(jax.random.key(0), (64, 48)) * 3.0
    q, factor = fp8.quantize(x, dtype)
    assert q.dtype == dtype
    # the largest magnitude lands on the format's largest value
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == float(jnp.finfo(dtype).max)
    back = np.asarray(fp8.dequantize(q, factor, jnp.float32))
    x = np.asarray(x)
    normal = np.abs(x) > np.abs(x).max() / 1000  # far above either format's subnormals
    np.testing.assert_array_less(np.abs(back - x)[normal], REL[dtype] * np.abs(x)[normal] + 1e-9)
    # all zeros: factor 1, zeros back (no division by a zero maximum)
    q0, f0 = fp8.quantize(jnp.zeros((3, 3)), dtype)
    assert float(f0) == 1.0 and not np.any(np.asarray(q0.astype(jnp.float32)))


def test_fp8_matmul_and_its_gradients_against_float32():
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (32, 64))
    w = jax.random.normal(kw, (64, 48)) * 0.1
    g = jax.random.normal(kg, (32, 48))
    y, vjp = jax.vjp(fp8.matmul, x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    ax, aw, ag = (np.abs(np.asarray(a, np.float64)) for a in (x, w, g))
    # each term x_k w_k carries at most (1 + 2^-4)^2 - 1 < 0.13 of its size (both operands
    # e4m3); a gradient term (1 + 2^-3)(1 + 2^-4) - 1 < 0.2 (e5m2 times e4m3)
    np.testing.assert_array_less(np.abs(np.asarray(y) - np.asarray(x @ w)), 0.13 * ax @ aw)
    np.testing.assert_array_less(np.abs(np.asarray(dx) - np.asarray(g @ w.T)), 0.2 * ag @ aw.T)
    np.testing.assert_array_less(np.abs(np.asarray(dw) - np.asarray(x.T @ g)), 0.2 * ax.T @ ag)
    # and typically far less: a rounding error is uniform within +-2^-4 of its value, RMS
    # 2^-4 / sqrt(3) = 3.6 % per operand, 5.1 % for two; measured 3.8 % here
    rel = np.linalg.norm(np.asarray(y) - np.asarray(x @ w)) / np.linalg.norm(np.asarray(x @ w))
    assert rel < 0.06


@pytest.mark.slow
def test_fp8_training_tracks_float32_and_keeps_parameters_in_their_dtype():
    batches = corpus_batches(30, 16, 64)
    base = dict(optim={"lr": 3e-3, "warmup_steps": 5})
    ref, _, _ = run_steps(tiny_config(**base), batches, mesh_shape=(1, 1, 1),
                          devices=jax.devices()[:1])  # fmt: skip
    cfg = tiny_config(model={"size": "tiny", "matmul_precision": "fp8"}, **base)
    got, state, prog = run_steps(cfg, batches, mesh_shape=(1, 4, 2))
    ref_loss, got_loss = (np.array([float(m["loss"]) for m in r]) for r in (ref, got))
    assert got_loss[-1] < got_loss[0] - 1.0  # it learns
    # fp8 rounding (~2-3 % per product, above) perturbs the updates, not the optimum: over
    # 30 steps of a loss falling from ~6.3 to ~4.5 it stays within 2 % of float32's
    np.testing.assert_allclose(got_loss, ref_loss, rtol=0.02)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    state_in, batch_in = prog.abstract_inputs()
    with jax.set_mesh(prog.mesh):
        hlo = prog.train_step.lower(state_in, batch_in).as_text()
    assert "f8E4M3FN" in hlo and "f8E5M2" in hlo  # forward and backward really in fp8
