"""What every subcommand shares: exit codes, strict JSON output, the --debug and --verbose
flags, starting JAX quietly."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bigjax.config import ConfigError
from bigjax.errors import RUN_FAILED as RUN_FAILED
from bigjax.errors import USAGE_ERROR as USAGE_ERROR
from bigjax.errors import UsageError

INTERRUPTED = 130  # a second Ctrl-C (128 + SIGINT, as a shell reports it)


class Console:
    """sys.stdout or sys.stderr, outliving its reader: once a write or flush fails (the
    terminal hung up, the pipe's reader exited, the stream was closed or never open), what
    follows is dropped instead of failing the command. A training run says everything that
    matters in its files too (metrics.jsonl, summary.json, error.log)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._gone = stream is None

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # EIO, EPIPE, EBADF; ValueError: a closed file
                self._gone = True
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._gone = True

    def isatty(self) -> bool:
        return not self._gone and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, buffer, ...
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def standard_descriptors_open() -> None:
    """Opens /dev/null on any of descriptors 0-2 the command was started without (`2>&-`):
    else the next file opened gets that number, and native code writing its logs to "stderr"
    would write them into it (a checkpoint, a metrics file)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)


def utf8_text(value: str) -> str:
    """An argument that is text for a tokenizer. Python hands bytes of argv that are not
    UTF-8 (a terminal in Latin-1, say) over as lone surrogates, which no tokenizer encodes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = value.encode("utf-8", "surrogateescape")[len(value[: e.start].encode()) :][:1]
        raise argparse.ArgumentTypeError(
            f"not UTF-8 text (byte {byte!r} at character {e.start}): set the terminal's "
            "encoding to UTF-8"
        ) from None
    return value


def join_override_values(argv: Sequence[str]) -> list[str]:
    """Accepts both '--config.a=1' and '--config.a 1'."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--config.") and "=" not in item and i + 1 < len(argv):
            out.append(f"{item}={argv[i + 1]}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


def write_json(path: str | Path | None, obj: Any) -> None:
    """Strict JSON (non-finite numbers as null), as every file bigjax writes; nothing when
    `path` is None (a command's `--json` not given)."""
    if path is None:
        return
    from bigjax.metrics import json_text  # imports jax: only once a command has run
    from bigjax.trained import write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(path), json_text(obj, indent=2) + "\n")  # whole or not at all


def check_output(command: str, flag: str, text: str | None, kind: str) -> None:
    """Refuses, before any work, a path a command will write (`kind` "file" or "dir") that
    cannot be written: a file where a folder must be, a folder where the file goes, a
    dangling link on the way, no write permission, a read-only file system. Without it a
    long eval or compile ran first and then failed with a traceback at the write. None (a
    flag not given) passes."""
    if text is None:
        return
    refuse_empty(command, flag, text)
    where = f"{command}: {flag} {text}"
    try:
        problem = _output_problem(Path(text), kind)
    except OSError as e:  # a folder on the way that cannot be listed
        problem = f": cannot reach it ({e.strerror})."
    if problem:
        raise ConfigError(where + problem)


def refuse_empty(command: str, flag: str, text: str) -> None:
    """An empty path (an unset $RUN) is Path(''), the current directory: a run's or a
    command's files went there."""
    if not text.strip():
        raise ConfigError(f"{command}: {flag} is empty; give a path.")


def _output_problem(path: Path, kind: str) -> str | None:
    if kind == "file" and path.is_dir():
        return " is a directory; give a file's path."
    if kind == "dir" and path.exists() and not path.is_dir():
        return " is a file; pass a directory."
    # A run's checkpoints folder holds its checkpoints alone (a restore lists it): an output
    # there (PNGs, an export) is litter among them, through a link too.
    real = Path(os.path.realpath(path))  # unlike resolve(), no RuntimeError on a link loop
    for folder in (real, *real.parents):
        if folder.name == "checkpoints" and (folder.parent / "config.json").is_file():
            return (f" is inside the checkpoints folder of the run {folder.parent}; write it "
                    f"elsewhere (beside it, in {folder.parent}, say).")  # fmt: skip
    parent = path if kind == "dir" else path.parent
    while not parent.exists():  # the nearest that exists: what is missing below it is created
        if parent.is_symlink():
            return f": {parent} is a link to {os.readlink(parent)}, which does not exist."
        parent = parent.parent
    if not parent.is_dir():
        return f": {parent} is a file, not a directory."
    # os.access: a read-only file system says no even to root
    if not os.access(parent, os.W_OK | os.X_OK) or (
        path.is_file() and not os.access(path, os.W_OK)
    ):
        return ": cannot write there (no permission, or a read-only file system)."
    return None


def add_command(
    sub: argparse._SubParsersAction, run: Callable[..., int], config: bool = False
) -> argparse.ArgumentParser:
    """The parser of the subcommand `run` implements (`cmd_NAME` is `bigjax NAME`), with the
    shared --debug and --verbose flags, and --config when the command reads one. The help is
    `run`'s docstring: its first line in `bigjax --help`, the rest as the command's own."""
    summary, _, description = inspect.cleandoc(run.__doc__ or "").partition("\n\n")
    name = run.__name__.removeprefix("cmd_")
    p = sub.add_parser(name, help=summary, description=" ".join(description.split()))
    if config:
        p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    add_debug_flag(p)
    p.set_defaults(run=run)
    return p


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: `bigjax --debug CMD` and `bigjax CMD --debug` both work.
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="full tracebacks on errors"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show what JAX, libtpu, absl and Orbax log (hidden by default)",
    )


