"""Multi-process JAX on localhost: 2 processes x 4 CPU devices, real coordinator, gloo."""

import os
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import train_cmd

from bigjax.distributed import should_auto_initialize
from bigjax.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, steps: int, processes: int = 2) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    procs = [
        subprocess.Popen(
            train_cmd(
                workdir,
                f"--config.num_steps={steps}",
                "--config.data.seq_len=64",
                "--config.checkpoint.every_steps=3",
                "--config.metrics.log_every=1",
                "--config.metrics.tensorboard=false",
                "--config.eval.num_batches=1",
                "--coordinator_address",
                f"127.0.0.1:{port}",
                "--num_processes",
                str(processes),
                "--process_id",
                str(i),
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=400)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    first = _launch(tmp_path, steps=6)
    assert all(r.returncode == 0 for r in first), first[0].stderr[-2000:] + first[1].stderr[-2000:]
    assert "over 8 cpu devices (process 0/2, 4 local)" in first[0].stdout
    assert "step" not in first[1].stdout  # only process 0 logs and writes metrics
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r] == list(
        range(1, 7)
    )
    # every process takes part in the checkpoint: one data-iterator state per process
    data = {p.name for p in (tmp_path / "checkpoints" / "6" / "data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data
    second = _launch(tmp_path, steps=8)
    assert all(r.returncode == 0 for r in second), second[0].stderr[-2000:]
    assert "resuming from step 6" in second[0].stdout
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, True),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ],
)
def test_auto_initialize_only_where_jax_can_find_the_coordinator(env, expected):
    assert should_auto_initialize(env) is expected
