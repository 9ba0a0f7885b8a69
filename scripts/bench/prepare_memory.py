"""Peak memory of `bigjax prepare` on hostile inputs: one huge line, a small gzip that inflates
to one 2 GiB line, a huge one-line text file, next to an ordinary corpus.

    python scripts/bench/prepare_memory.py [--out results.json]

Each case runs `bigjax prepare` as a subprocess (one worker process) and samples, every 20 ms,
the resident memory of the whole process tree (the prepare process and its worker pool) from
/proc; the table shows that sum's peak, and the largest single process's. Inputs are written
to a temporary directory and removed afterwards.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

WORDS = b"the harbour was quiet in the early morning and the fishermen mended their nets "
# The ordinary documents: real text, the standard library's json and email packages.
STDLIB = Path(sysconfig.get_paths()["stdlib"])
NORMAL = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))


def _line_of(size: int) -> bytes:
    body = WORDS * (size // len(WORDS) + 1)
    return b'{"text": "' + body[:size] + b'"}\n'


def _write_normal(directory: Path) -> None:
    for f in NORMAL:
        shutil.copy(f, directory / f"{f.parent.name}_{f.name}")


def make_inputs(root: Path) -> dict[str, Path]:
    """One directory of input files per case."""
    cases = {}
    normal = root / "normal"
    normal.mkdir()
    _write_normal(normal)
    cases[f"ordinary corpus ({len(NORMAL)} files)"] = normal

    huge = root / "huge_line"
    huge.mkdir()
    _write_normal(huge)
    (huge / "huge.jsonl").write_bytes(_line_of(200 << 20))
    cases["one 200 MB JSONL line"] = huge

    text = root / "huge_text"
    text.mkdir()
    _write_normal(text)
    (text / "huge.txt").write_bytes((WORDS * ((200 << 20) // len(WORDS)))[: 200 << 20])
    cases["one 200 MB one-line .txt"] = text

    bomb = root / "gzip_bomb"
    bomb.mkdir()
    _write_normal(bomb)
    with gzip.open(bomb / "bomb.jsonl.gz", "wb", compresslevel=9) as f:
        f.write(b'{"text": "')
        chunk = b"a" * (16 << 20)
        for _ in range((2 << 30) // len(chunk)):  # 2 GiB of one line
            f.write(chunk)
        f.write(b'"}\n')
    cases["2 GiB line from a .jsonl.gz"] = bomb
    return cases


def peak_rss(command: list[str]) -> tuple[int, int, float, str]:
    """(peak of the tree's summed RSS, peak of one process's RSS, seconds, stderr tail)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    tree_peak = one_peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue
        except psutil.NoSuchProcess:
            break
        tree_peak, one_peak = max(tree_peak, sum(rss)), max(one_peak, max(rss, default=0))
        time.sleep(0.02)
    _, err = proc.communicate()
    return tree_peak, one_peak, time.perf_counter() - start, err.decode()[-400:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, inputs in make_inputs(Path(tmp)).items():
            out = Path(tmp) / "out" / inputs.name
            command = [sys.executable, "-m", "bigjax.cli", "prepare", "--input",
                       str(inputs / "*"), "--output", str(out), "--workers", "1"]  # fmt: skip
            tree, one, seconds, err = peak_rss(command)
            manifest = json.loads((out / "manifest.json").read_text())
            results.append({
                "case": name,
                "input_bytes": sum(p.stat().st_size for p in inputs.iterdir()),
                "peak_rss_tree_mib": tree / 2**20,
                "peak_rss_one_process_mib": one / 2**20,
                "seconds": seconds,
                "documents_in": manifest["documents_in"],
                "skipped": manifest["skipped"],
            })  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    print("\n| input | file size | peak RSS, all processes | largest process | skipped |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['input_bytes'] / 2**20:,.1f} MiB | "
            f"{r['peak_rss_tree_mib']:,.0f} MiB | {r['peak_rss_one_process_mib']:,.0f} MiB | "
            f"{r['skipped'] or '-'} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
