"""The decoder (Llama and GPT-2 styles): parameter formula, causality, packing isolation,
scan/remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from bigjax import models
from bigjax.config import FAMILY_DEFAULTS, MODEL_SIZES, ConfigError, from_configdict
from bigjax.models.llama import param_count

DECODERS = ["llama", "gpt2"]  # the encoder's attention is tested in test_mlm.py


def _model(**model):
    cfg = tiny_config(model=model)
    return cfg, models.build(cfg.model, cfg.mesh.rules, seed=0)


def _batch(B=2, L=16, seed=0, segments=None):
    tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, 259)
    seg = jnp.ones((B, L), jnp.int32) if segments is None else jnp.asarray(segments)
    # positions restart at every document boundary, as the packer emits them
    pos = np.zeros((B, L), np.int32)
    for b in range(B):
        for t in range(1, L):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    return tokens, seg, jnp.asarray(pos)


@pytest.mark.parametrize("size", list(MODEL_SIZES))
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", [f for f in FAMILY_DEFAULTS if f != "vit"])  # test_vit.py
def test_param_count_matches_formula(size, tie, family):
    task = "mlm" if family == "bert" else "lm"  # an encoder pretrains with masked LM
    model = {"size": size, "tie_embeddings": tie, "family": family}
    cfg = from_configdict({"model": model, "data": {"task": task}})
    _, state = models.abstract(cfg.model, cfg.mesh.rules)  # shapes only: 8b costs no memory
    assert models.count_params(state) == param_count(cfg.model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "switches",
    [
        dict(use_bias=True),  # Llama with biases (HF attention_bias + mlp_bias)
        dict(mlp="gelu"),
        dict(positions="learned", max_positions=300),
        dict(family="gpt2", num_kv_heads=2),  # GPT-2 style with grouped queries
        dict(num_experts=4, experts_per_token=2),  # MoE
        dict(num_experts=3, experts_per_token=1, scan_layers=False),
    ],
)
def test_architecture_switches_count_and_run(switches):
    cfg, model = _model(**switches)
    _, state = models.abstract(cfg.model, cfg.mesh.rules)
    assert models.count_params(state) == param_count(cfg.model)
    tokens, seg, pos = _batch()
    assert jnp.all(jnp.isfinite(model(tokens, seg, pos)))


def test_gpt2_family_is_a_preset_that_explicit_fields_override():
    m = from_configdict({"model": {"family": "gpt2", "norm_eps": 1e-6}}).model
    assert (m.positions, m.mlp, m.norm, m.use_bias, m.tie_embeddings) == (
        "learned",
        "gelu",
        "layernorm",
        True,
        True,
    )
    assert m.max_positions == 1024 and m.norm_eps == 1e-6  # the explicit value wins


def test_learned_positions_shorter_than_the_sequence_is_a_config_error():
    with pytest.raises(ConfigError, match="model.max_positions"):
        from_configdict(
            {"model": {"family": "gpt2", "max_positions": 64}, "data": {"seq_len": 128}}
        )


def test_known_sizes_are_in_range():
    # Sanity of the size table itself against the names it claims (within 15%).
    for name, expect in [
        ("125m", 125e6),
        ("350m", 350e6),
        ("1b", 1.24e9),
        ("3b", 3.21e9),
        ("8b", 8.03e9),
    ]:
        n = param_count(from_configdict({"model": {"size": name}}).model)
        assert abs(n / expect - 1) < 0.15, (name, n)


def _input_grads(model, tokens, seg, pos, out_t):
    """d(logits at position out_t) / d(input embedding at every position), as norms [B, L]."""
    graphdef, state = nnx.split(model)

    emb = model.embed(tokens)

    def logits_at(x_BLD):
        # Feed embeddings directly by swapping the table lookup for the given activations.
        m = nnx.merge(graphdef, state)
        orig = type(m.embed).__call__
        try:
            type(m.embed).__call__ = lambda self, t: x_BLD
            return m(tokens, seg, pos)[:, out_t].sum()
        finally:
            type(m.embed).__call__ = orig

    g = jax.grad(logits_at)(emb)
    return jnp.linalg.norm(g, axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("family", DECODERS)
def test_causal_via_gradients(family):
    _, model = _model(family=family)
    tokens, seg, pos = _batch()
    g = _input_grads(model, tokens, seg, pos, out_t=7)
    assert jnp.all(g[:, 8:] == 0), "position 7 depends on future tokens"
    assert jnp.all(g[:, :8] > 0), "position 7 ignores part of its past"


@pytest.mark.parametrize("family", DECODERS)
def test_no_attention_across_documents(family):
    _, model = _model(family=family)
    segments = np.array([[1] * 6 + [2] * 6 + [0] * 4] * 2)  # two docs, then padding
    tokens, seg, pos = _batch(segments=segments)
    g = _input_grads(model, tokens, seg, pos, out_t=9)  # inside document 2
    assert jnp.all(g[:, :6] == 0), "document 2 sees document 1"
    assert jnp.all(g[:, 6:10] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full", "save_matmuls"])
def test_scan_equals_loop_and_remat_equals_none(remat):
    tokens, seg, pos = _batch()

    def loss_and_grads(**model):
        _, m = _model(**model)
        graphdef, state = nnx.split(m)
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens, seg, pos) ** 2)
        return jax.value_and_grad(loss)(state)

    ref_loss, ref_grads = loss_and_grads(scan_layers=False, remat="none")
    loss, grads = loss_and_grads(scan_layers=True, remat=remat)
    # Same params (same init); only op order differs: f32 rounding, 1e-5 relative.
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gqa_and_tied_variants_run():
    tokens, seg, pos = _batch()
    for kw in [dict(num_kv_heads=1), dict(num_kv_heads=4, tie_embeddings=True)]:
        cfg, m = _model(**kw)
        logits = m(tokens, seg, pos)
        assert logits.shape == (2, 16, cfg.model.vocab_size) and jnp.all(jnp.isfinite(logits))


def test_bf16_compute_keeps_f32_params():
    cfg, m = _model(dtype="bfloat16")
    tokens, seg, pos = _batch()
    assert m(tokens, seg, pos).dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m)))


@pytest.mark.slow
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (4, 1)])
def test_einsum_attention_equals_jax_attention(heads, kv_heads):
    # bigjax's grouped einsums against jax.nn.dot_product_attention (XLA path), same mask:
    # packed documents plus padding. A wrong head grouping or mask would differ by O(1).
    from bigjax.attention import attention_mask, dot_product_attention

    keys = jax.random.split(jax.random.key(1), 3)
    B, L, K = 2, 16, 8
    q = jax.random.normal(keys[0], (B, L, heads, K))
    k = jax.random.normal(keys[1], (B, L, kv_heads, K))
    v = jax.random.normal(keys[2], (B, L, kv_heads, K))
    segments = jnp.asarray([[1] * 5 + [2] * 8 + [0] * 3, [1] * 16])
    mask = attention_mask(segments)
    ours = dot_product_attention(q, k, v, mask)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    # f32 sums of 16 terms in a different order: agreement to ~1e-6 relative.
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    ours_g = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, mask)), (0, 1, 2))(
        q, k, v
    )
    ref_g = jax.grad(
        loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)), (0, 1, 2)
    )(q, k, v)
    for a, b in zip(ours_g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_layernorm_model_counts_and_normalises():
    cfg, model = _model(norm="layernorm")
    _, state = models.abstract(cfg.model, cfg.mesh.rules)
    assert models.count_params(state) == param_count(cfg.model)  # scale and bias per norm
    x = jax.random.normal(jax.random.key(0), (2, 3, cfg.model.d_model)) * 5 + 3
    y = model.final_norm(x)  # a LayerNorm, as initialised: unit scale, zero bias
    # Unit scale, zero bias: every row has mean 0 and variance 1 (to f32 rounding).
    np.testing.assert_allclose(jnp.mean(y, -1), 0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, -1), 1, rtol=1e-4)
    tokens, seg, pos = _batch()
    assert jnp.all(jnp.isfinite(model(tokens, seg, pos)))