@contextlib.contextmanager
def native_logs_held(args: argparse.Namespace) -> Iterator[None]:
    """Holds back what native code writes to file descriptor 2 meanwhile (C++ logging, which
    bypasses sys.stderr and Python's logging): shown with --verbose, or if the block fails
    (then it may say why), unless the failure is a usage error: its one line says why, and
    libtpu's start-up probing has nothing to add to a config the user must fix."""
    show = getattr(args, "verbose", False)
    sys.stderr.flush()
    saved, python_stderr = os.dup(2), sys.stderr
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        # bigjax's own stderr lines (progress) still reach the terminal meanwhile
        sys.stderr = Console(os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace"))
        try:
            yield
        except UsageError:
            raise
        except BaseException:
            show = True
            raise
        finally:
            # Flushed, not closed: a logging handler made meanwhile may hold it, and it
            # writes to the real stderr (a dup of it) after this block as well.
            sys.stderr.flush()
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            if show:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
                sys.stderr.flush()


def start_jax(args: argparse.Namespace) -> None:
    """Initialises JAX's backends now, with what they print on the way held back: with libtpu
    installed, every start on a machine without TPUs logs six lines of 'Failed to find host
    bounds' / 'E0000 ... INVALID_ARGUMENT' from libtpu's probing."""
    import jax

    from bigjax import platforms

    platforms.choose()  # no libtpu on a machine without TPU chips
    with native_logs_held(args):
        try:
            jax.devices()
        except RuntimeError as e:  # another process drives the TPU: one line, naming it
            busy = platforms.busy_error(e)
            if busy is None:
                raise
            raise busy from None


def run_dir(args: argparse.Namespace, command: str) -> str:
    """The run directory, given as RUN or as --workdir RUN (train's spelling)."""
    if bool(args.run_dir) == bool(args.workdir):
        raise ConfigError(f"{command}: give the run directory once, as RUN or --workdir RUN.")
    return str(args.run_dir or args.workdir)


def needs(module: str, extra: str, command: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{command}: needs the {module} package; pip install 'bigjax[{extra}]'.")


def add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", metavar="RUN", help="the run directory")
    p.add_argument("--workdir", help="the run directory (same as RUN)")
