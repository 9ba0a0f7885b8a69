"""The BERT-style encoder: bidirectional attention within documents, the 80/10/10 masking,
masked-LM pretraining on the built-in corpus."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from bigjax import mlm, models
from bigjax.config import ConfigError, from_configdict
from bigjax.generate import Sampling, generate
from bigjax.train import train

BERT = {"size": "tiny", "family": "bert", "max_positions": 64}


def test_masking_selects_real_tokens_at_the_rate_and_splits_80_10_10():
    b, length = 64, 256
    tokens = jax.random.randint(jax.random.key(0), (b, length), 0, 256)
    seg = jnp.where(jnp.arange(length) < 200, 1, 0) * jnp.ones((b, 1), jnp.int32)  # pad tail
    batch = {"inputs": tokens, "segment_ids": seg, "targets": tokens, "weights": seg * 1.0}
    m = mlm.Masking(mask_id=259, random_below=259, rate=0.15)
    out = jax.device_get(mlm.corrupt(batch, jax.random.key(1), m))
    selected = out["weights"] > 0
    real = np.asarray(seg) > 0
    assert not selected[~real].any()  # padding is never a target
    # 12,800 real tokens: the selected share is within 4 standard deviations of 15 %
    share = selected[real].mean()
    assert abs(share - 0.15) < 4 * np.sqrt(0.15 * 0.85 / real.sum())
    np.testing.assert_array_equal(out["targets"], tokens)  # scored on the originals
    changed = out["inputs"] != np.asarray(tokens)
    assert not changed[~selected].any()  # unselected tokens are untouched
    n = selected.sum()
    masked = (out["inputs"] == 259)[selected].mean()
    kept = (~changed)[selected].mean()  # 10 % kept, plus random draws equal to the original
    assert abs(masked - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n)
    assert abs(kept - (0.1 + 0.1 / 259)) < 4 * np.sqrt(0.1 * 0.9 / n)


@pytest.mark.slow
def test_encoder_attends_both_ways_within_a_document_only():
    cfg = tiny_config(model=BERT, data={"task": "mlm"})
    model = models.build(cfg.model, cfg.mesh.rules, seed=0)
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 259)
    seg = jnp.asarray([[1] * 8 + [2] * 8])
    pos = jnp.asarray([list(range(8)) * 2])
    emb = model.embed(tokens)
    graphdef, state = nnx.split(model)

    def out_at(x_BLD, t):
        m = nnx.merge(graphdef, state)
        type(m.embed).__call__, orig = (lambda self, tok: x_BLD), type(m.embed).__call__
        try:
            return m(tokens, seg, pos)[0, t].sum()
        finally:
            type(m.embed).__call__ = orig

    g = jnp.linalg.norm(jax.grad(out_at)(emb, 3)[0], axis=-1)
    assert jnp.all(g[:8] > 0), "position 3 must see its whole document, later tokens too"
    assert jnp.all(g[8:] == 0), "and nothing of the next document"


@pytest.mark.slow
def test_bert_pretrains_with_masked_lm(tmp_path):
    cfg = tiny_config(num_steps=40, model=BERT, data={"task": "mlm", "seq_len": 64},
                      optim={"warmup_steps": 5, "lr": 3e-3})  # fmt: skip
    out = train(cfg, tmp_path / "bert")
    rows = [r for r in map(__import__("json").loads, (tmp_path / "bert" / "metrics.jsonl").open())
            if "loss" in r]  # fmt: skip
    # from ~log(512) = 6.2 at initialisation to well below: the masked bytes are predicted
    assert rows[0]["loss"] > 5.0 and out["loss"] < 3.5
    assert np.isfinite(out["eval_loss"]) and out["eval_loss"] < 3.5
    # an encoder does not generate
    with pytest.raises(ValueError, match="bidirectional encoder"):
        graphdef, params = nnx.split(models.build(cfg.model, cfg.mesh.rules, seed=0))
        generate(graphdef, params, [[1, 2]], Sampling(max_new_tokens=2))


def test_mlm_config_errors():
    with pytest.raises(ConfigError, match="needs a bidirectional encoder"):
        from_configdict({"data": {"task": "mlm"}})  # a causal Llama
    with pytest.raises(ConfigError, match="needs a causal decoder"):
        from_configdict({"model": {"family": "bert"}, "data": {"task": "lm"}})
    cfg = tiny_config(model={**BERT, "vocab_size": 259}, data={"task": "mlm"})
    from bigjax.mesh import make_mesh
    from bigjax.program import for_config

    with pytest.raises(ConfigError, match="vocab_size > 259"):
        for_config(cfg, make_mesh(cfg.mesh))
