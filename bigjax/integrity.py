"""Checkpoint integrity: checksums of every step, written before its commit and verified
before anything of it is read; corrupt steps moved aside; no non-finite state written or
restored.

Orbax's atomic commit guarantees a step is complete when it is listed, not that its bytes
stay right on disk (a flipped bit, a bad sector, a copy gone wrong). So the primary process
writes `bigjax_checksums.json` into each step (size and SHA-256 of every file: tensor data,
data-iterator states, metadata) while the step is still Orbax's temporary directory, after
every file is written and just before Orbax renames it into place: a committed step is a
sealed step, with no window in which a kill leaves it unverifiable. Orbax's own commit
bookkeeping, written during that rename (`commit_success.txt`, the commit time in
`_CHECKPOINT_METADATA`), is the one part not covered. A restore verifies a step before reading
any of it, its metadata included; a step that fails is moved to `<checkpoints>.corrupt/` (kept
for inspection, and out of the way of the step number, which a retrained run saves again) and
the previous step is tried.

A step without the file was committed by a bigjax that did not keep checksums, or by a
synchronous save (`checkpoint.async_save=false`, sealed right after its commit) whose process
died in between: it is restored with a warning that it could not be verified (a step is only
ever sealed by the process that wrote it, never blessed after the fact).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import heapq
import json
import os
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from bigjax.errors import BigjaxWarning

CHECKSUMS = "bigjax_checksums.json"
CHUNK = 1 << 22
MAX_HASH_THREADS = 16  # past this a checkpoint's reads, not the hashing, are the limit


def _sha256(path: Path) -> str:
    h = hashlib.sha256()  # hashlib releases the GIL on large buffers: sealing runs beside
    with path.open("rb") as f:  # training in Orbax's background thread
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256s(paths: list[Path]) -> list[str]:
    """The SHA-256 of each file, several at once (hashlib releases the GIL while it hashes:
    threads use as many cores as there are files), the largest first so that no big file is
    left to hash alone at the end. One thread hashed a checkpoint at about 1 GB/s (SHA-NI),
    on the restore's critical path."""
    order = sorted(range(len(paths)), key=lambda i: -paths[i].stat().st_size)
    workers = max(1, min(len(paths), os.cpu_count() or 1, MAX_HASH_THREADS))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        digests = dict(zip(order, pool.map(lambda i: _sha256(paths[i]), order), strict=True))
    return [digests[i] for i in range(len(paths))]


def _share(sizes: dict[str, int], index: int, count: int) -> set[str]:
    """The files process `index` of `count` hashes: largest first, each to the process with
    the fewest bytes so far, so the processes finish together (by file count, one could get
    every large file). The same on every process: it reads only the record."""
    loads = [(0, p) for p in range(count)]  # a heap of (bytes so far, process)
    mine = set()
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, who = heapq.heappop(loads)
        heapq.heappush(loads, (load + sizes[name], who))
        if who == index:
            mine.add(name)
    return mine


# Written by Orbax while it commits a step, after the checksums: not covered by them.
COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _files(step_dir: Path) -> list[str]:
    """The files a save wrote, relative to the step: not the checksums file or its temporary
    (a seal killed half-way), nor Orbax's commit bookkeeping."""
    return sorted(
        name
        for p in step_dir.rglob("*")
        if p.is_file()
        and not p.name.lstrip(".").startswith(CHECKSUMS)
        and (name := str(p.relative_to(step_dir))) not in COMMIT_FILES
    )


def _litter(name: str) -> bool:
    """A hidden file the save did not write: what desktops and file systems leave in folders
    (.DS_Store, ._AppleDouble, NFS's .nfsXXXX, .fuse_hidden*, an editor's swap file). It is
    no part of the checkpoint (nothing restored reads it, and every file the save wrote is
    still checked), and treating it as damage moved a good step aside and lost its steps."""
    return any(part.startswith(".") for part in Path(name).parts)


def seal(step_dir: Path) -> None:
    """Writes the checksums of a step whose files are all written (atomically: a reader sees
    all or none)."""
    step_dir = Path(step_dir)
    names = _files(step_dir)
    digests = _sha256s([step_dir / name for name in names])
    record = {
        name: {"size": (step_dir / name).stat().st_size, "sha256": digest}
        for name, digest in zip(names, digests, strict=True)
    }
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"version": 1, "files": record, "sha256": _own_digest(record)},
                           indent=1) + "\n")  # fmt: skip
        f.flush()
        os.fsync(f.fileno())  # on disk before Orbax's rename commits the step
    os.replace(tmp, step_dir / CHECKSUMS)


