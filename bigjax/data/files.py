"""Input file trees as they really are: symlinks, loops, FIFOs, files that vanish or cannot be read.

`expand` turns --input patterns into a list of real files, each once (identified by device and
inode, whatever the names and symlinks that lead to it), walking `**` without ever entering a
directory twice (so a symlink loop costs one visit, not 40 levels of copies). What a pattern
matches but cannot be read is returned with a reason instead of being dropped silently;
`open_regular` opens without blocking (a FIFO would hang a plain open forever) and refuses
anything that is not a regular file at the moment it is opened.

Glob semantics follow `glob.glob(..., recursive=True)`: `*`, `?` and `[...]` within one path
component, `**` for any depth; names starting with '.' match only patterns that do. Two
additions: a component also matches a name equal to it, so an existing folder named `data[1]`
is found by its own name (glob's `[1]` matches only `data1`); and a pattern that is a folder's
name stands for every file under it, as `FOLDER/**` would (`.git` and other hidden names
left out).

Paths are shown (in logs, the manifest, the report) by `errors.shown_path`: a name that is not
UTF-8 (a Latin-1 name on a Linux disk) keeps its bytes as `\\xNN`, so any reader takes it.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import glob
import io
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bigjax.errors import shown_path

SKIP_REASONS = (
    "vanished",  # listed, then gone before it was read
    "dangling_symlink",
    "symlink_loop",
    "unreadable",  # permission denied, or an I/O error while reading
    "not_regular_file",  # FIFO, socket, device
    "corrupt",  # a damaged .gz, .zst or .parquet (documents read before the damage are kept)
    "unsupported_type",  # under a folder given whole: a LICENSE beside the .jsonl files
)


class Skip(Exception):
    """A file that is skipped, with one of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Expanded:
    files: list[Path]  # real files, each once, in pattern order then sorted
    skipped: list[tuple[Path, str]]  # matched but unusable, with the reason


def _reason(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink_loop"
    if isinstance(error, FileNotFoundError):
        return "dangling_symlink" if os.path.islink(path) else "vanished"
    if isinstance(error, PermissionError):
        return "unreadable"
    return "unreadable"


def classify(path: Path) -> tuple[int, int] | str:
    """(device, inode) of a regular file, or why it cannot be used."""
    try:
        st = os.stat(path)
    except OSError as e:
        return _reason(path, e)
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if not stat.S_ISREG(st.st_mode):
        return "not_regular_file"
    return st.st_dev, st.st_ino


def _hidden(name: str, segment: str) -> bool:
    return name.startswith(".") and not segment.startswith(".")


def _walk(directory: Path, segments: Sequence[str], seen_dirs: set) -> Iterator[Path]:
    """Paths under `directory` matching `segments`; `seen_dirs` holds the (dev, ino) of every
    directory `**` has entered, so none is entered twice."""
    if not segments:
        yield directory
        return
    segment, rest = segments[0], segments[1:]
    if segment == "**":
        yield from _walk(directory, rest, seen_dirs)  # zero directories
        for entry in _entries(directory):
            if _hidden(entry.name, segment):
                continue
            path = directory / entry.name
            if not rest:
                yield path  # a trailing '**' matches files too
            if _is_dir(entry):
                key = _dir_key(path)
                if key is not None and key not in seen_dirs:
                    seen_dirs.add(key)
                    yield from _walk(path, segments, seen_dirs)
        return
    if glob.has_magic(segment):
        names = [
            e.name
            for e in _entries(directory)
            # `run[1]` names itself too where it exists: a class, `[1]`, matches only `1`
            if (fnmatch.fnmatchcase(e.name, segment) or e.name == segment)
            and not _hidden(e.name, segment)
        ]
    else:
        names = [segment] if os.path.lexists(directory / segment) else []
    for name in names:
        path = directory / name
        if not rest:
            yield path
        elif os.path.isdir(path):
            yield from _walk(path, rest, seen_dirs)


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []  # vanished or unreadable directory: nothing to match in it


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks: a linked directory is walked, once
    except OSError:
        return False


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def matches(pattern: str) -> list[Path]:
    """Every path (of any kind, broken symlinks included) that `pattern` names."""
    if not glob.has_magic(pattern):
        return [Path(pattern)] if os.path.lexists(pattern) else []
    parts = Path(pattern).parts
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = Path(*parts[:first]) if first else Path(".")
    return list(_walk(root, parts[first:], {_dir_key(root)}))


def under(folder: str | Path) -> list[Path]:
    """Every path under `folder`, at any depth, as `FOLDER/**` matches them."""
    return list(_walk(Path(folder), ["**"], {_dir_key(Path(folder))}))


def expand(
    patterns: Sequence[str],
    explicit: dict[str, list[Path]] | None = None,
    usable: Callable[[Path], bool] = lambda path: True,
) -> Expanded:
    """The usable files and the skipped paths of `patterns`. `explicit` maps a pattern to its
    own list of paths instead (the built-in corpus). A pattern naming a folder stands for the
    files under it; those `usable` refuses are skipped as `unsupported_type` (a file named or
    matched by a pattern is the caller's to refuse: the user asked for it)."""
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[tuple[int, int]] = set()
    for pattern in patterns:
        paths = (explicit or {}).get(pattern)
        whole_folder = paths is None and os.path.isdir(pattern)
        if paths is None:
            paths = sorted(under(pattern) if whole_folder else matches(pattern))
        for path in paths:
            what = classify(path)
            if what == "directory":
                continue  # the tree's structure, not an input
            if isinstance(what, str):
                skipped.append((path, what))
            elif what not in seen:
                seen.add(what)
                if whole_folder and not usable(path):
                    skipped.append((path, "unsupported_type"))
                else:
                    files.append(path)
    return Expanded(files, skipped)


def open_regular(path: Path) -> io.BufferedReader:
    """Opens `path` for reading if, at this moment, it is a readable regular file; raises Skip.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the type
    is checked on the open descriptor, so a file swapped for a FIFO after listing is caught."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise Skip(_reason(path, e)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Skip("not_regular_file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def log_skip(path: Path, reason: str) -> None:
    print(f"prepare: skipped {shown_path(path)}: {reason.replace('_', ' ')}", file=sys.stderr)
