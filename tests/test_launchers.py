"""The TPU and SLURM launchers, through --dry-run (what they would run, exactly)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
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
