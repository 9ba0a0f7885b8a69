"""Cached decoding: equal to the uncached forward pass, for ragged batches, sharded or not;
sampling filters and stop tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from bigjax import models
from bigjax.generate import Sampling, decode_mask, filter_logits, generate, left_pad
from bigjax.mesh import make_mesh

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 8], [300, 1, 2, 3]]


def _model(**model):
    cfg = tiny_config(model=model)
    m = models.build(cfg.model, cfg.mesh.rules, seed=0)
    graphdef, params = nnx.split(m)
    return cfg, m, graphdef, params


def _forward(m, tokens):
    t = jnp.asarray([tokens])
    return m(t, jnp.ones_like(t), jnp.arange(len(tokens))[None])[0]


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_logits_equal_the_forward_pass_despite_left_padding(scan_layers):
    cfg, m, _, _ = _model(scan_layers=scan_layers)
    batch = left_pad(PROMPTS)
    b, t = batch["tokens"].shape
    n, g, k = cfg.model.num_layers, cfg.model.kv_heads, cfg.model.dim_per_head
    cache = jnp.zeros((n, b, t + 4, g, k))
    valid = jnp.zeros((b, t + 4), bool).at[:, :t].set(batch["valid"])
    logits, _, _ = m.decode(
        jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]), cache, cache, 0,
        decode_mask(0, t, valid),
    )  # fmt: skip
    for i, prompt in enumerate(PROMPTS):
        ref = _forward(m, prompt)
        # f32, same arithmetic up to the masked (zero-weight) padded keys: ~1e-6.
        np.testing.assert_allclose(logits[i, t - len(prompt) :], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [
        dict(scan_layers=True),
        dict(scan_layers=False),
        dict(family="gpt2", max_positions=64),  # learned positions, biases, GELU, tied
    ],
)
def test_greedy_cached_decoding_equals_uncached_argmax(model):
    _, m, graphdef, params = _model(**model)
    out = generate(graphdef, params, PROMPTS, Sampling(max_new_tokens=8))
    for prompt, new in zip(PROMPTS, out, strict=True):
        assert len(new) == 8
        logits = _forward(m, prompt + new)
        # every generated token is the argmax of the uncached forward pass at its position
        expected = np.argmax(logits[len(prompt) - 1 : -1], axis=-1).tolist()
        assert new == expected


@pytest.mark.slow
def test_sharded_generation_matches_one_device():
    cfg, _, graphdef, params = _model()
    want = generate(graphdef, params, PROMPTS, Sampling(max_new_tokens=5))
    mesh = make_mesh(tiny_config(mesh={"shape": (1, 2, 4)}).mesh)
    with jax.set_mesh(mesh):
        got = generate(graphdef, params, PROMPTS, Sampling(max_new_tokens=5), cfg.mesh.rules)
    assert got == want


@pytest.mark.slow
def test_stop_tokens_end_rows_and_sampling_is_seeded():
    _, _, graphdef, params = _model()
    greedy = generate(graphdef, params, PROMPTS, Sampling(max_new_tokens=6))
    stop = greedy[0][2]  # row 0 must stop right after its third token
    stopped = generate(graphdef, params, PROMPTS, Sampling(max_new_tokens=6, stop_tokens=(stop,)))
    assert stopped[0] == greedy[0][:3]
    for full, cut in zip(greedy, stopped, strict=True):
        assert full[: len(cut)] == cut and (len(cut) == 6 or cut[-1] == stop)

    hot = Sampling(max_new_tokens=6, temperature=1.5, top_k=50, seed=3)
    a = generate(graphdef, params, PROMPTS, hot)
    assert a == generate(graphdef, params, PROMPTS, hot)  # same seed, same tokens
    assert a != generate(graphdef, params, PROMPTS, Sampling(**{**hot.__dict__, "seed": 4}))


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    k2 = filter_logits(logits, top_k=2, top_p=1.0)
    assert np.isfinite(k2).sum(axis=1).tolist() == [2, 2]
    assert np.isfinite(k2[0, :2]).all() and np.isfinite(k2[1, 2:]).all()
    # top_p 0.7: row 0 needs {0.5, 0.25}; row 1 needs {0.4, 0.3}
    p = filter_logits(logits, top_k=0, top_p=0.7)
    assert np.isfinite(p).tolist() == [[True, True, False, False], [False, False, True, True]]
    # the most likely token always survives, however small top_p is
    assert np.isfinite(filter_logits(logits, top_k=0, top_p=1e-6)).sum() == 2


def test_a_top_k_past_the_vocabulary_keeps_every_token():
    # it was jax's "k argument to top_k must be no larger than size" traceback
    logits = jnp.asarray([[0.1, 2.0, -1.0, 0.5]])
    for k in (4, 5, 3_000_000_000):
        assert np.array_equal(filter_logits(logits, k, 1.0), logits)


def test_generating_past_the_learned_positions_is_an_error():
    _, _, graphdef, params = _model(family="gpt2", max_positions=64)
    with pytest.raises(ValueError, match="more than the model's 64 learned positions"):
        generate(graphdef, params, PROMPTS, Sampling(max_new_tokens=60))  # 6 + 60 > 64


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])


@pytest.mark.slow
def test_generate_command_on_a_trained_run(tmp_path, capsys):
    # A real run (trained in-process on 8 devices, mesh 2x2x2), then `bigjax generate` on its
    # checkpoint: the CLI restores the parameters into this machine's mesh and decodes text.
    from bigjax.cli import main
    from bigjax.train import train

    cfg = tiny_config(num_steps=3, mesh={"shape": (2, 2, 2)}, checkpoint={"every_steps": 3})
    train(cfg, tmp_path / "run")
    capsys.readouterr()
    args = ["generate", "--workdir", str(tmp_path / "run"), "--max-new-tokens", "7"]
    assert main([*args, "--prompt", "def f(x):", "--prompt", "import"]) == 0
    out = capsys.readouterr().out
    assert "--- 'def f(x):'" in out and "--- 'import'" in out
    assert "checkpoint step 3, 2 prompt(s), 14 new tokens" in out  # no stop token: 2 x 7
    err = capsys.readouterr().err
    assert "warning" not in err and "generate [" not in err  # no bar under 64 tokens
    # a longer generation shows its progress on stderr (from inside the compiled loop: it
    # ran for minutes with nothing shown): once 64 tokens are out, and at the end
    assert main(["generate", "--workdir", str(tmp_path / "run"), "--max-new-tokens", "150",
                 "--prompt", "import"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "64/150 tokens" in err and "100% 150/150 tokens" in err, err
    # past the positions the run trained on: generated, with a warning (serve refuses it)
    long = "x = 1\n" * cfg.data.seq_len
    assert main([*args, "--prompt", long]) == 0
    assert "past the 64 positions this run trained on" in capsys.readouterr().err

    assert main(["generate", "--workdir", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    # the run given as RUN, as eval and serve take it: the same text as --workdir RUN
    run, one = str(tmp_path / "run"), ["--max-new-tokens", "7", "--prompt", "import"]
    assert main(["generate", run, *one]) == 0 and main(["generate", "--workdir", run, *one]) == 0
    positional, flag = capsys.readouterr().out.split("--- 'import'")[1:]
    assert positional.split("generate:")[0] == flag.split("generate:")[0]  # greedy: same text
    for twice_or_none in ([run, "--workdir", run], []):
        assert main(["generate", *twice_or_none, "--prompt", "x"]) == 2
        assert "give the run directory once" in capsys.readouterr().err
    assert main([*args, "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    # a run's config that this bigjax refuses (a value a later check rules out, or a bad
    # override) says whose config it is and how to go on
    assert main([*args, "--prompt", "x", "--config.optim.eps=0"]) == 2
    assert (f"generate: the config of {run} (step 3, with the overrides given) is refused: "
            "optim.eps: must be positive") in capsys.readouterr().err  # fmt: skip
    # a stop token no run emits stopped nothing, silently; a prompt from a terminal that is
    # not UTF-8 (Python's argv holds its bytes as lone surrogates) was a UnicodeEncodeError
    assert main([*args, "--prompt", "x", "--stop-token", str(cfg.model.vocab_size)]) == 2
    assert f"stop token(s) [{cfg.model.vocab_size}] are not token ids" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # argparse's own usage error
        main([*args, "--prompt", "caf\udce9"])
    assert "--prompt: not UTF-8 text (byte b'\\xe9' at character 3)" in capsys.readouterr().err
