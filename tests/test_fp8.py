"""FP8 matmuls (bigjax/fp8.py): quantisation error within the formats' bounds, the product and
its gradients against float32, and training in fp8 on the dense projections only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from helpers import corpus_batches, run_steps

from bigjax import experts, fp8
from bigjax.moe import MoE, Routing

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


# uneven groups, one empty, and 3 rows past the last (they come out 0)
SIZES = jnp.asarray([50, 0, 70, 30, 20, 27], jnp.int32)
BATCHED = "becd,edfz->becfz"  # the capacity dispatch's expert product
# (fp8 product, float32 reference, operand shapes)
PRODUCTS = {
    "matmul": (fp8.matmul, jnp.matmul, ((32, 64), (64, 48))),
    "batched": (functools.partial(fp8.einsum, BATCHED), functools.partial(jnp.einsum, BATCHED),
                ((2, 4, 8, 64), (4, 64, 16, 2))),
    "grouped": (lambda x, w: experts.fp8_grouped_matmul(x, w, SIZES),
                lambda x, w: jax.lax.ragged_dot(x, w, SIZES), ((200, 64), (6, 64, 24))),
}  # fmt: skip


@pytest.mark.parametrize("name", PRODUCTS)
def test_fp8_products_and_their_gradients_against_float32(name):
    product, reference, (x_shape, w_shape) = PRODUCTS[name]
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape) * 0.1
    y, vjp = jax.vjp(product, x, w)
    g = jax.random.normal(kg, y.shape)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    want_y, ref_vjp = jax.vjp(reference, x, w)
    want_dx, want_dw = ref_vjp(g)
    # The same products of the operands' magnitudes bound the error: each term x_k w_k
    # carries at most (1 + 2^-4)^2 - 1 < 0.13 of its size (both operands e4m3); a gradient
    # term (1 + 2^-3)(1 + 2^-4) - 1 < 0.2 (e5m2 times e4m3)
    size_y, size_vjp = jax.vjp(reference, jnp.abs(x), jnp.abs(w))
    size_dx, size_dw = size_vjp(jnp.abs(g))
    for got, want, size, bound in ((y, want_y, size_y, 0.13), (dx, want_dx, size_dx, 0.2),
                                   (dw, want_dw, size_dw, 0.2)):  # fmt: skip
        err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
        assert np.all(err <= bound * np.asarray(size, np.float64))
    # and typically far less: a rounding error is uniform within +-2^-4 of its value, RMS
    # 2^-4 / sqrt(3) = 3.6 % per operand, 5.1 % for two; measured 3.8 % for the matmul
    rel = np.linalg.norm(np.asarray(y) - np.asarray(want_y)) / np.linalg.norm(want_y)
    assert rel < 0.06
    if name == "grouped":  # rows past the groups: nothing, and no gradient
        assert not np.any(np.asarray(y)[-3:]) and not np.any(np.asarray(dx)[-3:])


@pytest.mark.parametrize("ragged", [False, True])
def test_grouped_weight_gradient_both_ways_equals_autodiff(ragged):
    # `ragged`: XLA's ragged_dot_general (what TPUs run) on this CPU; else the tiled scan
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(200, 16)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(200, 12)), jnp.float32)
    w = jnp.zeros((6, 16, 12))
    _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(x, w, SIZES), w)
    (want,) = vjp(g)
    got = experts.grouped_weight_grad(x, g, SIZES, ragged=ragged)
    # f32 sums of up to 70 products of ~1: 1e-5 of them
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.any(np.asarray(got)[1])  # the empty group


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_moe_experts_multiply_in_fp8_and_decode_in_full_precision(dispatch):
    def layer(fp8_on):
        with nnx.use_eager_sharding(False):  # a bare layer, no mesh
            return MoE(32, 48, Routing(4, 2, 0.0, dispatch=dispatch, shared_experts=1),
                       rngs=nnx.Rngs(params=0), param_dtype=jnp.float32, dtype=jnp.float32,
                       rules=(), fp8=fp8_on)  # fmt: skip

    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    valid = jnp.ones((2, 16), bool)
    want, _ = layer(False)(x, valid)
    got, _ = layer(True)(x, valid)
    # experts and shared expert in fp8, the router not (the same choices): three products
    # in a row of ~5 % RMS each (above) stay well under 15 %
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert 0.0 < rel < 0.15
    jaxpr = str(jax.make_jaxpr(lambda x: layer(True)(x, valid))(x))
    assert "f8_e4m3fn" in jaxpr and "f8_e5m2" not in jaxpr  # e5m2: the backward only
    decoded, _ = layer(True)(x, valid, decode=True)  # cached decoding: full precision
    np.testing.assert_array_equal(decoded, want)


# (model, mesh group, mesh shape, steps, warm-up): the dense projections on fsdp 4 x tensor 2;
# a dropless MoE, every projection and expert in fp8, experts over the expert axis (4) with
# fsdp 2 beside
TRAINED = {
    "dense": ({}, {}, (1, 4, 2), 30, 5),
    "moe": ({"num_experts": 8, "experts_per_token": 2, "d_ff": 32, "moe_dispatch": "dropless"},
            {"rules": {"experts": ("expert",)}}, (1, 1, 2, 1, 1, 4), 12, 3),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_fp8_training_tracks_float32_and_keeps_parameters_in_their_dtype(name):
    model, mesh, shape, steps, warmup = TRAINED[name]
    batches = corpus_batches(steps, 16, 64)
    base = dict(optim={"lr": 3e-3, "warmup_steps": warmup})
    ref, _, _ = run_steps(tiny_config(model={"size": "tiny", **model}, **base), batches,
                          mesh_shape=(1, 1, 1), devices=jax.devices()[:1])  # fmt: skip
    cfg = tiny_config(model={"size": "tiny", **model, "matmul_precision": "fp8"}, mesh=mesh,
                      **base)  # fmt: skip
    got, state, prog = run_steps(cfg, batches, mesh_shape=shape)
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
    assert ("all_to_all" in hlo) == bool(model)  # the experts' tokens exchanged


@pytest.mark.parametrize("moe", [False, True])
def test_plan_counts_the_fp8_share_at_the_fp8_peak(moe):
    from bigjax import plan

    model = {"size": "tiny", "matmul_precision": "fp8"}
    if moe:  # the active experts (2 routed + 1 shared) are in fp8, the router is not
        model |= {"num_experts": 8, "experts_per_token": 2, "moe_shared_experts": 1}
    cfg = tiny_config(model=model)
    m = cfg.model
    D, F, K = m.d_model, m.d_ff, m.dim_per_head
    attn = 2 * D * m.num_heads * K + 2 * D * m.kv_heads * K
    mlp = 3 * D * F * (3 if moe else 1)
    fp8_per_token = 6 * m.num_layers * (attn + mlp)  # forward + two backward products
    h100 = plan.gpu_target(8, "H100")
    a = plan.plan(cfg, h100, 0.4, compile_=False)["analytic"]
    tokens = cfg.data.batch_size * cfg.data.seq_len
    assert a["fp8"]["share"] == pytest.approx(fp8_per_token * tokens / a["flops_per_step"])
    # the rest at the bf16 peak, the fp8 share at twice it
    fp8_s = fp8_per_token * tokens / 1979e12
    device_s = (a["flops_per_step"] - fp8_per_token * tokens) / 989e12 + fp8_s
    assert a["step_time_s"] == pytest.approx(device_s / (8 * 0.4))
    # an A100 has no fp8 units: the plan says so and counts those FLOPs at the bf16 rate
    a100 = plan.plan(cfg, plan.gpu_target(8, "A100"), 0.4, compile_=False)
    assert a100["analytic"]["step_time_s"] == pytest.approx(
        a["flops_per_step"] / 312e12 / (8 * 0.4)
    )
    assert "no fp8 matrix units" in plan.render(a100)
