"""The TPU and SLURM launchers, run for real with a fake `gcloud` / `sbatch` first on PATH
that records every call: what they would run, exactly, and what they must never run."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Records its argv (one shell-quoted line per call) and, for sbatch, the script on its stdin.
FAKE = """#!/usr/bin/env bash
printf '%q ' "$(basename "$0")" "$@" >> "$FAKE_LOG"; printf '\\n' >> "$FAKE_LOG"
if [[ "$(basename "$0")" == sbatch ]]; then cat > "$FAKE_LOG.script"; fi
"""


@pytest.fixture
def fake(tmp_path):
    """Runs a launcher with fake gcloud and sbatch; returns (run, calls, the call log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "sbatch"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"

    def run(script: str, *args: str, stdin: str = "", env: dict | None = None):
        return subprocess.run(
            ["bash", str(ROOT / "scripts" / script), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                 **(env or {})},
        )  # fmt: skip

    def calls() -> list[list[str]]:
        return [shlex.split(x) for x in log.read_text().splitlines()] if log.exists() else []

    return run, calls, log


def test_dry_run_anywhere_on_the_line_runs_nothing(fake):
    run, calls, _ = fake
    for args in (
        ["--dry-run", "create", "pod", "us-east5-a", "v5p-128"],
        ["create", "pod", "us-east5-a", "v5p-128", "--dry-run"],  # the report's case
        ["create", "pod", "--dry-run", "us-east5-a", "v5p-128"],
        ["delete", "pod", "us-east5-a", "--dry-run"],
        ["run", "pod", "z", "--dry-run", "--", "bigjax", "train", "--config", "c.py"],
        ["logs", "pod", "z", "3", "--dry-run"],
    ):
        r = run("tpu/launch.sh", *args)
        assert r.returncode == 0, (args, r.stderr)
        assert "+ gcloud compute tpus" in r.stdout  # it says what it would run
    assert calls() == []  # and ran none of it
    r = run("slurm/launch.sh", "4", "8", "--dry-run", "--", "bigjax", "train")
    assert r.returncode == 0 and "#SBATCH --nodes=4" in r.stdout and calls() == []


def test_a_misspelt_option_is_an_error_not_a_real_run(fake):
    run, calls, _ = fake
    for script, args in (
        ("tpu/launch.sh", ["delete", "pod", "z", "--dryrun"]),
        ("tpu/launch.sh", ["create", "pod", "z", "v5p-8", "-n"]),
        ("slurm/launch.sh", ["2", "8", "--dry_run", "--", "bigjax", "train"]),
    ):
        r = run(script, *args)
        assert r.returncode == 2 and "unknown option" in r.stderr, (args, r.stderr)
    assert calls() == []


def test_create_and_run_call_gcloud_with_exactly_these_arguments(fake):
    run, calls, _ = fake
    assert run("tpu/launch.sh", "create", "pod", "us-east5-a", "v5p-128").returncode == 0
    r = run("tpu/launch.sh", "run", "pod", "us-east5-a", "--", "bigjax", "train", "--config",
            "configs/llama_8b.py", "--workdir", "/mnt/runs/8b", "--dry-run")  # fmt: skip
    assert r.returncode == 0, r.stderr
    create, ssh = calls()
    assert create == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--zone", "us-east5-a",
        "--node-id", "pod", "--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5",
    ]  # fmt: skip
    assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone",
                       "us-east5-a", "--worker=all"]  # fmt: skip
    # After `--` is the user's command, passed on whole: its own --dry-run is not ours.
    assert "BIGJAX_DISTRIBUTED=1" in ssh[-1]
    assert "configs/llama_8b.py --workdir /mnt/runs/8b --dry-run" in ssh[-1]


def test_delete_asks_and_deletes_only_on_yes(fake):
    run, calls, _ = fake
    for answer in ("", "n\n", "no\n", "yes please\n"):
        r = run("tpu/launch.sh", "delete", "pod", "z", stdin=answer)
        assert r.returncode == 1 and "nothing deleted" in r.stderr, (answer, r.stderr)
        assert "Delete queued resource pod in z" in r.stderr
    assert calls() == []
    assert run("tpu/launch.sh", "delete", "pod", "z", stdin="y\n").returncode == 0
    assert run("tpu/launch.sh", "delete", "pod", "z", "--yes").returncode == 0  # no question
    delete = ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod", "--zone", "z",
              "--force", "--quiet"]  # fmt: skip
    assert calls() == [delete, delete]


def test_multi_slice_acts_on_every_slice(fake):
    run, calls, _ = fake
    two = {"SLICES": "2"}
    r = run("tpu/launch.sh", "create", "pod", "z", "v5p-128", env=two)
    assert r.returncode == 0
    assert run("tpu/launch.sh", "run", "pod", "z", "--", "bigjax", "train", env=two).returncode == 0
    create, *ssh = calls()
    assert (
        create[8:12] == ["--node-count", "2", "--node-prefix", "pod"] and "--node-id" not in create
    )
    assert [c[5] for c in ssh] == ["pod-0", "pod-1"]  # every slice runs it
    assert run("tpu/launch.sh", "logs", "pod", "z", env={"SLICES": "0"}).returncode == 2
    assert run("tpu/launch.sh", "explode", "pod", "z").returncode == 2
    assert len(calls()) == 3


def test_slurm_submits_the_script_it_prints(fake):
    run, calls, log = fake
    args = ["4", "8", "--", "bigjax", "train", "--config", "configs/llama_1b.py", "--workdir",
            "/shared/run"]  # fmt: skip
    dry = run("slurm/launch.sh", "--dry-run", *args)
    r = run("slurm/launch.sh", *args, env={"SBATCH_ARGS": "--partition=gpu"})
    assert r.returncode == 0, r.stderr
    assert calls() == [["sbatch", "--partition=gpu"]]
    submitted = Path(f"{log}.script").read_text()
    assert "#SBATCH --nodes=4" in submitted and "#SBATCH --gpus-per-node=8" in submitted
    assert "srun --kill-on-bad-exit=1 bigjax train --config configs/llama_1b.py" in submitted
    assert submitted.strip() in dry.stdout  # what --dry-run shows is what is submitted
    assert run("slurm/launch.sh", "4").returncode == 2
    assert run("slurm/launch.sh", "0", "8", "--", "bigjax").returncode == 2
    assert len(calls()) == 1
