"""Directories replaced whole: written complete beside their target, then swapped into place
in one step, so that a kill at any point leaves the previous directory or the new one, never
a mix (a dataset from `bigjax prepare`, a Hugging Face export).

The swap is Linux's `renameat2(RENAME_EXCHANGE)`; where the kernel or filesystem lacks it, two
renames (the previous directory aside, the new one in), between which the target is briefly
absent but nothing is lost. A target that is a link is followed: the directory it points to
is the one replaced (the staging beside it, on its filesystem), and the link stays a link.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


def staging_dir(final: Path) -> Path:
    """A fresh, empty directory beside `final` (the same filesystem, so the swap is a rename),
    with the permissions a new directory gets here (not mkdtemp's private 0700). Its name
    carries this host and process; stagings beside `final` left by dead processes of this
    host (a killed prepare or export) are removed first."""
    final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    prefix = f".{final.name}.partial-"
    for old in final.parent.iterdir():  # not glob: a name may hold `[` or `*`
        owner = old.name.removeprefix(prefix).rsplit("-", 2)  # host, pid, mkdtemp's suffix
        if (
            old.name.startswith(prefix)
            and len(owner) == 3
            and owner[0] == host
            and owner[1].isdigit()
            and not _alive(int(owner[1]))
        ):
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{host}-{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


def swap_in(staged: Path, final: Path) -> None:
    """Puts the complete directory `staged` at `final`; the previous `final`, if any, is
    removed once the new one is in place."""
    final = final.resolve()
    if not final.exists():
        os.rename(staged, final)
        return
    if _exchange(staged, final):
        shutil.rmtree(staged)  # now the previous directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, old / final.name)
    os.rename(staged, final)
    shutil.rmtree(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


@functools.cache
def _renameat2() -> Any:  # the libc function, or None where libc lacks it
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return getattr(libc, "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directories; False where the platform cannot."""
    fn = _renameat2() if os.name == "posix" else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return bool(fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0)
