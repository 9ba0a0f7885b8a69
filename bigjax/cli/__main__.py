"""`python -m bigjax.cli`: the `bigjax` command."""

import sys

from bigjax.cli.main import main

sys.exit(main())
