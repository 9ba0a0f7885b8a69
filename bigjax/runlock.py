"""One writer per directory: an advisory lock held while a run trains in it (or while
`bigjax prepare` writes a dataset).

The lock is `fcntl.flock` on a lock file (`workdir/.bigjax.lock` for a run), which the kernel
releases when its process dies however it dies (kill -9 included), so a lock is never left
behind on a live machine; on NFS the server releases it when the dead client's lease expires.
The file also holds who took it (host, pid, start time), to name the holder when a second
writer is refused and to say whose lock was taken over after a crash. Only the primary process
of a multi-host run takes it (the others write nothing but their share of each checkpoint).
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

from bigjax.errors import UsageError

LOCK_NAME = ".bigjax.lock"


class LockFileError(UsageError, RuntimeError):
    """A lock path that cannot be a lock file (a directory, unwritable); the message says so."""


class RunLockedError(LockFileError):
    """Another live process trains in this run directory; the message names it."""


class Held(Exception):
    """`take` found the lock held by a live process: `record` says who (None if unknown)."""

    def __init__(self, record: dict[str, Any] | None):
        super().__init__(describe(record))
        self.record = record


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


def read_record(path: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the lock file `path`, from its record; None if it has no
    readable one (empty, damaged, not a file)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return record if isinstance(record, dict) else None


def holder(workdir: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the lock of `workdir`, from its record; None if no record."""
    return read_record(Path(workdir) / LOCK_NAME)


def is_locked(workdir: Path) -> bool:
    """Whether a live process holds the lock of `workdir` (tested without taking it)."""
    path = Path(workdir) / LOCK_NAME
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
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
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        started = "at an unknown time"
    return f"pid {record.get('pid')} on {record.get('host')}, started {started}"


def take(path: Path) -> RunLock:
    """Takes the lock file `path` (created if missing) and records this process in it; raises
    Held if a live process holds it, LockFileError if `path` cannot be a lock file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except IsADirectoryError:
        raise LockFileError(
            f"{path} is a directory, not bigjax's lock file; remove it (rmdir) and rerun."
        ) from None
    except OSError as e:
        raise LockFileError(
            f"cannot write the lock file {path} ({e.strerror}): bigjax needs a directory it can "
            "write to."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Held(read_record(path)) from None
    previous = read_record(path)  # a record with the lock free: its writer died holding it
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, previous)


def acquire(workdir: Path) -> RunLock:
    """Takes the lock of `workdir` or raises RunLockedError naming the live holder."""
    try:
        return take(Path(workdir) / LOCK_NAME)
    except Held as held:
        raise RunLockedError(
            f"{workdir} is in use by another bigjax run ({held}); wait for it to finish or "
            "stop it, or train in another --workdir."
        ) from None
