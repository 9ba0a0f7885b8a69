"""The `bigjax` command: the parser, friendly errors, quiet libraries, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence

from bigjax import errors
from bigjax.cli.common import (
    INTERRUPTED,
    Console,
    join_override_values,
    standard_descriptors_open,
)
from bigjax.cli.data import add_prepare_parser
from bigjax.cli.models import (
    add_compress_parser,
    add_convert_parser,
    add_eval_parser,
    add_generate_parser,
    add_inspect_parser,
)
from bigjax.cli.runs import (
    add_bench_parser,
    add_plan_parser,
    add_report_parser,
    add_sweep_parser,
    add_train_parser,
)
from bigjax.cli.serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigjax", description="A JAX research framework for scalable pretraining."
    )
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    parser.add_argument(
        "--verbose", action="store_true", help="show what JAX, libtpu, absl and Orbax log"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_prepare_parser(sub)
    add_plan_parser(sub)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    add_report_parser(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_convert_parser(sub)
    add_compress_parser(sub)
    add_inspect_parser(sub)
    add_serve_parser(sub)
    return parser


def quiet_library_noise() -> None:
    """Keeps what libraries print about a failure bigjax reports itself out of the console
    (`--debug` shows it): Orbax and asyncio log a failed background write with its
    traceback at ERROR before bigjax's one line names it; and tensorstore's I/O threads,
    still finishing after a failed save, call into the closed event loop, whose 'Event loop
    is closed' errors Python prints with a traceback each."""
    for name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved"
        logging.getLogger(name).setLevel(logging.CRITICAL)
    previous = sys.excepthook

    previous_unraisable = sys.unraisablehook

    def closed_loop(value: BaseException | None) -> bool:
        # also writes abandoned at exit, finalised while the interpreter shuts down
        shutting_down = isinstance(value, ImportError) and "shutting down" in str(value)
        closed = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        return shutting_down or closed

    def hook(kind, value, tb) -> None:
        if not closed_loop(value):
            previous(kind, value, tb)

    def unraisable(info) -> None:
        if not closed_loop(info.exc_value):
            previous_unraisable(info)

    sys.excepthook = hook
    sys.unraisablehook = unraisable


@contextlib.contextmanager
def one_line_warnings(on: bool) -> Iterator[None]:
    """bigjax's own warnings (`BigjaxWarning`) as one line while a command runs, like its
    errors (`bigjax: warning: ...`): Python's default adds the file, line and source text of
    the `warnings.warn` call, which tells a user nothing. Other libraries' warnings keep
    Python's form, which names them; `--debug` and `--verbose` keep it for all."""
    if not on:
        yield
        return
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, errors.BigjaxWarning):
            return f"bigjax: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: Sequence[str] | None = None) -> int:
    standard_descriptors_open()
    for stream in (sys.stdout, sys.stderr):
        # A terminal in Latin-1 (say) cannot show every character a model generates or a
        # path holds: written as \uXXXX, not a UnicodeEncodeError that ended all output
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    if not isinstance(sys.stdout, Console):  # a closed terminal or pipe must not end the run
        sys.stdout, sys.stderr = Console(sys.stdout), Console(sys.stderr)
    argv = join_override_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args([a for a in argv if not a.startswith("--config.")])
    overrides = [a for a in argv if a.startswith("--config.")]
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if not (args.debug or args.verbose):
        quiet_library_noise()
    try:
        with one_line_warnings(not (args.debug or args.verbose)):
            return args.run(args, overrides)
    except KeyboardInterrupt:  # a second Ctrl-C: the first asked for a save, this one for now
        if args.debug:
            traceback.print_exc()
        print(
            "bigjax: interrupted: stopped at once, without a final save (the checkpoints on "
            "disk are intact; rerun to resume from the newest).",
            file=sys.stderr,
        )
        return INTERRUPTED
    except Exception as e:  # one line for what the user can fix; a traceback for the rest
        kind = errors.exit_code(e)
        if kind is None:
            raise
        if args.debug:  # the traceback too, and the same exit code
            traceback.print_exc()
        print(f"bigjax: error: {errors.one_line(e)}", file=sys.stderr)
        return kind
