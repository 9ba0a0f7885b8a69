"""Splitting one machine's accelerators (or CPU cores) between concurrent trial processes.

Found without importing jax: a sweep's parent process must not claim the GPUs or TPU chips
that its trials need.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Sequence


def split(items: Sequence[int], parts: int) -> list[list[int]]:
    """`items` in `parts` contiguous, equal groups. Raises ValueError when they do not divide:
    trials of one sweep must be comparable, so none gets more devices than another."""
    if parts < 1:
        raise ValueError(f"--workers must be >= 1, got {parts}")
    if len(items) % parts:
        raise ValueError(
            f"{len(items)} devices cannot be split evenly between {parts} workers; use a "
            f"divisor of {len(items)} for --workers."
        )
    size = len(items) // parts
    return [list(items[i * size : (i + 1) * size]) for i in range(parts)]


def gpus() -> list[int]:
    """NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES first, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(d) for d in visible.split(",") if d.strip().isdigit()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return list(range(sum(line.startswith("GPU ") for line in out.stdout.splitlines())))


def tpu_chips() -> list[int]:
    """TPU chips on this VM (/dev/accel* on v4/v5e/v6e, /dev/vfio/* on v5p)."""
    accel = glob.glob("/dev/accel*")
    vfio = [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]
    return list(range(len(accel) or len(vfio)))


def trial_env(slot: int, workers: int) -> tuple[dict[str, str], list[int] | None]:
    """Environment variables (and, on CPU, the cores to pin to) for worker `slot` of
    `workers` on this machine, so that concurrent trials never share a device."""
    if workers == 1:
        return {}, None
    gpu_ids = gpus()
    if gpu_ids:
        mine = split(gpu_ids, workers)[slot]
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, mine))}, None
    chips = tpu_chips()
    if chips:
        mine = split(chips, workers)[slot]
        # One libtpu process per group of chips; each needs its own ports (Cloud TPU docs,
        # "run multiple processes on one TPU VM").
        return {
            "TPU_VISIBLE_CHIPS": ",".join(map(str, mine)),
            "TPU_CHIPS_PER_PROCESS_BOUNDS": f"{len(mine)},1,1",
            "TPU_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_PORT": str(8476 + slot),
            "TPU_PROCESS_ADDRESSES": f"localhost:{8476 + slot}",
            "CLOUD_TPU_TASK_ID": "0",
        }, None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:  # more workers than cores: share them round-robin
        return {}, [cores[slot % len(cores)]]
    return {}, split(cores[: len(cores) - len(cores) % workers], workers)[slot]
