"""Weights & Biases logging (metrics.wandb_project), in W&B's offline mode: no network."""

import json
import struct
from pathlib import Path

import pytest
from conftest import tiny_config

from bigjax.train import train

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def _records(path: Path):
    """The records of a W&B run file: a 7-byte file header, then LevelDB-style log blocks of
    32 KiB holding [crc:4][length:2][type:1] chunks (types: 1 full, 2 first, 3 middle, 4
    last). W&B ships no Python reader any more; this one is all the test needs."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _logged(workdir: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of every W&B run file under the workdir, in order."""
    rows, config = [], {}
    for path in sorted(workdir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in _records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                rows.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind in ("config", "run"):  # the config comes with the run record
                updates = r.config.update if kind == "config" else r.run.config.update
                config |= {_key(i): json.loads(i.value_json) for i in updates}
    return rows, config


def test_metrics_go_to_one_wandb_run_per_workdir_across_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # bigjax sets dir: ignored
    ckpt = {"every_steps": 2}
    metrics = {"log_every": 1, "wandb_project": "bigjax-test"}
    train(tiny_config(num_steps=2, checkpoint=ckpt, metrics=metrics), tmp_path)
    train(tiny_config(num_steps=3, checkpoint=ckpt, metrics=metrics), tmp_path)
    rows, config = _logged(tmp_path)
    local = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # every metrics.jsonl row, with the same values, at bigjax's step
    assert [r["step"] for r in rows] == [r["step"] for r in local] and len(rows) >= 4
    for got, want in zip(rows, local, strict=True):
        assert got["loss" if "loss" in want else "eval_loss"] == pytest.approx(
            want.get("loss", want.get("eval_loss")), rel=1e-6
        )
    assert config["optim"]["lr"] == 0.003 and config["num_steps"] == 3  # the latest config
    run_id = (tmp_path / "wandb" / "run_id").read_text()
    files = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(files) == 2 and all(p.name.endswith(run_id) for p in files)  # one W&B run
