"""The test suite's CPU time, by test file and by test: where the suite's CPU-minutes go.

    python scripts/bench/suite_cpu.py [--top N] [--out DIR] [PYTEST ARGS ...]

PYTEST ARGS default to the README's `-q -n logical tests`. This file is also the pytest plugin
that measures: run as a script, it starts pytest with itself loaded (`-p suite_cpu`, in every
xdist worker too), and each worker writes one JSON line per test: the user + sys seconds of
the worker itself and of the processes it started and waited for (the trainers, servers and
sweep workers a test runs; `RUSAGE_CHILDREN` counts a process once it is waited for, with the
processes it waited for in turn). It then prints the whole run's CPU (pytest and everything
under it, as `/usr/bin/time` gives it), the sum over tests, the files by CPU and the heaviest
tests, as markdown. A test's CPU is its own, whichever worker ran it: the other worker's load
slows it (shared cores and caches) but is not counted in it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

OUT_ENV = "BIGJAX_SUITE_CPU_DIR"  # where the workers write; set by main() for the plugin


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its waited-for descendants): user + sys seconds so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Records one test's CPU (setup, call and teardown: its fixtures' processes too)."""
    out = os.environ.get(OUT_ENV)
    own, children = _cpu_seconds()
    start = time.monotonic()
    yield
    if out is None:
        return
    own_after, children_after = _cpu_seconds()
    row = {
        "test": item.nodeid,
        "own_s": own_after - own,
        "children_s": children_after - children,
        "wall_s": time.monotonic() - start,
    }
    with open(Path(out) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def report(rows: list[dict], total_s: float, wall_s: float, top: int) -> str:
    """The markdown: totals, files by CPU, the `top` heaviest tests."""
    by_file: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for r in rows:
        by_file[r["test"].split("::")[0]] += r["own_s"] + r["children_s"]
        counts[r["test"].split("::")[0]] += 1
    tests_s = sum(by_file.values())
    lines = [
        f"{len(rows)} tests, {wall_s / 60:.1f} min wall; CPU (user + sys) of the whole run "
        f"{total_s / 60:.1f} min, of which inside tests {tests_s / 60:.1f} min",
        "",
        "| file | tests | CPU-s | share |",
        "|---|---|---|---|",
    ]
    for name, cpu in by_file.most_common():
        lines.append(f"| {name} | {counts[name]} | {cpu:.0f} | {cpu / tests_s:.1%} |")
    header = "| test | CPU-s | of it, started processes | wall-s |"
    lines += ["", f"The {top} heaviest tests:", "", header, "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r["own_s"] + r["children_s"]))[:top]:
        cpu = r["own_s"] + r["children_s"]
        lines.append(f"| {r['test']} | {cpu:.1f} | {r['children_s']:.1f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=25, help="heaviest tests to list")
    parser.add_argument("--out", help="keep the per-test JSON lines here (default: temporary)")
    args, pytest_args = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="suite-cpu-"))
    out.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "pytest", "-p", "suite_cpu",
           *(pytest_args or ["-q", "-n", "logical", "tests"])]  # fmt: skip
    start = time.monotonic()
    code = subprocess.run(cmd, env=env).returncode
    wall_s = time.monotonic() - start
    _, total_s = _cpu_seconds()  # pytest and everything it waited for
    rows = [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.open()]
    if not rows:
        sys.exit(f"suite_cpu: pytest recorded no test in {out} (exit {code})")
    print(report(rows, total_s, wall_s, args.top))
    sys.exit(code)


if __name__ == "__main__":
    main()
