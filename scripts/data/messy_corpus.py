"""Builds a deliberately messy corpus to try `bigjax prepare` on (docs/data.md shows its report).

    python scripts/data/messy_corpus.py /tmp/messy
    bigjax prepare --input '/tmp/messy/**/*' --output /tmp/messy-ds --workers 2

What is in it: stdlib modules as .txt, JSONL (plain and gzip) and Parquet records in seven
languages (the test fixtures), exact and near duplicates, personal data of several kinds,
malformed and incomplete records, an empty file, boilerplate, gibberish and symbol soup, a
truncated archive, and an odd tree: a directory symlink loop, a second name for one file, a
dangling symlink, a symlink loop and a FIFO.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "languages"


def main(root: Path) -> None:
    rng = random.Random(0)
    (root / "code").mkdir(parents=True)
    (root / "web").mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap", "shlex", "fnmatch", "colorsys", "bisect", "this"):
        (root / "code" / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text())
    docs = [
        d.strip() for f in sorted(FIXTURES.glob("*.txt")) for d in f.read_text().split("\n===\n")
    ]
    personal = [
        "Write to wang.fang@example.cn or call +86 138 1234 5678.",
        "Server 10.0.0.1. Backup at [2001:db8::7]:8443.",
        "Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00.",
        "身份证号11010519491231002X，手机13812345678。",
        "Llámame al +34 612 34 56 78 o escribe a ana@example.es.",
    ]
    # personal data inside documents that appear nowhere else (so no duplicate hides it)
    records = docs[: -len(personal)]
    records += [f"{p} {d}" for p, d in zip(personal, docs[-len(personal) :], strict=True)]
    records += [docs[0], docs[3].upper()]  # exact duplicates (case folded)
    records += [next(d for d in docs if "江南" in d).replace("江南", "江北")]  # a near duplicate
    junk = [
        "\n".join(["Subscribe to our newsletter!"] * 15),
        " ".join("".join(rng.choice("qwrtzpsdfghjklxcvbnm") for _ in range(7)) for _ in range(80)),
        " ".join(rng.choice("#$%&*+=<>|~^{}[]") * 4 for _ in range(80)),
        "CafÃ© owners say the naÃ¯ve rÃ©sumÃ© format is still the most common one they receive.",
    ]
    with open(root / "web" / "a.jsonl", "w") as f:
        for r in records[: len(records) // 2] + junk:
            f.write(json.dumps({"text": r}, ensure_ascii=False) + "\n")
        f.write('{"text": "broken json\n')
        f.write(json.dumps({"body": "no text field"}) + "\n")
    with gzip.open(root / "web" / "b.jsonl.gz", "wt") as f:
        for r in records[len(records) // 2 :]:
            f.write(json.dumps({"text": r}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": [docs[5], None, docs[7]]}), root / "web" / "c.parquet")
    (root / "web" / "empty.jsonl").write_text("")
    with gzip.open(root / "web" / "cut.jsonl.gz", "wt") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Record {i}: " + docs[i % len(docs)]}) + "\n")
    data = (root / "web" / "cut.jsonl.gz").read_bytes()
    (root / "web" / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (root / "code" / "again").symlink_to("..")  # a directory loop
    (root / "code" / "alias.txt").symlink_to("textwrap.txt")
    (root / "web" / "dangling.jsonl").symlink_to("gone.jsonl")
    (root / "web" / "loop.jsonl").symlink_to("loop.jsonl")
    os.mkfifo(root / "web" / "pipe.jsonl")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
