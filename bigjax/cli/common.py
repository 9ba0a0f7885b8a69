"""What every subcommand shares: exit codes, strict JSON output, the --debug flag."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USAGE_ERROR = 2  # bad config or input: fix the command
RUN_FAILED = 1  # the run itself failed (non-finite loss, checkpoint I/O)


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


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite numbers as null), as every file bigjax writes."""
    from bigjax.metrics import json_text  # imports jax: only once a command has run

    path.write_text(json_text(obj, indent=2) + "\n")


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: `bigjax --debug CMD` and `bigjax CMD --debug` both work.
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="full tracebacks on errors"
    )
