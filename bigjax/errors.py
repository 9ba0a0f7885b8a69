"""The errors bigjax reports as one line (`bigjax: error: ...`, `--debug` for the traceback)
instead of a traceback. An error class joins by subclassing one of the two kinds below, so the
command line catches them by class, with no list of names that a rename could silently leave
behind. This module imports nothing: every layer may raise these."""

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


def exit_code(e: BaseException) -> int | None:
    """The exit code of an error reported as one line, or None (a bug: its traceback)."""
    if isinstance(e, UsageError | RunFailed):
        return e.exit_code
    if isinstance(e, FileNotFoundError):  # a path the user gave
        return USAGE_ERROR
    return None
