"""Mixture of experts: routing against a per-token reference, capacity and drops, the
load-balancing loss, training sharded across devices (experts split) equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from helpers import corpus_batches, run_steps

from bigjax import models
from bigjax.generate import Sampling, generate
from bigjax.moe import MoE
from bigjax.sharding import tree_specs

MOE = dict(num_experts=4, experts_per_token=2)


def _layer(capacity_factor: float, top_k: int = 2, seed: int = 0) -> MoE:
    with nnx.use_eager_sharding(False):  # a bare layer, no mesh: as models.build does
        return MoE(32, 48, 4, top_k, capacity_factor, rngs=nnx.Rngs(params=seed),
               param_dtype=jnp.float32, dtype=jnp.float32, rules=())  # fmt: skip


def _reference(layer: MoE, x_BLD: np.ndarray) -> np.ndarray:
    """Token by token: the top-k experts by router probability, weights renormalised."""
    router = np.asarray(layer.router_DE[...])
    gate_up, down = np.asarray(layer.gate_up_EDFC[...]), np.asarray(layer.down_EFD[...])
    out = np.zeros_like(x_BLD)
    for b, t in np.ndindex(*x_BLD.shape[:2]):
        x = x_BLD[b, t]
        logits = x @ router
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: layer.top_k]
        weights = probs[top] / probs[top].sum() if layer.top_k > 1 else probs[top]
        for e, w in zip(top, weights, strict=True):
            h = x @ gate_up[e].reshape(32, -1)
            h = h.reshape(48, 2)
            act = h[:, 0] / (1 + np.exp(-h[:, 0])) * h[:, 1]
            out[b, t] += w * (act @ down[e])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_routing_equals_a_per_token_reference(top_k):
    layer = _layer(capacity_factor=0.0, top_k=top_k)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 12, 32)))
    out, aux = layer(jnp.asarray(x), jnp.ones((2, 12), bool))
    # f32; einsum vs numpy summation order only (values ~1): 1e-5
    np.testing.assert_allclose(out, _reference(layer, x), rtol=1e-5, atol=1e-5)
    assert float(aux["dropped"]) == 0.0


def test_capacity_drops_the_overflow_and_says_how_much():
    layer = _layer(capacity_factor=0.5)  # C = ceil(0.5 * 12 * 2 / 4) = 3 slots per expert
    assert layer.capacity(12) == 3
    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    # Bias every token's router towards experts 0 and 1: they overflow.
    # Every token gets the same sign pattern s, and the router adds 5 * s to experts 0 and 1,
    # so all 24 assignments of a row go to those two experts.
    s = jnp.sign(x[0, 0])
    layer.router_DE[...] = layer.router_DE[...].at[:, :2].add(5.0 * s[:, None])
    x = jnp.abs(x) * s
    out, aux = layer(x, jnp.ones((2, 12), bool))
    # 3 slots in each of the 2 experts: 6 of a row's 24 assignments survive.
    assert float(aux["dropped"]) == pytest.approx(18 / 24)
    # The first 3 tokens of a row got both their experts; the later ones none: exactly zero.
    assert np.all(np.abs(np.asarray(out[:, :3])) > 0)
    assert np.all(np.asarray(out[:, 3:]) == 0.0)


@pytest.mark.slow
def test_balance_loss_is_one_when_uniform_and_grows_when_skewed():
    layer = _layer(capacity_factor=0.0)
    x = jax.random.normal(jax.random.key(3), (2, 12, 32))
    valid = jnp.ones((2, 12), bool)
    layer.router_DE[...] = jnp.zeros_like(layer.router_DE[...])  # uniform probabilities
    _, aux = layer(x, valid)
    assert float(aux["balance_loss"]) == pytest.approx(1.0, rel=1e-6)  # E * sum f_e / E
    layer.router_DE[...] = layer.router_DE[...].at[:, 0].set(jnp.sign(x[0, 0]))
    x = jnp.abs(x) * jnp.sign(x[0, 0])  # every token prefers expert 0
    _, aux = layer(x, valid)
    assert float(aux["balance_loss"]) > 1.5
    # Padding does not count: masking half the tokens changes nothing for equal halves.
    x2 = jnp.concatenate([x, x], axis=1)
    _, aux2 = layer(x2, jnp.concatenate([valid, jnp.zeros_like(valid)], axis=1))
    assert float(aux2["balance_loss"]) == pytest.approx(float(aux["balance_loss"]), rel=1e-5)


@pytest.mark.slow
def test_train_step_adds_the_weighted_balance_loss_and_logs_moe_metrics():
    cfg = tiny_config(model={"size": "tiny", **MOE, "moe_aux_weight": 0.5})
    (metrics,), _, _ = run_steps(cfg, corpus_batches(1, 16, 64)[:1], mesh_shape=(1, 1, 1),
                                 devices=jax.devices()[:1])  # fmt: skip
    assert {"moe_balance_loss", "moe_dropped", "aux_loss"} <= set(metrics)
    assert float(metrics["aux_loss"]) == pytest.approx(0.5 * float(metrics["moe_balance_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(1, 4, 2), (2, 2, 2)])
def test_sharded_moe_training_equals_one_device_with_experts_split(mesh):
    cfg = tiny_config(model={"size": "tiny", **MOE}, optim={"grad_accum_steps": 2})
    batches = corpus_batches(3, 16, 64)
    ref, _, _ = run_steps(cfg, batches, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    got, state, prog = run_steps(cfg, batches, mesh_shape=mesh)
    for a, b in zip(got, ref, strict=True):
        # Same data and init; only reduction order differs across devices: f32, 1e-5.
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["moe_balance_loss"], b["moe_balance_loss"], rtol=1e-5)
    # Expert weights [N, E, D, F, 2] are split by expert over fsdp: E / fsdp experts each.
    fsdp = mesh[1]
    w = state.params["blocks"]["mlp"]["gate_up_EDFC"]
    assert w.addressable_shards[0].data.shape[1] == 4 // fsdp
    _, abstract = models.abstract(cfg.model, cfg.mesh.rules)
    spec = tree_specs(abstract, {"data": mesh[0], "fsdp": fsdp, "tensor": mesh[2]},
                      cfg.mesh.rules)["blocks"]["mlp"]["gate_up_EDFC"]  # fmt: skip
    assert spec[1] == "fsdp"
    del prog


@pytest.mark.slow
def test_cached_generation_equals_uncached_argmax_for_moe():
    cfg = tiny_config(model={"size": "tiny", **MOE, "moe_capacity_factor": 0.0})
    m = models.build(cfg.model, cfg.mesh.rules, seed=0)
    graphdef, params = nnx.split(m)
    prompts = [[5, 17, 42, 99], [7, 8]]
    out = generate(graphdef, params, prompts, Sampling(max_new_tokens=6))
    for prompt, new in zip(prompts, out, strict=True):
        t = jnp.asarray([prompt + new])
        logits = m(t, jnp.ones_like(t), jnp.arange(t.shape[1])[None])[0]
        assert new == np.argmax(logits[len(prompt) - 1 : -1], axis=-1).tolist()
