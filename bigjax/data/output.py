"""Where `bigjax prepare` writes: never over anything it did not write, never half a dataset.

A dataset directory carries a marker file, `.bigjax-dataset`, listing every top-level entry
bigjax wrote. `--output` must be new, empty, or such a directory holding nothing else; anything
else is refused before any work, naming the path (a file called manifest.json proves nothing:
anyone can write one). The dataset is built in a staging directory beside the target and
swapped into place in one step when complete (bigjax/dirswap.py), so a killed prepare leaves
the previous dataset as it was. One prepare
writes a target at a time: it holds a lock file beside it (`.NAME.lock`) from before its first
check until the dataset is in place, and a second prepare into the same --output is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from bigjax import errors, runlock
from bigjax.data.sources import DataError
from bigjax.dirswap import staging_dir, swap_in

MARKER = ".bigjax-dataset"
MARKER_FORMAT = 1


class OutputError(DataError):
    """An --output that bigjax will not write to; the message names the path and the fix."""


def _marker(directory: Path) -> dict | None:
    try:
        record = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("bigjax_dataset") != MARKER_FORMAT:
        return None
    return record


def check_target(output: str, inputs: Sequence[Path], folders: Sequence[str] = ()) -> Path:
    """The absolute target directory, if writing there can destroy nothing of the user's (nor
    lie inside a folder given whole as input, whose next prepare would read the dataset's
    report.md as a document)."""
    final = Path(os.path.abspath(output))
    if shown := errors.not_utf8(final):
        raise OutputError(
            f"--output {shown}: a name that is not UTF-8; ArrayRecord, which writes the "
            "shards, takes UTF-8 paths only. Rename it, or choose another --output."
        )
    if final.is_symlink():
        raise OutputError(f"--output {output}: is a symbolic link; give the directory itself.")
    if final.exists() and not final.is_dir():
        raise OutputError(f"--output {output}: exists and is not a directory.")
    here = Path.cwd().resolve()
    real = final.resolve()
    if real == here or real in here.parents or real == Path(real.anchor):
        raise OutputError(
            f"--output {output}: is the current directory or one above it; a dataset is "
            "written into a directory of its own (e.g. --output data/mine)."
        )
    for folder in folders:
        if Path(folder).resolve() in (real, *real.parents):
            raise OutputError(
                f"--output {output}: lies inside the input folder {folder}, whose next prepare "
                "would read this dataset's files (report.md) as documents; choose an output "
                "outside it."
            )
    for path in inputs:
        if real in Path(os.path.abspath(path)).resolve().parents:
            raise OutputError(f"--output {output}: holds the input {path}; choose another.")
    if not final.exists() or not any(final.iterdir()):
        return final
    record = _marker(final)
    if record is None:
        raise OutputError(
            f"--output {output}: exists, is not empty and was not written by bigjax prepare "
            f"(no {MARKER} marker); bigjax will not delete it. Choose a new or empty directory."
        )
    ours = set(record.get("entries", [])) | {MARKER}
    foreign = sorted(p.name for p in final.iterdir() if p.name not in ours)
    if foreign:
        raise OutputError(
            f"--output {output}: is a bigjax dataset but also holds {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}, which bigjax did not write; move "
            "them out or choose another directory."
        )
    return final


def lock(final: Path) -> runlock.RunLock:
    """The lock of target `final` (`.NAME.lock` beside it: the target itself is swapped), or
    OutputError naming the prepare that holds it."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return runlock.take(final.parent / f".{final.name}.lock")
    except runlock.Held as held:
        raise OutputError(
            f"--output {final}: another bigjax prepare is writing it ({held}); wait for it to "
            "finish, or choose another --output."
        ) from None
    except OSError as e:  # a file on the way, no permission, a read-only file system
        files = [p for p in final.parents if p.exists() and not p.is_dir()]
        why = f"{files[0]} is a file" if files else f"{e.strerror}: {e.filename}"
        raise OutputError(f"--output {final}: cannot create it ({why}).") from None


def staging(final: Path) -> Path:
    """A fresh staging directory beside `final` (same filesystem, so the swap is a rename),
    marked as partial (stagings left by killed prepares of this host are removed there)."""
    host = socket.gethostname()
    path = staging_dir(final)
    partial = {"bigjax_dataset": MARKER_FORMAT, "partial": True, "pid": os.getpid(), "host": host}
    (path / MARKER).write_text(json.dumps(partial) + "\n", encoding="utf-8")
    return path


def seal(staged: Path) -> None:
    """Marks a complete staging directory with the entries bigjax wrote (deterministic: no
    pid, host or time, so two identical runs give identical bytes)."""
    entries = sorted(p.name for p in staged.iterdir() if p.name != MARKER)
    record = {"bigjax_dataset": MARKER_FORMAT, "entries": entries}
    (staged / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def publish(staged: Path, final: Path, inputs: Sequence[Path]) -> None:
    """Moves the complete dataset into place, replacing a previous one of ours."""
    seal(staged)
    if final.exists():
        check_target(str(final), inputs)  # again: the user may have added files meanwhile
    swap_in(staged, final)


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)
