"""Mixture of experts: routing against a per-token reference, capacity and drops, the
load-balancing loss, training sharded across devices (experts split) equal to one device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx
from helpers import assert_one_line_config_error, corpus_batches, run_steps

from bigjax import experts, models
from bigjax.config import DEFAULT_RULES, MESH_AXES, MeshConfig, OptimConfig, full_mesh_shape
from bigjax.generate import Sampling, generate
from bigjax.mesh import make_mesh
from bigjax.moe import MoE, Routing
from bigjax.optim import make_optimizer
from bigjax.sharding import tree_specs

MOE = dict(num_experts=4, experts_per_token=2)


def _layer(capacity_factor: float, top_k: int = 2, seed: int = 0, **routing) -> MoE:
    with nnx.use_eager_sharding(False):  # a bare layer, no mesh: as models.build does
        return MoE(32, 48, Routing(routing.pop("num_experts", 4), top_k, capacity_factor,
                                   **routing),
                   rngs=nnx.Rngs(params=seed), param_dtype=jnp.float32, dtype=jnp.float32,
                   rules=())  # fmt: skip


def _swiglu(x: np.ndarray, gate_up_DFC: np.ndarray, down_FD: np.ndarray) -> np.ndarray:
    h = np.einsum("d,dfc->fc", x, gate_up_DFC)
    return (h[:, 0] / (1 + np.exp(-h[:, 0])) * h[:, 1]) @ down_FD


def _reference(layer: MoE, x_BLD: np.ndarray, valid_BL: np.ndarray | None = None) -> np.ndarray:
    """Token by token, in float64: the top-k experts by router score (+ the balancing bias),
    their scores as weights (renormalised for softmax k > 1 and sigmoid, scaled), plus the
    shared experts; padding gets no routed expert."""
    r = layer.routing
    f64 = lambda a: np.asarray(a[...], np.float64)  # noqa: E731
    router, gate_up, down = f64(layer.router_DE), f64(layer.gate_up_EDFC), f64(layer.down_EFD)
    bias = f64(layer.router_bias_E) if r.bias_rate > 0 else np.zeros(r.num_experts)
    valid_BL = np.ones(x_BLD.shape[:2], bool) if valid_BL is None else valid_BL
    out = np.zeros(x_BLD.shape, np.float64)
    for b, t in np.ndindex(*x_BLD.shape[:2]):
        x = x_BLD[b, t].astype(np.float64)
        if r.shared_experts:
            out[b, t] += _swiglu(x, f64(layer.shared.gate_up_DFC), f64(layer.shared.down_FD))
        if not valid_BL[b, t]:
            continue
        logits = x @ router
        if r.gating == "softmax":
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
        else:
            probs = 1 / (1 + np.exp(-logits))
        top = np.argsort(-(probs + bias))[: r.top_k]
        weights = probs[top]
        if r.top_k > 1 or r.gating == "sigmoid":
            weights = weights / weights.sum()
        for e, w in zip(top, weights * r.route_scale, strict=True):
            out[b, t] += w * _swiglu(x, gate_up[e], down[e])
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
# FSDP 4 with tensor 2 (data 2 beside the EP group: the dropless training test below)
@pytest.mark.parametrize("mesh", [(1, 4, 2)])
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


ROUTINGS = {
    "softmax_top1": dict(top_k=1),
    "softmax_top2": dict(top_k=2),
    # DeepSeek-V3 style: 8 fine-grained experts, sigmoid gates scaled, a shared expert, a
    # balancing bias (set by hand below, so that it changes the choice)
    "sigmoid_shared_biased": dict(top_k=3, num_experts=8, gating="sigmoid", route_scale=2.5,
                                  shared_experts=1, bias_rate=0.01),
}  # fmt: skip


@pytest.mark.parametrize("name", ROUTINGS)
def test_dropless_layer_equals_a_per_token_reference(name):
    routing = dict(ROUTINGS[name])
    layer = _layer(0.0, routing.pop("top_k"), dispatch="dropless", **routing)
    if layer.routing.bias_rate:
        layer.router_bias_E[...] = jnp.linspace(-0.3, 0.3, layer.routing.num_experts)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 12, 32)))
    valid = np.ones((2, 12), bool)
    valid[1, 9:] = False  # padding: no routed expert, not in the load
    out, aux = layer(jnp.asarray(x), jnp.asarray(valid))
    # f32 against float64, values ~1, sums of <= 48 products: 2e-5
    np.testing.assert_allclose(out, _reference(layer, x, valid), rtol=2e-5, atol=2e-5)
    assert float(aux["dropped"]) == 0.0
    # the capacity dispatch with room for every token computes the same
    capacity = _layer(0.0, layer.top_k, **{**routing, "dispatch": "capacity"})
    nnx.update(capacity, nnx.state(layer))
    np.testing.assert_allclose(capacity(jnp.asarray(x), jnp.asarray(valid))[0], out, atol=2e-5)


def _with_bias(layer: MoE, bias_E: jax.Array) -> MoE:
    """A copy of `layer` (in the current trace) with its balancing bias set to `bias_E`."""
    copy = nnx.merge(*nnx.split(layer), copy=True)
    copy.router_bias_E[...] = bias_E
    return copy


def test_router_z_loss_and_the_balancing_bias_signal():
    layer = _layer(0.0, 2, dispatch="dropless", z_weight=0.01, bias_rate=0.001)
    x = jax.random.normal(jax.random.key(4), (2, 12, 32))
    valid = jnp.ones((2, 12), bool).at[0, 10:].set(False)

    def router_loss(bias_E):
        return _with_bias(layer, bias_E)(x, valid)[1]["router_loss"]

    bias = jnp.zeros((4,))
    loss, grad_E = jax.value_and_grad(router_loss)(bias)
    # the value is the z-loss alone: the bias term is worth 0
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router_DE[...], np.float64)
    z = np.log(np.exp(logits).sum(-1)) ** 2
    np.testing.assert_allclose(loss, 0.01 * z[np.asarray(valid)].mean(), rtol=1e-5)
    # its gradient is the load imbalance: each expert's share of the real tokens' choices
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[..., :2][np.asarray(valid)]
    share = np.bincount(top.ravel(), minlength=4) / top.size
    np.testing.assert_allclose(grad_E, share - 0.25, atol=1e-6)
    # the optimizer steps the bias by -rate * sign(imbalance), whatever the learning rate
    tx = make_optimizer(OptimConfig(lr=3.0), 10, router_bias_rate=0.001)
    params = {"mlp": {"router_bias_E": bias, "w": jnp.ones(3)}}
    grads = {"mlp": {"router_bias_E": grad_E, "w": jnp.ones(3)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["mlp"]["router_bias_E"], -0.001 * np.sign(share - 0.25))


def _skewed(x_BLD, num_experts, k):
    """Expert choices [B, L, k] that send most assignments to expert 0."""
    rng = np.random.default_rng(0)
    e = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(x_BLD[..., 0].size)])
    e = e.reshape(*x_BLD.shape[:2], k)
    e[: e.shape[0] // 2, :, 0] = 0  # half the rows put their first choice on expert 0
    e[: e.shape[0] // 2, :, 1:] = np.where(e[: e.shape[0] // 2, :, 1:] == 0, 1,
                                             e[: e.shape[0] // 2, :, 1:])  # fmt: skip
    return e.astype(np.int32)


def _expert_weights(num_experts, d, f, seed=0):
    rng = np.random.default_rng(seed)
    gate_up = (rng.normal(size=(num_experts, d, f, 2)) / np.sqrt(d)).astype(np.float32)
    down = (rng.normal(size=(num_experts, f, d)) / np.sqrt(f)).astype(np.float32)
    return gate_up, down


@pytest.mark.parametrize(
    "shape, experts_over",
    # (data, stage, fsdp, context, tensor, expert), and the default `experts` rule (None:
    # the expert axis, then fsdp while E divides): EP over the expert axis 2 and 8; expert 4
    # alone with fsdp 2 beside (2-D: E over expert, embed over fsdp) and under the default
    # rule (EP 8 over both); with data and tensor; with context 2. Experts split over fsdp
    # 2, 4, 8; with tensor-split experts, data parallel beside, and tokens split over
    # context; an EP group over data (FSDP beside it) and one of two axes.
    [((1, 1, 1, 1, 1, 2), None), ((1, 1, 1, 1, 1, 8), None), ((1, 1, 2, 1, 1, 4), ("expert",)),
     ((1, 1, 2, 1, 1, 4), None), ((2, 1, 1, 1, 2, 2), None), ((1, 1, 1, 2, 1, 4), None),
     ((1, 1, 2, 1, 1), ("fsdp",)), ((1, 1, 4, 1, 1), ("fsdp",)), ((1, 1, 8, 1, 1), ("fsdp",)),
     ((2, 1, 2, 1, 2), ("fsdp",)), ((1, 1, 2, 2, 2), ("fsdp",)), ((4, 1, 2, 1, 1), ("data",)),
     ((2, 1, 2, 1, 2), ("data", "fsdp"))],
)  # fmt: skip
def test_expert_parallel_dropless_equals_one_device(shape, experts_over):
    rules = DEFAULT_RULES
    if experts_over:
        rules = tuple((dict(DEFAULT_RULES) | {"experts": experts_over}).items())
    b, length, d, e, f, k = 8, 16, 32, 8, 24, 2
    x = np.asarray(jax.random.normal(jax.random.key(0), (b, length, d)))
    chosen = _skewed(x, e, k)
    weight = np.asarray(jax.random.uniform(jax.random.key(1), (b, length, k)))
    gate_up, down = _expert_weights(e, d, f)

    def loss(gate_up, x):
        out, dropped = experts.dropless(x, chosen, weight, gate_up, down, rules=rules)
        return jnp.sum(out * jnp.cos(out)), (out, dropped)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (ref_gu, ref_x), (ref, _) = jax.jit(grad)(gate_up, x)
    with jax.set_mesh(make_mesh(MeshConfig(shape=shape), jax.devices()[: math.prod(shape)])):
        (gu, gx), (out, dropped) = jax.jit(grad)(gate_up, x)
    assert float(dropped) == 0.0  # the default buffers take every assignment
    # f32, the same sums split over devices (the down projection's over tensor): 1e-5
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gu, ref_gu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, ref_x, rtol=1e-5, atol=1e-5)


def test_a_bounded_exchange_drops_and_counts_the_overflow():
    b, length, d, e, f, k = 4, 8, 16, 4, 8, 1
    x = np.asarray(jax.random.normal(jax.random.key(0), (b, length, d)))
    gate_up, down = _expert_weights(e, d, f)
    chosen = np.zeros((b, length, k), np.int32)  # every token to expert 0, on device 0
    weight = np.ones((b, length, k), np.float32)
    with jax.set_mesh(make_mesh(MeshConfig(shape=(1, 1, 4, 1, 1)), jax.devices()[:4])):
        run = lambda: experts.dropless(  # noqa: E731
            x, chosen, weight, gate_up, down, rules=DEFAULT_RULES, exchange_factor=1.0
        )
        out, dropped = jax.jit(run)()
    # each device holds one row of 8 assignments; factor 1 gives 8 / 4 = 2 slots per
    # destination: 6 of each device's 8 assignments are dropped, 24 in all
    assert experts.exchange_slots(8, 4, 1.0) == 2
    assert float(dropped) == 24.0
    out = np.asarray(out)
    assert np.all(np.abs(out[:, :2]).sum(-1) > 0) and np.all(out[:, 2:] == 0.0)


DROPLESS = dict(num_experts=8, experts_per_token=2, moe_dispatch="dropless", d_ff=32,
                moe_gating="sigmoid", moe_shared_experts=1, moe_bias_rate=0.01,
                moe_z_weight=0.001)  # fmt: skip


@pytest.mark.slow
# EP 4 over the expert axis with fsdp 2 beside, E over `expert` and embed over `fsdp` (2-D);
# EP 2 over fsdp with data 2 and tensor 2; EP 4 over fsdp inside each of 2 pipeline stages
@pytest.mark.parametrize(
    ("shape", "experts_over"),
    [((1, 1, 2, 1, 1, 4), ("expert",)), ((2, 1, 2, 1, 2), ("fsdp",)), ((1, 2, 4, 1, 1), None)],
)  # fmt: skip
def test_dropless_training_on_expert_parallel_meshes_equals_one_device(shape, experts_over):
    rules = {"experts": experts_over} if experts_over else {}
    cfg = tiny_config(model={"size": "tiny", **DROPLESS}, optim={"grad_accum_steps": 2},
                      mesh={"rules": rules})  # fmt: skip
    batches = corpus_batches(3, 16, 64)
    # Balance statistics are per micro-batch (max, f_e * P_e are not linear in the rows): 2
    # stages cut each of the 2 micro-batches in 2, the rows 4 accumulation micro-batches hold
    accum = 2 * shape[1]
    ref_cfg = tiny_config(model={"size": "tiny", **DROPLESS}, optim={"grad_accum_steps": accum})
    ref, ref_state, _ = run_steps(ref_cfg, batches, mesh_shape=(1, 1, 1),
                                  devices=jax.devices()[:1])  # fmt: skip
    got, state, prog = run_steps(cfg, batches, mesh_shape=shape)
    for a, b in zip(got, ref, strict=True):
        # Same data and init; reduction order differs across devices: f32, 1e-5 / 1e-4
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
        per_layer = ("moe_load_max/layer_0", "moe_load_max/layer_1") if shape[1] == 1 else ()
        for key in ("moe_load_max", "moe_balance_loss", *per_layer):  # pipeline: means only
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    # Adam divides each gradient by its own RMS: an element whose gradient is at rounding
    # level moves by a noise-driven share of lr (3e-3) a step. On an AMD EPYC (XLA:CPU's
    # other codegen) one element of 65,536 ended 1.9e-5 apart; a wrong shard or route moves
    # the loss (rtol 1e-5 above) and whole tensors by ~lr
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    assert prog.train_step._cache_size() == 1  # no recompile across steps
    # the balancing biases moved by exactly the rate, each step
    bias = np.asarray(state.params["blocks"]["mlp"]["router_bias_E"])
    steps = np.round(np.abs(bias) / 0.01, 4)
    assert np.all(steps == np.round(steps)) and np.all(steps <= 3)
    # experts really split: E / EP of them per device (embed over fsdp where the experts are
    # over the expert axis alone), and an all-to-all in the step
    sizes = dict(zip(MESH_AXES, full_mesh_shape(shape), strict=True))
    ep_axes = tuple(a for a in experts_over or ("expert", "fsdp") if sizes[a] > 1)
    w = state.params["blocks"]["mlp"]["gate_up_EDFC"]
    layers, experts_spec, embed_spec = w.sharding.spec[:3]
    assert (layers, experts_spec) == ("stage" if sizes["stage"] > 1 else None, ep_axes[0])
    assert embed_spec == ("fsdp" if experts_over == ("expert",) else None)
    ep = math.prod(sizes[a] for a in ep_axes)
    assert w.addressable_shards[0].data.shape[1] == 8 // ep
    state_in, batch_in = prog.abstract_inputs()
    with jax.set_mesh(prog.mesh):
        hlo = prog.train_step.lower(state_in, batch_in).compile().as_text()
    assert "all-to-all" in hlo


def test_the_balancing_bias_evens_a_collapsed_router():
    """A router that sends nearly every token to expert 0: the bias's sign steps alone (no
    balance loss, router weights fixed) spread the load over the experts."""
    layer = _layer(0.0, 1, num_experts=8, dispatch="dropless", bias_rate=0.01)
    # tokens share a direction m that the router reads as "expert 0"
    m = jnp.ones(32) / jnp.sqrt(32.0)
    x = jax.random.normal(jax.random.key(5), (4, 16, 32)) + 2 * m
    layer.router_DE[...] = layer.router_DE[...].at[:, 0].add(m)
    valid = jnp.ones((4, 16), bool)
    tx = make_optimizer(OptimConfig(), 100, router_bias_rate=0.01)
    bias = {"router_bias_E": jnp.zeros((8,))}
    opt_state = tx.init(bias)

    @jax.jit
    def step(bias, opt_state):
        def loss(bias):
            _, aux = _with_bias(layer, bias["router_bias_E"])(x, valid)
            return aux["router_loss"], aux["load_max"]

        (_, load_max), grads = jax.value_and_grad(loss, has_aux=True)(bias)
        updates, opt_state = tx.update(grads, opt_state, bias)
        return optax.apply_updates(bias, updates), opt_state, load_max

    loads = []
    for _ in range(60):
        bias, opt_state, load_max = step(bias, opt_state)
        loads.append(float(load_max))
    assert loads[0] > 4  # 8 experts, over half the tokens on one: E * max share > 4
    assert max(loads[-10:]) < 1.6  # near even (1.0; 64 tokens: 1.25 is 10 on one expert)
    assert float(bias["router_bias_E"][0]) < 0  # the overloaded expert was pushed down


def test_dropless_needs_experts_split_over_token_axes():
    rules = dict(DEFAULT_RULES) | {"experts": ("tensor",)}
    assert_one_line_config_error(
        {"model": {"size": "tiny", **DROPLESS},
         "mesh": {"shape": (1, 1, 4, 1, 2), "rules": tuple(rules.items())}},
        "mesh.rules.experts",
    )  # fmt: skip


# the GPU's tile of 1024 rows: over more rows than one tile, and over fewer (one short tile)
TILE_CASES = [(300, 5, 128), (64, 64, 16), (7, 3, 4), (2100, 16, 1024), (300, 5, 1024)]


@pytest.mark.parametrize("rows, groups, tile", TILE_CASES)
def test_tiled_grouped_matmul_equals_ragged_dot(rows, groups, tile):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.normal(size=(rows, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(groups, 8, 6)), jnp.float32)
    # uneven groups, some empty, and rows past the last group (they must come out 0)
    sizes = jnp.asarray(rng.multinomial(rows - 3, rng.dirichlet(np.ones(groups))), jnp.int32)

    def both(f):
        out = f(x, w, sizes)
        grads = jax.grad(lambda x, w: jnp.sum(f(x, w, sizes) ** 2), argnums=(0, 1))(x, w)
        return out, *grads

    tiled = lambda x, w, s: experts.tiled_grouped_matmul(x, w, s, tile)  # noqa: E731
    for got, want in zip(both(tiled), both(jax.lax.ragged_dot), strict=True):
        # f32 sums of 8 (forward) / up to 2100 (weight gradient) products of unit normals:
        # ~1e-7 relative rounding each, well inside 1e-5 relative of the ~10-1000 entries
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(both(tiled)[0])[-3:] == 0.0)


@pytest.mark.parametrize("batch", [1, 2])  # one stage a device (the pipeline), or a map
def test_the_ragged_path_under_vmap_equals_ragged_dot_per_element(batch):
    # TPUs run `ragged_dot`; under the pipeline's vmap over stages its batching rule made
    # ragged dots with batch dimensions, which XLA:TPU does not compile, so bigjax's ragged
    # path (forward, and its own backward) runs one call per element: the same values and
    # gradients as jax's ragged_dot and its autodiff, element by element (the compile for a
    # TPU: tests/test_plan.py).
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 40, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(batch, 5, 8, 6)), jnp.float32)
    sizes = jnp.asarray([rng.multinomial(37, np.ones(5) / 5) for _ in range(batch)], jnp.int32)

    def loss(f, x, w):
        return jnp.sum(jax.vmap(f)(x, w, sizes) ** 2)

    ours = lambda x, w, s: experts.grouped_matmul(x, w, s, ragged=True)  # noqa: E731
    got = jax.value_and_grad(lambda x, w: loss(ours, x, w), argnums=(0, 1))(x, w)
    want = jax.value_and_grad(lambda x, w: loss(jax.lax.ragged_dot, x, w), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # f32, the same products summed in the same or another order: ~1e-7 relative
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_too_few_rows_to_split_gather_the_experts_instead():
    """One sequence on 8 EP devices (as generation has): the tokens cannot be exchanged, so
    every device computes every expert for them; same result as one device."""
    b, length, d, e, f, k = 1, 8, 16, 8, 8, 2
    x = np.asarray(jax.random.normal(jax.random.key(0), (b, length, d)))
    chosen, weight = _skewed(np.zeros((2, length, d)), e, k)[:1], np.ones((b, length, k))
    gate_up, down = _expert_weights(e, d, f)
    run = lambda: experts.dropless(x, chosen, weight, gate_up, down, rules=DEFAULT_RULES)  # noqa: E731
    ref, _ = jax.jit(run)()
    with jax.set_mesh(make_mesh(MeshConfig(shape=(1, 1, 8, 1, 1)), jax.devices())):
        assert experts.layout(DEFAULT_RULES, {"fsdp": 8}, (b, length, d), e, f).ep == ()
        out, _ = jax.jit(run)()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)  # f32, the same sums


@pytest.mark.parametrize(
    ("experts_over", "ep", "axes"),
    [(None, 8, "expert 4 x fsdp 2"), (("expert",), 4, "expert 4"), (("fsdp",), 2, "fsdp 2")],
)
def test_plan_reports_experts_per_device_and_the_all_to_all(experts_over, ep, axes):
    from bigjax import plan

    rules = {"experts": experts_over} if experts_over else {}
    cfg = tiny_config(model={"size": "tiny", **DROPLESS},
                      mesh={"shape": (1, 1, 2, 1, 1, 4), "rules": rules})  # fmt: skip
    target = plan.Target("8 chips", 8, 16 * plan.GiB, 1e14)
    result = plan.plan(cfg, target, 0.4, compile_=False)
    p = result["analytic"]["experts"]
    assert (p["ep"], p["ep_axes"], p["experts_per_device"]) == (ep, axes, 8 // ep)
    # 16 rows x 64 tokens over the 8 devices that split the batch, 2 choices each
    assert p["assignments_per_device"] == 16 * 64 // 8 * 2
    # default buffers: a slot per destination for every assignment, bf16 rows of d_model;
    # dispatch and combine each send all but the device's own block
    buffer = ep * 256 * cfg.model.d_model * 2
    assert p["buffer_bytes"] == buffer
    assert p["all_to_all_bytes_per_layer"] == 2 * buffer * (ep - 1) / ep
    assert f"{8 // ep} of 8 experts per device (EP {ep}: {axes})" in plan.render(result)
