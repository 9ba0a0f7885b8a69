"""Compression: int8/int4 quantization error bounds and packing, magnitude pruning (and
keeping it through fine-tuning), the `bigjax compress` report, knowledge distillation."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from bigjax import compress
from bigjax.cli import main, open_run
from bigjax.train import train
from bigjax.tree import flatten


def unpack_int4(packed: np.ndarray, size: int) -> np.ndarray:
    """`compress.pack_int4` undone (what a reader of the stored weights does)."""
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:size].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained for 40 steps on an FSDP x tensor mesh."""
    path = tmp_path_factory.mktemp("compress") / "run"
    cfg = tiny_config(num_steps=40, mesh={"shape": (1, 4, 2)}, data={"seq_len": 64})
    train(cfg, path)
    return path


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_at_most_half_a_step_per_channel(bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 16, 4, 8)).astype(np.float32)  # [layers, D, H, K] like q_DHK
    q, scale = compress.quantize(w, 1, 1, bits)
    assert q.min() >= -(2 ** (bits - 1) - 1) and q.max() <= 2 ** (bits - 1) - 1
    assert scale.shape == (2, 1, 32)  # one scale per layer and output channel
    err = np.abs(compress.dequantize(q, scale, w.shape) - w).reshape(2, 16, 32)
    assert np.all(err <= scale / 2 + 1e-7)
    packed = compress.pack_int4(q) if bits == 4 else None
    if packed is not None:
        assert packed.size == (q.size + 1) // 2  # two values a byte
        np.testing.assert_array_equal(unpack_int4(packed, q.size), q.reshape(-1))


def test_int4_packing_round_trips_odd_sizes():
    v = np.arange(-7, 8, dtype=np.int8)  # 15 values
    np.testing.assert_array_equal(unpack_int4(compress.pack_int4(v), 15), v)


def test_magnitude_pruning_patterns():
    rng = np.random.default_rng(1)
    flat = {"blocks/mlp/down_FD": rng.normal(size=(2, 16, 8)).astype(np.float32),
            "blocks/attn_norm/scale": np.ones((2, 8), np.float32)}  # fmt: skip
    pruned = compress.prune_params(flat, 0.75, "unstructured")
    assert np.mean(pruned["blocks/mlp/down_FD"][0] == 0) == 0.75  # per layer, exactly
    np.testing.assert_array_equal(pruned["blocks/attn_norm/scale"], 1.0)  # norms untouched
    kept = np.abs(pruned["blocks/mlp/down_FD"][0])
    assert kept[kept > 0].min() >= np.abs(flat["blocks/mlp/down_FD"][0])[kept == 0].max()
    two_four = compress.prune_params(flat, 0.0, "2:4")["blocks/mlp/down_FD"]
    groups = two_four.reshape(2, 4, 4, 8)  # [layer, group, 4 inputs, out]
    assert np.all(np.sum(groups != 0, axis=2) == 2)  # exactly 2 of every 4 inputs survive
    original = np.abs(flat["blocks/mlp/down_FD"]).reshape(2, 4, 4, 8)
    survivors = np.where(groups != 0, original, np.inf).min(axis=2)
    dropped = np.where(groups == 0, original, -np.inf).max(axis=2)
    assert np.all(survivors >= dropped)  # the larger two survive


@pytest.mark.slow
def test_compress_quantize_reports_loss_and_size(trained, tmp_path, capsys):
    reports = {}
    for bits in (8, 4):
        out = tmp_path / f"int{bits}"
        argv = ["compress", "quantize", "--workdir", str(trained), "--out", str(out)]
        assert main([*argv, "--bits", str(bits)]) == 0
        reports[bits] = json.loads((out / "compress.json").read_text())
    out_err = capsys.readouterr()
    assert "MB int8 (" in out_err.out and "MB int4 (" in out_err.out and "x smaller" in out_err.out
    assert "compress quantize [####################] 100%" in out_err.err  # its progress
    r8, r4 = reports[8], reports[4]
    assert r8["before"] == r4["before"]
    # int8 barely moves the loss; int4 moves it more (4 bits vs 8 of resolution)
    assert abs(r8["after"]["eval_loss"] - r8["before"]["eval_loss"]) < 0.01
    assert abs(r4["after"]["eval_loss"] - r4["before"]["eval_loss"]) > abs(
        r8["after"]["eval_loss"] - r8["before"]["eval_loss"]
    )
    assert r8["f32_bytes"] / r8["quantized_bytes"] > 1.8  # embeddings stay f32
    assert r4["quantized_bytes"] < r8["quantized_bytes"]
    # the output is a run: bigjax eval on it gives the reported loss
    assert main(["eval", "--workdir", str(tmp_path / "int8")]) == 0
    assert f"{r8['after']['eval_loss']:.4f}" in capsys.readouterr().out
    # an output inside the run compressed was written into its checkpoints directory
    inside = trained / "checkpoints" / "int8"
    assert main(["compress", "quantize", "--workdir", str(trained), "--out", str(inside)]) == 2
    assert "is inside the run it compresses" in capsys.readouterr().err and not inside.exists()


