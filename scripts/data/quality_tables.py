"""The measurements behind docs/data.md's tables: personal-data recall and false positives, and
near-duplicate recall by how much of a document changed.

    python scripts/data/quality_tables.py pii        # recall on the planted set, hits per MB
    python scripts/data/quality_tables.py near-dup   # recall at 1/3/10 % words changed

`pii`: recall per format on tests/fixtures/pii_planted.jsonl (made by make_pii_fixture.py);
then every replacement `prepare` would make in this interpreter's standard library (code, its
docs and test data: version strings, hex constants, dates, example addresses), per type and per
MB. `near-dup`: 300 stdlib modules of 300+ words; each gets a copy with 1, 3 or 10 % of its
words replaced by random words of the corpus, and is indexed with prepare's own MinHash + LSH;
recall is the share of copies found, per threshold. The last column is how many of the 300
distinct originals the same index removes as near duplicates of one another.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

from bigjax.data import clean, pii
from bigjax.data.corpus import stdlib_files
from bigjax.data.prepare import NearDuplicates, minhash_signature, shingles

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pii_planted.jsonl"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
CHANGES = (0.01, 0.03, 0.10)


def pii_tables() -> None:
    items = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    found, total = collections.Counter(), collections.Counter()
    for item in items:
        start = item["text"].index(item["value"])
        end = start + len(item["value"])
        spans = pii.find(item["text"], item["language"])
        total[item["format"]] += 1
        found[item["format"]] += any(
            s <= start and e >= end and k == item["kind"] for s, e, k in spans
        )
    print("| format | planted | found |\n|---|---|---|")
    for fmt in sorted(total):
        print(f"| {fmt} | {total[fmt]} | {found[fmt]} |")
    print(f"\nrecall {sum(found.values())}/{len(items)} over {len(total)} formats\n")

    hits, nbytes, start_time = collections.Counter(), 0, time.perf_counter()
    for path in stdlib_files():
        text = clean.normalize(path.read_bytes().decode("utf-8", "replace"))
        nbytes += len(text.encode())
        for _, _, kind in pii.find(text, "en"):
            hits[kind] += 1
    seconds = time.perf_counter() - start_time
    mb = nbytes / 1e6
    print(f"stdlib: {mb:.1f} MB, {seconds:.0f} s ({mb / seconds:.2f} MB/s on one core)")
    print("| type | replacements | per MB |\n|---|---|---|")
    for kind in pii.PII_TYPES:
        print(f"| {kind} | {hits[kind]} | {hits[kind] / mb:.2f} |")


def _mutated(words: list[str], fraction: float, vocabulary: list[str], rng) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), max(1, round(fraction * len(out)))):
        out[i] = rng.choice(vocabulary)
    return out


def near_dup_tables() -> None:
    rng = random.Random(0)
    docs = []
    for path in stdlib_files():
        words = clean.dedup_key(path.read_bytes().decode("utf-8", "replace")).split()
        if 300 <= len(words) <= 20_000:
            docs.append(words)
    docs = rng.sample(docs, 300)
    vocabulary = [w for d in docs for w in d]
    copies = {c: [_mutated(d, c, vocabulary, rng) for d in docs] for c in CHANGES}
    print("| changed | mean Jaccard of 5-word shingles |\n|---|---|")
    for c in CHANGES:
        js = [
            len(shingles(" ".join(a)) & shingles(" ".join(b)))
            / len(shingles(" ".join(a)) | shingles(" ".join(b)))
            for a, b in zip(docs, copies[c], strict=True)
        ]
        print(f"| {c:.0%} | {sum(js) / len(js):.3f} |")
    signatures = [minhash_signature(" ".join(d), 128) for d in docs]
    copy_sigs = {c: [minhash_signature(" ".join(d), 128) for d in copies[c]] for c in CHANGES}
    header = " | ".join(f"{c:.0%} changed" for c in CHANGES)
    print(f"\n| threshold | {header} | originals merged |\n|---|---|---|---|---|")
    for t in THRESHOLDS:
        row = []
        for c in CHANGES:
            found = 0
            for original, copy in zip(signatures, copy_sigs[c], strict=True):
                index = NearDuplicates(t, 128)  # the original alone: is its copy found?
                index.add(original)
                found += index.match(copy)
            row.append(found / len(docs))
        index = NearDuplicates(t, 128)
        merged = sum(index.seen(s) for s in signatures)
        cells = " | ".join(f"{r:.1%}" for r in row)
        print(f"| {t} | {cells} | {merged} of {len(docs)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", choices=("pii", "near-dup"))
    args = parser.parse_args()
    pii_tables() if args.table == "pii" else near_dup_tables()


if __name__ == "__main__":
    main()
