"""Checkpoint integrity: checksums of every committed step, verified before a restore;
corrupt steps moved aside; no non-finite state written or restored.

Orbax's atomic commit guarantees a step is complete when it is listed, not that its bytes
stay right on disk (a flipped bit, a bad sector, a copy gone wrong). So after each commit the
primary process writes `bigjax_checksums.json` into the step: size and SHA-256 of every file
(tensor data, data-iterator states, metadata). A restore verifies them first; a step that
fails is moved to `<checkpoints>.corrupt/` (kept for inspection, and out of the way of the
step number, which a retrained run saves again) and the previous step is tried.

A step without the file is one committed before this existed, or by a run killed between the
commit and the checksums: it is restored with a warning that it could not be verified (a step
is only ever sealed by the process that wrote it, never blessed after the fact).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

CHECKSUMS = "bigjax_checksums.json"
CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    h = hashlib.sha256()  # hashlib releases the GIL on large buffers: sealing runs beside
    with path.open("rb") as f:  # training in Orbax's background thread
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    # the checksums file and its temporary (a seal killed half-way) are not part of the save
    return sorted(
        p
        for p in step_dir.rglob("*")
        if p.is_file() and not p.name.lstrip(".").startswith(CHECKSUMS)
    )


def seal(step_dir: Path) -> None:
    """Writes the checksums of a committed step (atomically: a reader sees all or none)."""
    step_dir = Path(step_dir)
    record = {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(step_dir)
    }
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": record}, indent=1) + "\n")
    os.replace(tmp, step_dir / CHECKSUMS)


def is_sealed(step_dir: Path) -> bool:
    return (Path(step_dir) / CHECKSUMS).is_file()


def verify(step_dir: Path) -> str | None:
    """None if every file matches its checksum; else what is wrong, naming the file.
    A step without checksums is not checked here (see `is_sealed`)."""
    step_dir = Path(step_dir)
    try:
        record = json.loads((step_dir / CHECKSUMS).read_text())["files"]
        assert isinstance(record, dict)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        return f"{step_dir / CHECKSUMS} is unreadable ({type(e).__name__})"
    for name, want in sorted(record.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{path} has {path.stat().st_size} bytes, {want.get('size')} were written"
        if _sha256(path) != want.get("sha256"):
            return f"{path} does not match its checksum (its bytes changed after the save)"
    extra = [
        str(p.relative_to(step_dir))
        for p in _files(step_dir)
        if str(p.relative_to(step_dir)) not in record
    ]  # noqa: E501
    if extra:
        return f"{step_dir} holds files the save did not write: {', '.join(extra[:3])}"
    return None


def quarantine(step_dir: Path) -> Path:
    """Moves a corrupt step to `<checkpoints>.corrupt/<step>-<unix time>`; returns where."""
    step_dir = Path(step_dir)
    aside = step_dir.parent.with_name(step_dir.parent.name + ".corrupt")
    aside.mkdir(exist_ok=True)
    dest = aside / f"{step_dir.name}-{int(time.time())}"
    os.replace(step_dir, dest)
    return dest


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def state_finite(tree: Any) -> bool:
    """Whether every floating-point array of `tree` (parameters, optimizer moments) is
    finite; one device reduction and one scalar read."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return bool(_all_finite(leaves)) if leaves else True