def test_pruned_run_fine_tunes_and_stays_sparse(trained, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["compress", "prune", "--workdir", str(trained), "--out", str(out)]
    assert main([*argv, "--pattern", "2:4"]) == 0
    report = json.loads((out / "compress.json").read_text())
    assert report["sparsity"]["all matrices"] == pytest.approx(0.5)
    cfg = tiny_config(
        num_steps=5,
        data={"seq_len": 64},
        finetune={"keep_sparsity": True},
        checkpoint={"init_from": str(out)},
    )
    train(cfg, tmp_path / "tuned")
    with open_run(str(out), [], "t") as (_, before, _):
        before = {k: np.asarray(v) for k, v in flatten(before).items()}
    with open_run(str(tmp_path / "tuned"), [], "t") as (_, after, _):
        after = {k: np.asarray(v) for k, v in flatten(after).items()}
    for k, w in before.items():
        if compress.matrix_layout(k, w.shape):
            assert np.all(after[k][w == 0] == 0), k  # pruned weights stayed pruned
            assert not np.array_equal(after[k], w), k  # and the rest trained


@pytest.mark.slow
def test_distillation_from_a_teacher(trained, tmp_path):
    # A student identical to the teacher has zero KL at its first step...
    same = tiny_config(
        num_steps=1,
        data={"seq_len": 64},
        checkpoint={"init_from": str(trained)},
        distill={"teacher": str(trained), "alpha": 1.0, "temperature": 2.0},
    )
    train(same, tmp_path / "copy")
    first = json.loads((tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["distill_kl"] == pytest.approx(0.0, abs=1e-5)
    # A distilled run opens for the tools without its teacher (moved or deleted since).
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config["distill"]["teacher"] = str(tmp_path / "gone")
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    with open_run(str(tmp_path / "copy"), [], "eval") as (prog, params, step):
        assert step == 1 and prog.resources.teacher is None
    # ...and a smaller fresh student moves towards the teacher.
    small = dataclasses.replace(
        same, num_steps=30, checkpoint=dataclasses.replace(same.checkpoint, init_from="")
    )
    student = dataclasses.replace(small.model, d_model=64, d_ff=128)
    small = dataclasses.replace(small, model=student)
    train(small, tmp_path / "student")
    rows = [
        json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    ]
    kl = [r["distill_kl"] for r in rows if "distill_kl" in r]
    assert kl[-1] < 0.5 * kl[0]


@pytest.mark.parametrize("kill_in", ["seal", "config"])
def test_a_params_run_killed_while_written_is_no_run_and_can_be_written_again(tmp_path, kill_in):
    # (compress and convert's import write these.) The checkpoint used to be committed in
    # place first: a kill after it left a run with unverified weights and no config.json,
    # which every later write refused ("already holds checkpoints"). SIGKILL in the sealing
    # of the checksums, or in writing config.json, just before the rename that commits.
    dst = tmp_path / "out"
    script = f"""
import os, signal, numpy as np
from pathlib import Path
from bigjax import integrity, trained
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
if {kill_in!r} == "seal":
    integrity.seal = die
else:
    trained.write_text = die
trained.write_params_run(Path({str(dst)!r}), {{"a": 1}}, {{"w": np.ones((2, 2), np.float32)}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (dst / "checkpoints").exists()  # no run: a rerun may write it
    assert any(p.name.startswith(".checkpoints.partial-") for p in dst.iterdir())  # the staging
    from bigjax import integrity, runlock, trained

    trained.write_params_run(dst, {"a": 1}, {"w": np.full((2, 2), 3.0, np.float32)})
    names = sorted(p.name for p in dst.iterdir() if p.name != runlock.LOCK_NAME)
    assert names == ["checkpoints", "config.json"]  # the dead writer's staging removed
    assert json.loads((dst / "config.json").read_text()) == {"a": 1}
    assert (dst / "checkpoints" / "0" / integrity.CHECKSUMS).is_file()  # sealed, then committed


def test_a_second_writer_of_a_params_run_is_refused(tmp_path):
    # two imports or compressions into one directory both passed the "no checkpoints yet"
    # check, and the later one's config.json could land beside the earlier one's weights
    from bigjax import runlock, trained

    (tmp_path / "out").mkdir()
    held = runlock.acquire(tmp_path / "out")  # another writer, still writing
    try:
        with pytest.raises(runlock.RunLockedError, match="is in use by another bigjax run"):
            trained.write_params_run(tmp_path / "out", {"a": 1}, {"w": np.ones(2, np.float32)})
    finally:
        held.release()
    assert not (tmp_path / "out" / "checkpoints").exists()
    trained.write_params_run(tmp_path / "out", {"a": 1}, {"w": np.ones(2, np.float32)})
    assert (tmp_path / "out" / "checkpoints" / "0").is_dir()
