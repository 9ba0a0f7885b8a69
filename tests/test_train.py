"""End to end: the `bigjax train` command, its outputs, and resuming from a checkpoint."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config, xla_flags
from helpers import train_cmd

from bigjax.metrics import read_jsonl
from bigjax.train import train

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time"}


@pytest.mark.slow
def test_cli_trains_on_builtin_corpus_and_writes_everything(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    cmd = train_cmd(
        workdir,
        "--config.num_steps=60",
        "--config.mesh.shape=2,2,2",
        "--config.data.seq_len=128",
        "--config.checkpoint.every_steps=30",
        "--config.eval.every_steps=30",
        "--config.metrics.log_every=10",
        "--config.optim.warmup_steps=10",
        "--config.data.num_workers=1",
    )
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over 8 cpu devices" in r.stdout and "[####" in r.stdout and "eta" in r.stdout
    assert str(workdir / "metrics.jsonl") in r.stdout  # says where the outputs are

    rows = read_jsonl(workdir / "metrics.jsonl")
    train_rows = [x for x in rows if "loss" in x]
    eval_rows = [x for x in rows if "eval_loss" in x]
    assert [x["step"] for x in train_rows] == [1, 10, 20, 30, 40, 50, 60]
    assert all(ROW_KEYS <= set(x) for x in train_rows)
    assert all(x["mfu"] > 0 and x["tokens_per_sec"] > 0 for x in train_rows[1:])
    assert [x["step"] for x in eval_rows] == [30, 60]
    assert [x["step"] for x in rows] == sorted(x["step"] for x in rows)  # rows in step order
    assert f"done: step 60, eval loss {eval_rows[-1]['eval_loss']:.4f}." in r.stdout
    assert all(np.exp(x["eval_loss"]) == np.float64(x["eval_ppl"]) for x in eval_rows)
    # a clearly falling loss: from ~ln(512) to well under it in 60 steps
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 2.0, train_rows
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]

    config = json.loads((workdir / "config.json").read_text())
    assert config["num_steps"] == 60 and config["mesh"]["shape"] == [2, 1, 2, 1, 2, 1]
    assert (workdir / "loss.png").stat().st_size > 10_000
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "30",
        "60",
    ]


def _params_at(workdir: Path, step: int) -> list[np.ndarray]:
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(workdir.absolute() / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in __import__("jax").tree.leaves(tree["params"])]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    cfg = tiny_config(
        num_steps=8,
        mesh={"shape": (2, 2, 2)},
        checkpoint={"every_steps": 4, "keep": 5},
        data={"num_workers": 1},
    )
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(cfg, full)
    # Simulate a run that died after its step-4 checkpoint: same config, only that checkpoint.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "4", resumed / "checkpoints" / "4")
    full_rows = read_jsonl(full / "metrics.jsonl")
    (resumed / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in full_rows if r["step"] <= 6)  # 5, 6: stale rows
    )
    train(cfg, resumed)

    losses = lambda d: [
        (r["step"], r["loss"]) for r in read_jsonl(d / "metrics.jsonl") if "loss" in r
    ]
    assert losses(resumed) == losses(full)  # same data order and randomness: bitwise
    for a, b in zip(_params_at(full, 8), _params_at(resumed, 8), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_tokenizer_is_loaded_once_per_run_however_many_evals(tmp_path, monkeypatch):
    # resources.load reads it; the train data, every eval's held-out batches and the
    # multiple-choice scorer take that one (it used to be read again at every eval).
    from bigjax.data import dataset

    loads = []
    real = dataset.tokenizer_for
    monkeypatch.setattr(dataset, "tokenizer_for", lambda cfg: loads.append(cfg) or real(cfg))
    evals = {"every_steps": 1, "num_batches": 1, "choices": "stdlib", "choice_items": 4}
    out = train(tiny_config(num_steps=3, eval=evals), tmp_path)
    assert len(loads) == 1
    assert "mc_accuracy" in out  # the scorer ran, with that tokenizer
    assert len([r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval_loss" in r]) == 3