def _own_digest(record: dict) -> str:
    """The checksums' own checksum: a changed bit in a name, size or digest of the list is
    then blamed on the list, not on the file it happens to name."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def is_sealed(step_dir: Path) -> bool:
    return (Path(step_dir) / CHECKSUMS).is_file()


def verify(step_dir: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None if every file matches its checksum; else what is wrong, naming the file.
    A step without checksums is not checked here (see `is_sealed`). `share` (i, n): hash only
    process i's share of the bytes (`_share`), of a step that n processes check together and
    then agree on (sizes and the list of files are checked whole: no reading)."""
    step_dir = Path(step_dir)
    try:
        sealed = json.loads((step_dir / CHECKSUMS).read_text(encoding="utf-8"))
        record = sealed["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or UTF-8
        return f"{step_dir / CHECKSUMS} is unreadable ({type(e).__name__})"
    if not _well_formed(record):
        return f"{step_dir / CHECKSUMS} is damaged (not a checksum per file)"
    # seals before this one had no digest of their own: their files are checked all the same
    if "sha256" in sealed and sealed["sha256"] != _own_digest(record):
        return (f"{step_dir / CHECKSUMS} is damaged (it does not match its own checksum: its "
                "bytes changed after the save)")  # fmt: skip
    for name, want in sorted(record.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{path} has {path.stat().st_size} bytes, {want['size']} were written"
    mine = sorted(_share({n: w["size"] for n, w in record.items()}, *share))
    for name, digest in zip(mine, _sha256s([step_dir / n for n in mine]), strict=True):
        if digest != record[name]["sha256"]:
            return (
                f"{step_dir / name} does not match its checksum (its bytes changed after the save)"
            )
    extra = [name for name in _files(step_dir) if name not in record and not _litter(name)]
    if extra:
        return f"{step_dir} holds files the save did not write: {', '.join(extra[:3])}"
    return None


def checked(step_dir: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """`verify`, warning when the step has no checksums (it is then used unverified)."""
    problem = verify(step_dir, share)
    if problem is None and not is_sealed(step_dir):
        warnings.warn(
            f"checkpoint {step_dir} has no checksums: it was written by a bigjax that did not "
            "keep them, or by a synchronous save (checkpoint.async_save=false) whose process "
            "died between its commit and its checksums; using it unverified.",
            category=BigjaxWarning,
            stacklevel=3,
        )
    return problem


def _well_formed(record: object) -> bool:
    """{relative path: {"size": int, "sha256": str}}, as `seal` writes it (older seals also
    list the commit files; they are then checked like the rest)."""
    return isinstance(record, dict) and all(
        isinstance(name, str)
        and isinstance(want, dict)
        and isinstance(want.get("size"), int)
        and isinstance(want.get("sha256"), str)
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        for name, want in record.items()
    )


def aside_dir(checkpoints: Path) -> Path:
    """Where corrupt steps of `checkpoints` are moved: `<checkpoints>.corrupt/`."""
    checkpoints = Path(checkpoints)
    return checkpoints.with_name(checkpoints.name + ".corrupt")


def set_aside(checkpoints: Path) -> list[str]:
    """The steps of `checkpoints` moved aside as corrupt (`STEP-TIME` names), oldest first."""
    aside = aside_dir(checkpoints)
    return sorted(p.name for p in aside.iterdir()) if aside.is_dir() else []


def quarantine(step_dir: Path) -> Path:
    """Moves a corrupt step to `<checkpoints>.corrupt/<step>-<unix time>`; returns where."""
    step_dir = Path(step_dir)
    aside = aside_dir(step_dir.parent)
    aside.mkdir(exist_ok=True)
    dest = aside / f"{step_dir.name}-{int(time.time())}"
    n = 1
    while dest.exists():  # the same step moved aside twice in one second: keep both
        dest, n = aside / f"{step_dir.name}-{int(time.time())}-{n}", n + 1
    os.replace(step_dir, dest)
    return dest


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def state_finite(tree: object) -> bool:
    """Whether every floating-point array of `tree` (parameters, optimizer moments) is
    finite; one device reduction and one scalar read."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return bool(_all_finite(leaves)) if leaves else True
