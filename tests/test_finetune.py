"""Fine-tuning: frozen subsets, LoRA adapters (training, sharding, resume, merged export)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from helpers import corpus_batches, run_steps

from bigjax import lora
from bigjax.cli import main, open_run
from bigjax.config import ConfigError, from_configdict
from bigjax.train import train
from bigjax.tree import flatten

LORA = {"lora_rank": 4, "lora_alpha": 8.0}


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(params).items()}


def _state_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _run(finetune: dict, mesh=(1, 1, 1), steps: int = 3, **groups):
    cfg = tiny_config(finetune=finetune, optim={"warmup_steps": 0, "lr": 1e-2}, **groups)
    devices = jax.devices()[: int(np.prod(mesh))]
    batches = corpus_batches(steps, 16, 64)
    return run_steps(cfg, batches, devices=devices, mesh_shape=mesh)


@pytest.mark.slow
def test_frozen_parameters_do_not_move_and_have_no_optimizer_state():
    freeze = r"embed/.*|blocks/attn/.*"
    metrics, state, prog = _run({"freeze": freeze})
    before = _flat(prog.init().params)  # same seed: the initial parameters
    after = _flat(state.params)
    for path, value in after.items():
        if path.startswith(("embed/", "blocks/attn/")):
            np.testing.assert_array_equal(value, before[path], err_msg=path)
        else:
            assert not np.array_equal(value, before[path]), f"{path} did not train"
    # AdamW moments only for what trains: two moments of each trainable parameter.
    trainable = sum(
        v.nbytes for p, v in after.items() if not p.startswith(("embed/", "blocks/attn/"))
    )
    assert _state_bytes(state.opt_state) <= 2 * trainable + 64
    assert all(np.isfinite(m["loss"]) for m in metrics)


@pytest.mark.slow
def test_lora_starts_at_the_base_model_and_trains_only_the_adapters():
    metrics, state, prog = _run(LORA)
    init = prog.init()
    # B = 0: step 0's merged weights are exactly the base weights.
    merged0 = _flat(lora.merged(init.params, prog.cfg.finetune.lora_scale))
    base0 = _flat({k: v for k, v in init.params.items() if k != "lora"})
    assert merged0.keys() == base0.keys()
    for k in base0:
        np.testing.assert_array_equal(merged0[k], base0[k], err_msg=k)
    after = _flat(state.params)
    for k in base0:
        np.testing.assert_array_equal(after[k], base0[k], err_msg=k)  # base frozen
    adapters = {k: v for k, v in after.items() if k.startswith("lora/")}
    # rank-4 adapters on q, kv, o, gate_up, down of both layers
    targets = {k.rsplit("/", 1)[0] for k in adapters}
    adapted = ("attn/q_DHK", "attn/kv_DGCK", "attn/o_HKD", "mlp/gate_up_DFC", "mlp/down_FD")
    assert targets == {f"lora/blocks/{w}" for w in adapted}
    assert all(v.shape[-1] == 4 or v.shape[-2] == 4 for v in adapters.values())
    assert any(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("/b"))  # B moved
    # optimizer moments: the adapters' only (a small fraction of the model)
    assert _state_bytes(state.opt_state) <= 2 * sum(v.nbytes for v in adapters.values()) + 64
    assert metrics[-1]["loss"] < metrics[0]["loss"]


@pytest.mark.slow
def test_lora_on_a_sharded_mesh_equals_one_device():
    ref, _, _ = _run(LORA)
    got, state, _ = _run(LORA, mesh=(2, 2, 2))
    for a, b in zip(got, ref, strict=True):
        # same data and init; f32 reduction order only: 1e-5
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # A [N, D, r] follows q_DHK's D (fsdp); B [N, r, H*K] follows its heads (tensor).
    a = state.params["lora"]["blocks"]["attn"]["q_DHK"]["a"]
    assert a.sharding.spec[1] == "fsdp" and a.sharding.spec[2] is None


@pytest.mark.slow
def test_lora_fine_tune_from_a_run_resumes_and_exports_merged(tmp_path):
    base_cfg = tiny_config(num_steps=2)
    train(base_cfg, tmp_path / "base")
    cfg = tiny_config(
        num_steps=4,
        finetune=LORA,
        optim={"warmup_steps": 0, "lr": 1e-2},
        checkpoint={"init_from": str(tmp_path / "base"), "every_steps": 2},
    )
    # stop after 2 steps, then resume to 4: the adapters come back from the checkpoint
    train(dataclasses.replace(cfg, num_steps=2), tmp_path / "tuned")
    out = train(cfg, tmp_path / "tuned")
    assert out["step"] == 4
    with open_run(str(tmp_path / "base"), [], "t") as (_, base, _):
        base = _flat(base)
    with open_run(str(tmp_path / "tuned"), [], "t") as (prog, merged, step):
        assert step == 4 and "lora" not in merged  # open_run folds the adapters in
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 32)))
        ones, pos = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(32), (2, 32))
        logits = np.asarray(nnx.merge(prog.graphdef, merged)(tokens, ones, pos))
        merged = _flat(merged)
    # adapted weights moved away from the base; the rest is the base model exactly
    assert not np.array_equal(merged["blocks/attn/q_DHK"], base["blocks/attn/q_DHK"])
    np.testing.assert_array_equal(merged["embed/table_VD"], base["embed/table_VD"])

    # merged export: a plain Llama checkpoint whose import gives the fine-tuned logits
    assert main(["convert", str(tmp_path / "tuned"), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    with open_run(str(tmp_path / "back"), [], "t") as (prog, params, _):
        back = np.asarray(nnx.merge(prog.graphdef, params)(tokens, ones, pos))
    np.testing.assert_allclose(back, logits, rtol=1e-5, atol=1e-5)  # f32 copies: ~exact


def test_finetune_config_errors():
    with pytest.raises(ConfigError, match="finetune.lora_targets.*matches no adaptable"):
        _run({"lora_rank": 2, "lora_targets": "nothing/.*"}, steps=1)
    with pytest.raises(ConfigError, match="finetune.freeze: not a regular expression"):
        from_configdict({"finetune": {"freeze": "("}})
    with pytest.raises(ConfigError, match="leave freeze empty"):
        from_configdict({"finetune": {"freeze": "embed/.*", "lora_rank": 2}})


def _write_jsonl(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _sft_records(n: int = 64):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    return [
        {"prompt": f"Q{i}: {' '.join(rng.choice(words, 3))}?", "response": f" A{i % 7}."}
        for i in range(n)
    ]


def test_examples_with_line_separators_inside_strings_load_whole(tmp_path):
    # JSON lets U+2028, U+2029 and U+0085 stand unescaped in a string (ensure_ascii=False
    # writers do so); cut at them as text lines, such a record read as two broken ones.
    import json

    from bigjax.data import examples
    from bigjax.data.sources import DataError

    odd = ["line\u2028separator", "para\u2029graph", "next\u0085line", "plain"]
    records = [{"prompt": f"{t} {i}", "response": f" {t}"} for i in range(40) for t in odd]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    split = {
        s: examples.load(path, "prompt_response", s, 0.25).records for s in ("train", "validation")
    }
    train, val = split["train"], split["validation"]
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, records))
    assert 0 < len(val) < len(records)  # the split still takes each record by its line
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:2: not UTF-8 \(byte 15\)"):
        examples.load(path, "prompt_response", "train", 0.0)


def test_a_lone_surrogate_escape_is_named_with_its_line_before_training(tmp_path):
    # JSON's "\ud800" parses (to half of a UTF-16 pair, no text): the run crashed at the first
    # batch holding it, with a UnicodeEncodeError from a Grain worker
    from bigjax.data import examples
    from bigjax.data.sources import DataError

    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c \\ud800", "response": "d"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:2: prompt holds a lone surrogate escape at"):
        examples.load(path, "prompt_response", "train", 0.0)
    path.write_text('{"prompt": "smile \\ud83d\\ude00", "response": "b"}\n')  # a pair: text
    assert examples.load(path, "prompt_response", "train", 0.0).records[0]["prompt"] == "smile 😀"


def test_labels_are_strings_or_integers_and_a_bom_is_not_data(tmp_path):
    from bigjax.data import examples
    from bigjax.data.sources import DataError

    path = tmp_path / "cls.jsonl"
    good = '{"text": "a", "label": "pos"}\n{"text": "b", "label": 3}\n'
    path.write_bytes(b"\xef\xbb\xbf" + good.encode())  # as Windows editors save UTF-8
    assert examples.load(path, "text_label", "train", 0.0).classes == ("3", "pos")
    # each of these would have been a class of its own ("None", "True", "1.5", "[1]")
    for label in ("null", "true", "1.5", "[1]"):
        path.write_text(good + '{"text": "c", "label": ' + label + "}\n")
        with pytest.raises(DataError, match=r"cls.jsonl:3: label is .*use a string or an integer"):
            examples.load(path, "text_label", "train", 0.0)


@pytest.mark.parametrize("packing", ["pad", "first_fit"])
def test_sft_rows_take_the_loss_on_responses_only(tmp_path, packing):
    from bigjax.data import dataset, examples, pipeline
    from bigjax.data.tokenizer import ByteTokenizer

    path = _write_jsonl(tmp_path / "sft.jsonl", _sft_records())
    cfg = tiny_config(data={"task": "sft", "examples": path, "packing": packing,
                            "batch_size": 8, "seq_len": 64})  # fmt: skip
    it = pipeline.for_config(
        cfg.data, split="train", seed=0, workers=0, tokenizer=dataset.tokenizer_for(cfg.data)
    )
    batch = next(it)
    it.close()
    tok = ByteTokenizer()
    responses = {r["response"] for r in _sft_records()}
    for row in range(8):
        w, targets = batch["weights"][row], batch["targets"][row]
        assert w.sum() > 0
        # The weighted targets of each example spell its response and then EOS, nothing else.
        seg = batch["segment_ids"][row]
        for s in set(seg[seg > 0].tolist()):
            picked = targets[(seg == s) & (w > 0)]
            assert picked[-1] == tok.eos_id
            assert tok.decode(picked[:-1]) in responses
    # and the loss mask is what Encode says: BOS + prompt unweighted
    enc = examples.Encode(tok, ())(_sft_records()[0])
    assert enc["loss_mask"][: 1 + len(_sft_records()[0]["prompt"])].sum() == 0


@pytest.mark.slow
def test_sft_trains_from_a_base_run(tmp_path):
    train(tiny_config(num_steps=2), tmp_path / "base")
    path = _write_jsonl(tmp_path / "sft.jsonl", _sft_records())
    cfg = tiny_config(
        num_steps=3,
        data={"task": "sft", "examples": path, "packing": "first_fit", "seq_len": 64},
        checkpoint={"init_from": str(tmp_path / "base")},
    )
    out = train(cfg, tmp_path / "sft")
    assert np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])


def _classify_records(n: int = 240):
    rng = np.random.default_rng(1)
    filler = ["the", "a", "on", "under", "near", "big", "small", "red"]
    out = []
    for _ in range(n):
        label = int(rng.integers(0, 3))
        animal = ["cat", "dog", "bird"][label]
        words = [*rng.choice(filler, 4), animal, *rng.choice(filler, 3)]
        out.append({"text": " ".join(words), "label": ["cat", "dog", "bird"][label]})
    return out


@pytest.mark.slow
def test_classification_head_learns_and_reports_precision_recall_f1(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "cls.jsonl", _classify_records())
    train(tiny_config(num_steps=1), tmp_path / "base")
    cfg = tiny_config(
        num_steps=60,
        model={"size": "tiny", "num_classes": 3},
        data={"task": "classify", "examples": path, "packing": "pad", "seq_len": 48,
              "eval_fraction": 0.25},
        optim={"warmup_steps": 5, "lr": 3e-3},
        eval={"num_batches": 4},
        checkpoint={"init_from": str(tmp_path / "base")},
    )  # fmt: skip
    out = train(cfg, tmp_path / "cls")
    # which animal word appears decides the label: a tiny model learns it in 60 steps
    assert out["accuracy"] > 0.9 and out["f1"] > 0.9
    assert {"precision", "recall", "f1", "accuracy"} <= set(out)
    console = capsys.readouterr().out
    evals = [line for line in console.splitlines() if line.startswith("eval @ 60")]
    assert evals and "macro F1" in evals[0] and "ppl" not in evals[0]  # no perplexity


def test_classification_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    from bigjax.choices import classification_metrics

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, truth, rng.integers(0, 4, 200))
    pred[pred == 3] = 2  # class 3 is never predicted: precision 0 for it
    confusion = np.zeros((5, 5))  # class 4 never occurs at all: left out of the average
    np.add.at(confusion, (truth, pred), 1)
    got = classification_metrics(confusion)
    p, r, f, _ = precision_recall_fscore_support(truth, pred, average="macro", zero_division=0)
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))


# 10**6: the eval ends at the first batch blank on every row (a million blank steps would not)
@pytest.mark.parametrize("num_batches", [6, 10**6])
def test_an_eval_longer_than_the_held_out_split_scores_each_example_once(
    tmp_path, capsys, num_batches
):
    from bigjax.data import examples
    from bigjax.tasks import TASKS

    path = _write_jsonl(tmp_path / "cls.jsonl", _classify_records(60))
    held_out = len(examples.load(path, TASKS["classify"].examples, "validation", 0.25).records)
    batch = 8
    cfg = tiny_config(
        num_steps=1,
        model={"size": "tiny", "num_classes": 3},
        data={"task": "classify", "examples": path, "packing": "pad", "seq_len": 48,
              "eval_fraction": 0.25, "batch_size": batch},
        eval={"num_batches": num_batches},  # more than the split fills
    )  # fmt: skip
    assert 0 < held_out < 6 * batch
    out = train(cfg, tmp_path / "cls")
    # row r reads examples r, r + 8, ...: the split fills ceil(held_out / 8) batches, the
    # rest are blank; before, they repeated the examples and weighted some twice
    assert out["eval_batches"] == -(-held_out // batch)
    # accuracy is a count of the held-out examples over their number (f32 sums of 0/1 are
    # exact; the division is float64), so a repeated example would show in it
    assert abs(out["accuracy"] * held_out - round(out["accuracy"] * held_out)) < 1e-6
    console = capsys.readouterr().out
    assert f"ran out after {out['eval_batches']} of eval.num_batches={num_batches}" in console
