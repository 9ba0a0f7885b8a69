"""Joining JAX's multi-controller runtime: explicit flags, or automatic on Cloud TPU and SLURM."""

from __future__ import annotations

import os

import jax

from bigjax import platforms
from bigjax.errors import UsageError


class DistributedError(UsageError, ValueError):
    """Multi-process flags that cannot start a job; the message says which and how."""


def should_auto_initialize(env: dict[str, str]) -> bool:
    """True on a multi-host Cloud TPU slice or a multi-task SLURM job, where
    `jax.distributed.initialize()` finds the coordinator by itself; or when a launcher
    (scripts/tpu, scripts/slurm) says so with BIGJAX_DISTRIBUTED=1."""
    if env.get("BIGJAX_DISTRIBUTED") == "1":
        return True
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in tpu_hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env


def initialize(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Starts multi-process JAX before anything touches a device. A no-op for one process."""
    platforms.choose()  # first: which platforms start decides the collectives below
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        check_flags(coordinator_address, num_processes, process_id)
        chosen = jax.config.jax_platforms  # type: ignore[attr-defined]  # set by a flag holder
        if chosen in (None, "", "cpu") and not _has_accelerator_plugin():
            # CPU-only processes need a collectives backend to talk to each other.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif should_auto_initialize(dict(os.environ)):
        jax.distributed.initialize()


def check_flags(address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """The explicit flags, before JAX takes them: a malformed address or index was a Python
    traceback from JAX, or a process waiting minutes for peers that could never connect."""
    if address is None or num_processes is None or process_id is None:
        raise DistributedError(
            "give all of --coordinator_address HOST:PORT --num_processes N --process_id I"
        )
    host, _, port = address.rpartition(":")
    if (
        not host
        or any(c.isspace() for c in host)
        or not port.isdigit()
        or not 0 < int(port) < 2**16
    ):
        raise DistributedError(
            f"--coordinator_address {address!r}: expected HOST:PORT, the port from 1 to 65535, "
            "where process 0 listens (e.g. 10.130.0.2:8476, or [fd00::2]:8476)."
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process_id {process_id} of --num_processes {num_processes}: the processes are "
            f"numbered 0 to N-1, one each, and N is at least 1."
        )


def _has_accelerator_plugin() -> bool:
    return os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu")


def describe() -> str:
    """This process's place in the job, for the first log line."""
    return f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local"
