"""The errors bigjax reports as one line (`bigjax: error: ...`, `--debug` for the traceback)
instead of a traceback. An error class joins by subclassing one of the two kinds below, so the
command line catches them by class, with no list of names that a rename could silently leave
behind. This module imports nothing of bigjax's: every layer may raise these."""

import contextlib
import errno
import os
from collections.abc import Iterator

USAGE_ERROR = 2  # bad config or input: fix the command
RUN_FAILED = 1  # the run itself failed (non-finite loss, checkpoint I/O)


class UsageError(Exception):
    """Fixed by changing the command: a config key or value, an input file, a device name."""

    exit_code = USAGE_ERROR


class RunFailed(Exception):
    """The run failed on its own: a non-finite loss, a checkpoint that cannot be written."""

    exit_code = RUN_FAILED


class BigjaxWarning(UserWarning):
    """What bigjax warns about (a checkpoint skipped as corrupt, a damaged history line, a
    mesh that splits a torus axis): the command line prints these as one line,
    `bigjax: warning: ...`, and other libraries' warnings in Python's own form."""


# A path the system refuses, whichever command met it: fixed by another path (or its
# permissions), so one line that names it, not a traceback. What to do, by errno:
PATH_REFUSED = {
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows; shorten it",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "its file system is read-only; choose a writable path",
    errno.ENOTDIR: "a part of it is a file, not a directory",
    errno.EISDIR: "it is a directory where a file was wanted",
    errno.ELOOP: "its symbolic links form a loop",
}


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` as text any UTF-8 reader takes: the bytes of a name that are not UTF-8 (a Latin-1
    name on a Linux disk) as `\\xNN`. Python holds them as lone surrogates, which a JSON reader
    may refuse and a UTF-8 writer does."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def not_utf8(path: str | os.PathLike[str]) -> str | None:
    """The absolute `path` shown (`shown_path`) if its bytes are not all UTF-8, else None.
    TensorStore (checkpoints) and ArrayRecord (dataset shards) take UTF-8 paths only: another
    fails deep in their C++ bindings with a cast error, after the work is done."""
    full = os.path.abspath(path)
    return None if shown_path(full) == full else shown_path(full)


# as tensorstore and SQLite (a sweep's study) word them
FULL_DISK = ("No space left on device", "Disk quota exceeded", "database or disk is full")
_WRITING = "writing "  # the note a command leaves on an error: where it was writing


def exit_code(e: BaseException) -> int | None:
    """The exit code of an error reported as one line, or None (a bug: its traceback)."""
    if isinstance(e, UsageError | RunFailed):
        return e.exit_code
    if isinstance(e, FileNotFoundError) or _path_refused(e):  # a path the user gave
        return USAGE_ERROR
    if disk_full(e):  # a write of any command, from Python, Orbax or tensorstore
        return RUN_FAILED
    return None


def _path_refused(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in PATH_REFUSED and bool(e.filename)


def one_line(e: BaseException) -> str:
    """The line `bigjax: error: ` is followed by, for an error `exit_code` accepts."""
    if isinstance(e, OSError) and e.errno is not None and _path_refused(e):
        return f"{e.filename}: {e.strerror}; {PATH_REFUSED[e.errno]}."
    if isinstance(e, UsageError | RunFailed | FileNotFoundError) or not disk_full(e):
        return str(e)
    # where: the output a command noted on the error in flight (`writing`), or the file
    notes = [n for n in getattr(e, "__notes__", []) if n.startswith(_WRITING)]
    where = f" {_WRITING}{e.filename}" if isinstance(e, OSError) and e.filename else ""
    where = f" {notes[0]}" if notes else where
    first = (str(e).strip().splitlines() or [""])[0]
    return (
        f"no space left on the device{where}; free space there, or write elsewhere, and rerun "
        f"({type(e).__name__}: {first})."
    )


def note_writing(e: BaseException, output: object) -> None:
    """Notes on `e`, in flight, the output a command was writing, so that a full disk's one
    line names it (Python's ENOSPC from a write names no file)."""
    e.add_note(f"{_WRITING}{output}")


@contextlib.contextmanager
def writing(output: object) -> Iterator[None]:
    """`note_writing` on any error raised inside."""
    try:
        yield
    except BaseException as e:
        note_writing(e, output)
        raise


def disk_full(e: BaseException | None, texts: tuple[str, ...] = FULL_DISK) -> bool:
    """Whether `e`, or an error it was raised from, is a full disk or quota: an OSError's
    errno, or the words of libraries that raise their own types (Orbax, tensorstore)."""
    seen: set[int] = set()  # `raise e from e` makes the chain a loop
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in texts):
            return True
        e = e.__cause__ or e.__context__
    return False
