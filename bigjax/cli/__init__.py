"""The `bigjax` command line: it parses, dispatches to the library, and prints.

`main` builds the parser (bigjax/cli/main.py) from one module per group of subcommands:
`data` (prepare), `runs` (train, plan, bench, sweep, report), `models` (eval, generate,
convert, compress, inspect); `common` holds what they share.
"""

from __future__ import annotations

from bigjax.cli.common import RUN_FAILED, USAGE_ERROR  # noqa: F401
from bigjax.cli.main import build_parser, main  # noqa: F401
from bigjax.config.load import load_config  # noqa: F401
from bigjax.trained import open_run  # noqa: F401
