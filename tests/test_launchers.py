"""The TPU and SLURM launchers, through --dry-run (what they would run, exactly)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_tpu_lifecycle_commands():
    r = _dry("tpu/launch.sh", "create", "pod", "us-east5-a", "v5p-128")
    assert r.returncode == 0 and "queued-resources create pod" in r.stdout
    assert "--accelerator-type v5p-128" in r.stdout
    r = _dry(
        "tpu/launch.sh",
        "run",
        "pod",
        "us-east5-a",
        "--",
        "bigjax",
        "train",
        "--config",
        "configs/llama_8b.py",
        "--workdir",
        "/mnt/runs/8b",
    )
    assert r.returncode == 0 and "--worker=all" in r.stdout
    assert "BIGJAX_DISTRIBUTED=1" in r.stdout and "configs/llama_8b.py" in r.stdout
    for verb in ("install", "logs", "delete"):
        assert _dry("tpu/launch.sh", verb, "pod", "us-east5-a").returncode == 0
    assert _dry("tpu/launch.sh", "explode", "pod", "z").returncode == 2


def test_tpu_multi_slice():
    two = {"SLICES": "2"}
    r = _dry("tpu/launch.sh", "create", "pod", "z", "v5p-128", env=two)
    assert "--node-count 2 --node-prefix pod" in r.stdout and "--node-id" not in r.stdout
    r = _dry("tpu/launch.sh", "run", "pod", "z", "--", "bigjax", "train", env=two)
    lines = [x for x in r.stdout.splitlines() if "tpu-vm ssh" in x]
    assert [x.split()[6] for x in lines] == ["pod-0", "pod-1"]  # every slice runs it
    assert _dry("tpu/launch.sh", "logs", "pod", "z", env={"SLICES": "0"}).returncode == 2


def test_slurm_script():
    r = _dry(
        "slurm/launch.sh",
        "4",
        "8",
        "--",
        "bigjax",
        "train",
        "--config",
        "configs/llama_1b.py",
        "--workdir",
        "/shared/run",
    )
    assert r.returncode == 0
    assert "#SBATCH --nodes=4" in r.stdout and "#SBATCH --gpus-per-node=8" in r.stdout
    assert "srun --kill-on-bad-exit=1 bigjax train --config configs/llama_1b.py" in r.stdout
    assert _dry("slurm/launch.sh", "4").returncode == 2
