"""Which JAX platforms a command starts: libtpu only where there is a TPU to drive.

With the `tpu` extra installed, JAX starts libtpu on every start, and libtpu takes
`/tmp/libtpu_lockfile` for the whole life of the process even with no chip to drive: a CPU
training run then kept `bigjax plan` from compiling for a TPU topology beside it. So on a
machine without TPU chips JAX is told the platforms it can really use (the CPU, and a GPU
where one and its JAX plugin are present), unless the user chose them (`JAX_PLATFORMS`).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from bigjax.errors import BigjaxWarning, RunFailed

GOOGLE_PCI_VENDOR = "0x1ae0"
NOT_ACCELERATORS = ("0x01", "0x02")  # PCI classes of Google's disks and NICs (gVNIC)
LIBTPU_LOCKFILE = Path("/tmp/libtpu_lockfile")


class DeviceBusyError(RunFailed, RuntimeError):
    """The accelerator is held by another process; the message names it."""


def has_tpu() -> bool:
    """Whether this machine may have TPU chips: a Google PCI device that is not a disk or a
    network card, or a TPU device node. Errs towards yes: a false yes keeps JAX's default."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text(encoding="ascii").strip() != GOOGLE_PCI_VENDOR:
                continue
            device_class = (Path(vendor).parent / "class").read_text(encoding="ascii").strip()
        except OSError:
            return True
        if not device_class.startswith(NOT_ACCELERATORS):
            return True
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _plugin_installed(word: str) -> bool:
    """A JAX PJRT plugin for `word` (cuda, rocm): an entry point or a jax_plugins module."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins  # type: ignore[import-not-found]  # a namespace package of plugins

        names += [Path(p).name for path in jax_plugins.__path__ for p in glob.glob(f"{path}/*")]
    return any(word in name for name in names)


def usable_without_tpu() -> str:
    """The platforms of this machine other than the TPU, as JAX names them."""
    found = []
    if any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl")):
        found += ["cuda"] if _plugin_installed("cuda") else []
    if os.path.exists("/dev/kfd") and _plugin_installed("rocm"):
        found.append("rocm")
    return ",".join([*found, "cpu"])


def choose() -> None:
    """Keeps libtpu from starting on a machine without TPU chips; call before JAX starts its
    backends. A choice the user made (`JAX_PLATFORMS`, jax.config) stands."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:  # type: ignore[attr-defined]
        return
    if importlib.util.find_spec("libtpu") is None or has_tpu():
        return
    jax.config.update("jax_platforms", usable_without_tpu())


def safe_compilation_cache(devices: Sequence[jax.Device]) -> None:
    """Turns JAX's persistent compilation cache off, with a warning, for a run on several CPU
    devices: a program read back from it there waits for ever in its collectives over part of
    the devices (jax 0.10.2: an all-gather over 4 of 8 fake devices, a (2, 2, 2) mesh), and
    XLA aborts the process after its 40 s rendezvous timeout, so the second run of a config
    hung and died. One CPU device, a GPU or a TPU keeps the cache."""
    config = jax.config
    on = getattr(config, "jax_enable_compilation_cache", True)
    on = on and getattr(config, "jax_compilation_cache_dir", None)
    if not on or len(devices) < 2 or devices[0].platform != "cpu":
        return
    warnings.warn(
        f"JAX's persistent compilation cache is off for this run: on {len(devices)} CPU "
        "devices, XLA:CPU programs read back from it deadlock in their collectives. Unset "
        "JAX_COMPILATION_CACHE_DIR (or jax_compilation_cache_dir) to drop this warning.",
        BigjaxWarning,
        stacklevel=2,
    )
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # forgets whether an earlier compile used it


def allow_compile_only_libtpu() -> None:
    """For compiling for a TPU topology (`bigjax plan`) on a machine without TPU chips: the
    lockfile guards chips, and there are none, so another libtpu user (a second plan) must not
    block this one."""
    if not has_tpu():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def lockfile_holders() -> list[int]:
    """Pids of the other processes that hold libtpu's lockfile open (those this user may
    inspect): this one opened it too, to try its lock."""
    pids = set()
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(LIBTPU_LOCKFILE):
                pids.add(int(fd.split("/")[2]))
        except OSError:
            continue
    return sorted(pids - {os.getpid()})


def busy_error(e: Exception) -> DeviceBusyError | None:
    """A one-line DeviceBusyError for libtpu's "lockfile" failure (another process drives the
    TPU), naming the holders; None for any other error."""
    if "libtpu" not in str(e) or "lockfile" not in str(e):
        return None
    holders = lockfile_holders()
    who = f"pid {', '.join(map(str, holders))}" if holders else "another process"
    return DeviceBusyError(
        f"the TPU is in use: {who} holds libtpu's lock ({LIBTPU_LOCKFILE}). Wait for it to "
        "finish or stop it; only one process drives a TPU's chips at a time."
    )
