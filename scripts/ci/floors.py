"""Print pip constraints that pin each of the project's core `>=` requirements to its floor.

`.ci/run` installs with them into a second environment and runs the fast tier there, so the
oldest versions pyproject.toml claims to support are the ones that were tested:

    python scripts/ci/floors.py > floors.txt && pip install -c floors.txt -e ".[test]"

The core dependencies are pinned; the extras (test tools, the server, lm-eval) resolve to
what fits them. A requirement that is not a plain `name>=version` is left to the resolver.
"""

import re
import sys
import tomllib
from pathlib import Path


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([0-9][0-9A-Za-z.]*)", requirement)
        if match:
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            pins[name] = f"{name}=={match[3]}"
    return sorted(pins.values())


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    print("\n".join(floors(root / "pyproject.toml")))
