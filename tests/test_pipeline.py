"""Training batches from prepared datasets: packing, mixtures, resume, and a short run."""

import dataclasses
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from bigjax.config import DataConfig
from bigjax.data import dataset, pipeline
from bigjax.data.dataset import EmptySplitError
from bigjax.data.prepare import PrepareConfig, prepare
from bigjax.metrics import read_jsonl
from bigjax.train import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def stdlib_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare(
        PrepareConfig(
            inputs=(str(STDLIB / "json" / "*.py"), str(STDLIB / "email" / "*.py")),
            output=str(out),
            val_fraction=0.2,
            workers=2,
        )
    )
    return out


def _batches(cfg: DataConfig, n: int, split="train", **kw) -> list[dict]:
    tok = dataset.tokenizer_for(cfg)
    it = iter(pipeline.for_config(cfg, split=split, seed=0, tokenizer=tok, **kw))
    out = pipeline.take(it, n)
    getattr(it, "close", lambda: None)()
    return out


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_packed_batches_from_a_prepared_dataset(stdlib_ds, packing):
    cfg = DataConfig(path=str(stdlib_ds), batch_size=8, seq_len=128, packing=packing)
    for b in _batches(cfg, 4):
        seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
        assert b["inputs"].shape == (8, 128)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        starts = np.concatenate([np.ones((8, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        assert np.all(pos[starts & (seg > 0)] == 0)
        assert np.all(w[:, :-1][seg[:, 1:] != seg[:, :-1]] == 0)
        assert np.all(b["inputs"][seg == 0] == 258)  # byte tokenizer's PAD
        assert w.mean() > 0.5


def test_validation_split_is_disjoint_from_train(stdlib_ds):
    # Rows of 512 tokens: every row stream starts at a file's beginning, and many stdlib files
    # share their first ~100 bytes (license header), which is not an overlap of documents.
    cfg = DataConfig(path=str(stdlib_ds), batch_size=8, seq_len=512, shuffle=False)
    rows = lambda split: {r.tobytes() for b in _batches(cfg, 3, split) for r in b["inputs"]}
    assert not rows("train") & rows("validation")


def test_mixture_follows_its_weights(tmp_path):
    words = {"a": "quiet quilt quota", "b": "zebra zinc zone"}  # q and z mark the source
    paths = {}
    for key, text in words.items():
        (tmp_path / key).mkdir()
        lines = [json.dumps({"text": f"{text} number {i} " * 4}) for i in range(200)]
        (tmp_path / key / "d.jsonl").write_text("\n".join(lines) + "\n")
        paths[key] = tmp_path / f"ds_{key}"
        prepare(
            PrepareConfig(
                inputs=(str(tmp_path / key / "d.jsonl"),),
                output=str(paths[key]),
                near_dedup=False,
                quality=None,
                val_fraction=0.1,
                workers=1,
            )
        )
    cfg = DataConfig(
        mixture=((str(paths["a"]), 3.0), (str(paths["b"]), 1.0)), batch_size=16, seq_len=128
    )
    tokens = np.concatenate([b["inputs"].ravel() for b in _batches(cfg, 10)])
    a, b = np.sum(tokens == ord("q")), np.sum(tokens == ord("z"))
    share = a / (a + b)
    assert 0.68 < share < 0.82, share  # 3:1 weights -> 0.75; 20k tokens keep noise < 0.05


def test_mixture_of_different_tokenizers_is_refused(stdlib_ds, tmp_path):
    other = tmp_path / "bpe"
    prepare(
        PrepareConfig(
            inputs=(str(STDLIB / "json" / "*.py"),),
            output=str(other),
            tokenizer="bpe:400",
            val_fraction=0.2,
            workers=1,
        )
    )
    cfg = DataConfig(mixture=((str(stdlib_ds), 1.0), (str(other), 1.0)))
    with pytest.raises(ValueError, match="different tokenizers"):
        dataset.tokenizer_for(cfg)


def test_resume_yields_the_same_batches_with_workers(stdlib_ds):
    cfg = DataConfig(path=str(stdlib_ds), batch_size=8, seq_len=64, num_workers=2)
    tok = dataset.tokenizer_for(cfg)
    ds = pipeline.for_config(cfg, split="train", seed=3, tokenizer=tok)
    it = iter(ds)
    pipeline.take(it, 5)
    state = it.get_state()
    expected = pipeline.take(it, 4)
    it.close()
    resumed = iter(pipeline.for_config(cfg, split="train", seed=3, tokenizer=tok))
    resumed.set_state(state)
    got = pipeline.take(resumed, 4)
    resumed.close()
    for x, y in zip(got, expected, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.slow
def test_train_on_prepared_dataset_uses_its_validation_split(stdlib_ds, tmp_path):
    cfg = tiny_config(
        num_steps=12,
        data={"path": str(stdlib_ds), "num_workers": 1},
        optim={"lr": 1e-2},
        checkpoint={"every_steps": 0},
    )
    last = train(cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert last["eval_loss"] < losses[0]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["path"] == str(stdlib_ds)
    assert dataclasses.replace(cfg.data, path="").path == ""


def test_an_empty_validation_split_fails_before_training(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"text": "A single document of ordinary English prose, long enough to keep."})
        + "\n"
    )
    prepare(
        PrepareConfig(
            inputs=(str(tmp_path / "d.jsonl"),),
            output=str(tmp_path / "ds"),
            val_fraction=0.0001,
            workers=1,
        )
    )
    with pytest.raises(EmptySplitError, match="validation split is empty"):
        train(tiny_config(data={"path": str(tmp_path / "ds")}), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
