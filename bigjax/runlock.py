"""One writer per run directory: an advisory lock held while a run trains in it.

The lock is `fcntl.flock` on `workdir/.bigjax.lock`, which the kernel releases when its
process dies however it dies (kill -9 included), so a lock is never left behind on a live
machine; on NFS the server releases it when the dead client's lease expires. The file also
holds who took it (host, pid, start time), to name the holder when a second run is refused
and to say whose lock was taken over after a crash. Only the primary process of a multi-host
run takes it (the others write nothing but their share of each checkpoint).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".bigjax.lock"


class RunLockedError(RuntimeError):
    """Another live process trains in this run directory; the message names it."""


@dataclasses.dataclass
class RunLock:
    """A held lock; `release()` (or process exit) frees it. `previous` describes a holder that
    died without releasing it (its record was still in the file), else None."""

    path: Path
    fd: int
    previous: dict[str, Any] | None

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # closing releases the flock
                self.fd = -1


def holder(workdir: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the lock of `workdir`, from its record; None if no record."""
    try:
        text = (Path(workdir) / LOCK_NAME).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, json.JSONDecodeError):
        return None


def is_locked(workdir: Path) -> bool:
    """Whether a live process holds the lock of `workdir` (tested without taking it)."""
    path = Path(workdir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock
    return False


def describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"pid {record.get('pid')} on {record.get('host')}, started {started}"


def acquire(workdir: Path) -> RunLock:
    """Takes the lock of `workdir` or raises RunLockedError naming the live holder."""
    path = Path(workdir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{workdir} is in use by another bigjax run ({describe(holder(workdir))}); "
            "wait for it to finish or stop it, or train in another --workdir."
        ) from None
    previous = holder(workdir)  # a record with the lock free: its writer died holding it
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, previous)
