"""Multiple-choice scoring by log-likelihood, and the `bigjax eval` command."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from bigjax import models
from bigjax.choices import Item, accuracy, choice_batch, load_items, make_scorer
from bigjax.config import ConfigError
from bigjax.data.tokenizer import ByteTokenizer

ITEMS = [
    Item("def f(x):\n    return", (" x", " x + 1", "zz"), 1),
    Item("import", (" os", " sys"), 0),
]


@pytest.mark.slow
def test_choice_scores_equal_the_log_likelihood_of_each_choice():
    cfg = tiny_config()
    model = models.build(cfg.model, cfg.mesh.rules, seed=0)
    graphdef, params = nnx.split(model)
    tok = ByteTokenizer()
    logp, counts = jax.device_get(make_scorer(graphdef)(params, choice_batch(tok, ITEMS, 64)))
    row = 0
    for item in ITEMS:
        ctx = tok.encode(item.context).tolist()
        for choice in item.choices:
            ans = tok.encode(choice).tolist()
            seq = jnp.asarray([ctx + ans])
            logits = model(
                seq[:, :-1], jnp.ones_like(seq[:, :-1]), jnp.arange(seq.shape[1] - 1)[None]
            )
            lp = jax.nn.log_softmax(logits[0], axis=-1)
            # the choice's tokens are predicted from the positions just before them
            want = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(ans))
            assert counts[row] == len(ans)
            assert logp[row] == pytest.approx(want, abs=1e-4)  # f32 sums of <= 8 terms
            row += 1
    assert row == len(logp)


def test_accuracy_raw_and_per_token():
    items = [Item("c", ("a", "b"), 0), Item("c", ("a", "bbbb"), 1)]
    # item 1: raw log-likelihood prefers the short choice; per token the long one wins
    logp = np.array([-1.0, -2.0, -2.0, -4.0])
    tokens = np.array([1, 1, 1, 4])
    assert accuracy(items, logp, tokens) == {"mc_accuracy": 0.5, "mc_accuracy_norm": 1.0}


def test_bad_item_files_name_the_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_items(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n{"context": "a"}\n')
    with pytest.raises(ConfigError, match="line 2 is not an item"):
        load_items(bad)
    bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(ConfigError, match="line 1: need >= 2 choices and 0 <= answer < 2"):
        load_items(bad)
    bad.write_bytes(b'{"context": "caf\xe9", "choices": ["x", "y"], "answer": 0}\n')
    with pytest.raises(ConfigError, match="line 1 is not an item .*UnicodeDecodeError"):
        load_items(bad)
    # U+2028 inside a string is valid JSON: one item, not a line cut in two
    bad.write_text('{"context": "a\u2028b", "choices": ["x\u0085", "y"], "answer": 1}\n')
    assert load_items(bad) == [Item("a\u2028b", ("x\u0085", "y"), 1)]


def test_an_empty_choice_or_a_lone_surrogate_is_named_with_its_line(tmp_path):
    # it has no tokens, so its log-likelihood is 0, above any real choice's: the error came
    # at scoring without the file or the line
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n'
                    '{"context": "a", "choices": ["x", ""], "answer": 0}\n')  # fmt: skip
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))} line 2: choice 1 is empty"):
        load_items(path)
    path.write_text('{"context": "a \\udc00", "choices": ["x", "y"], "answer": 0}\n')
    with pytest.raises(ConfigError, match="line 1: 'a \\\\udc00' holds a lone surrogate escape"):
        load_items(path)  # it crashed the tokenizer at scoring


@pytest.mark.parametrize(
    "line, named",
    [
        ('{"context": 5, "choices": ["x", "y"], "answer": 0}', "context is 5"),
        ('{"context": "a", "choices": "xy", "answer": 0}', "choices is 'xy'"),
        ('{"context": "a", "choices": ["x", 2], "answer": 0}', "not a list of strings"),
        ('{"context": "a", "choices": ["x", "y"], "answer": true}', "answer is True"),
        ('{"context": "a", "choices": ["x", "y"], "answer": 1.0}', "answer is 1.0"),
        ('{"context": "a", "choices": ["x", "y"], "answer": "1"}', "answer is '1'"),
        ('["a", ["x", "y"], 0]', "a JSON list"),
    ],
)
def test_items_keep_their_json_types(tmp_path, line, named):
    # Coerced, each of these scored without a word: a string split into one-letter choices,
    # true taken as index 1, a number as the context.
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n' + line + "\n")
    with pytest.raises(ConfigError, match=f"line 2 is not an item .*{re.escape(named)}"):
        load_items(path)
    few = '{"context": "a", "choices": ["x"], "answer": 0}\n'
    path.write_text(few)
    with pytest.raises(ConfigError, match="line 1: .*got 1 choices and answer 0"):
        load_items(path)


def test_a_byte_order_mark_is_not_part_of_the_first_item(tmp_path):
    path = tmp_path / "bom.jsonl"  # as Windows editors save UTF-8
    path.write_bytes(b'\xef\xbb\xbf{"context": "a", "choices": ["x", "y"], "answer": 1}\n')
    assert load_items(path) == [Item("a", ("x", "y"), 1)]


@pytest.mark.slow
def test_eval_command_on_a_trained_run(tmp_path, capsys):
    from bigjax.cli import main
    from bigjax.train import train

    cfg = tiny_config(num_steps=2, mesh={"shape": (1, 8, 1)}, checkpoint={"every_steps": 2})
    train(cfg, tmp_path / "run")
    last_eval = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ][-1]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(i.__dict__) + "\n" for i in ITEMS))
    out = tmp_path / "eval.json"
    args = ["eval", "--workdir", str(tmp_path / "run"), "--choices", str(items), "--json", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err  # progress, with the amount of work known
    assert "eval: held-out loss [####################] 100%" in err
    assert "eval: multiple choice [####################] 100% 2/2 items" in err
    result = json.loads(out.read_text())
    assert result["step"] == 2 and result["mc_items"] == 2
    assert 0.0 <= result["mc_accuracy"] <= 1.0 and 0.0 <= result["mc_accuracy_norm"] <= 1.0
    # the same held-out batches as the run's own final eval, now on a different mesh
    assert result["eval_loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)
    assert main(["eval", "--workdir", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_builtin_next_line_task_comes_from_held_out_files():
    from pathlib import Path

    from bigjax.choices import stdlib_next_line
    from bigjax.data import corpus

    items = stdlib_next_line(0.02, 30, seed=1)
    assert len(items) == 30 and items == stdlib_next_line(0.02, 30, seed=1)  # seeded
    _, held = corpus.split_stdlib(0.02, chunk_bytes=1 << 30)
    texts = [Path(p).read_text(encoding="utf-8", errors="replace") for p in {d.path for d in held}]
    for item in items:
        assert len(set(item.choices)) == 4
        # the answer really follows the context in a held-out (never trained on) file
        assert any(item.context + item.choices[item.answer] in t for t in texts)
    assert len({i.answer for i in items}) > 1  # the answer's position varies


@pytest.mark.slow
def test_multiple_choice_runs_inside_training(tmp_path):
    from bigjax.metrics import read_jsonl
    from bigjax.train import train

    cfg = tiny_config(num_steps=2, eval={"choices": "stdlib", "choice_items": 8, "every_steps": 1})
    train(cfg, tmp_path / "run")
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # 8 items: accuracy is a multiple of 1/8
        assert r["mc_accuracy"] * 8 == pytest.approx(round(r["mc_accuracy"] * 8))
        assert 0 <= r["mc_accuracy_norm"] <= 1 and r["mc_eval_s"] > 0


def test_run_commands_on_a_directory_that_is_not_a_run_exit_2(tmp_path, capsys):
    from bigjax.cli import main

    out = str(tmp_path / "out")
    for argv in (
        ["eval", "--workdir", str(tmp_path)],
        ["generate", "--workdir", str(tmp_path), "--prompt", "x"],
        ["inspect", "--workdir", str(tmp_path), "--prompt", "x", "--out", out],
        ["compress", "quantize", "--workdir", str(tmp_path), "--out", out],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{argv[0]}: {tmp_path} has no config.json; pass a run directory" in err, err
    assert not (tmp_path / "out").exists()  # nothing written
