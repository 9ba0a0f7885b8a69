"""`bigjax prepare`: raw files -> cleaned, deduplicated, scrubbed, tokenized ArrayRecord shards.

Two streaming passes over the data, both fanned out to worker processes in bounded windows
(memory does not grow with the corpus, except the dedup indexes: a 32-byte hash and a
MinHash signature, 1 KiB at 128 permutations, per kept document):

1. read -> normalise -> quality filters -> exact dedup -> near dedup (MinHash LSH) -> personal
   data scrubbing -> train/validation split; kept text goes to a temporary JSONL per split.
2. (train the BPE tokenizer on the cleaned train text, if asked) -> tokenize -> shards.

Same inputs and flags give byte-identical outputs: work is ordered, seeds are fixed, and the
manifest holds no timestamps or absolute paths of the output.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

import bigjax
from bigjax import errors, progress
from bigjax.data import clean, language, output, pii
from bigjax.data import tokenizer as tokenizers
from bigjax.data.dataset import SPLITS, ShardWriter, file_hashes
from bigjax.data.files import SKIP_REASONS
from bigjax.data.sources import DataError, FileLog, RawDoc, expand_inputs, read_documents

T = TypeVar("T")
MINHASH_SEED = 1  # fixed: signatures, and so near-dedup decisions, are reproducible
MINHASH_SCHEME = "affine32"  # pinned, so a datasketch upgrade cannot change the decisions
SHINGLE_WORDS = 5
# Documents handed to the worker pool at a time, and at most this many characters of text:
# together they bound memory (a window of long documents holds fewer of them).
WINDOW = 2048
WINDOW_CHARS = 64 << 20


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]
    output: str
    tokenizer: str = "byte"
    text_field: str = "text"
    normalize: bool = True
    invalid_utf8: str = "repair"  # or "drop"
    quality: clean.QualityConfig | None = clean.QualityConfig()  # None: no quality filters
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = clean.NEAR_THRESHOLD
    num_perm: int = 128
    pii: bool = True
    val_fraction: float = 0.01
    shard_tokens: int = 64 * 2**20
    strict: bool = False
    max_record_bytes: int = 32 << 20  # longer records are skipped (too_large) while read
    languages: tuple[str, ...] = ()  # keep only these language tags (ISO 639-1); () keeps all
    workers: int = 0  # 0: one per CPU core

    def __post_init__(self) -> None:
        # Refused before any work: --val-fraction 2 used to put every document in validation.
        bounds = {
            "val-fraction": (self.val_fraction, 0 <= self.val_fraction < 1, "from 0 up to 1"),
            "near-threshold": (self.near_threshold, 0 < self.near_threshold <= 1, "in (0, 1]"),
            "workers": (self.workers, self.workers >= 0, "0 (every core) or more"),
            # the LSH setup is quadratic in it (4,096: 1.5 s; 10**8 ran for ever, silently)
            "num-perm": (self.num_perm, 1 <= self.num_perm <= 4096, "from 1 to 4096"),
            "shard-tokens": (self.shard_tokens, self.shard_tokens >= 1, "1 or more"),
            # a read of more than an index-sized int was Python's OverflowError
            "max-record-bytes": (
                self.max_record_bytes,
                1 <= self.max_record_bytes <= 2**62,
                "from 1 to 2**62",
            ),
        }
        if self.quality is not None:
            bounds.update(_quality_bounds(self.quality))
        for flag, (value, ok, want) in bounds.items():
            if not ok:  # NaN fails every comparison: refused too
                raise DataError(f"prepare: --{flag} {value}: must be {want}.")


def _quality_bounds(q: clean.QualityConfig) -> dict[str, tuple[float, bool, str]]:
    """The quality thresholds' bounds, as flags: --min-alpha-frac nan turned its filter off
    without a word (every comparison with NaN is False); a fraction past 0..1 keeps every
    document or none."""
    fractions = ("min_alpha_frac", "max_dup_line_frac", "max_repeated_ngram_frac",
                 "min_function_word_frac")  # fmt: skip
    bounds = {f: (getattr(q, f), 0 <= getattr(q, f) <= 1, "from 0 to 1") for f in fractions}
    bounds["min_chars"] = (q.min_chars, q.min_chars >= 0, "0 or more")
    bounds["max_chars"] = (q.max_chars, q.max_chars >= max(q.min_chars, 1),
                           f"1 or more, and at least --min-chars ({q.min_chars})")  # fmt: skip
    bounds["min_mean_word_len"] = (q.min_mean_word_len, q.min_mean_word_len >= 0, "0 or more")
    bounds["max_mean_word_len"] = (
        q.max_mean_word_len,
        q.max_mean_word_len >= max(q.min_mean_word_len, 0),
        f"at least --min-mean-word-len ({q.min_mean_word_len})",
    )
    return {name.replace("_", "-"): bound for name, bound in bounds.items()}


@dataclasses.dataclass(frozen=True)
class Cleaned:
    """What a worker learned about one document."""

    text: str
    reason: str | None  # quality filter that dropped it
    language: str  # ISO 639-1 tag, 'und' when undetermined
    exact_key: bytes
    minhash: np.ndarray | None
    pii_counts: dict[str, int]
    unicode_repaired: bool


def clean_document(text: str, cfg: PrepareConfig) -> Cleaned:
    """All per-document work of pass 1 (runs in a worker process)."""
    repaired = False
    if cfg.normalize:
        text, repaired = clean.normalize_counted(text)
    reason = clean.quality_reason(text, cfg.quality) if cfg.quality else None
    if not text.strip():
        reason = "empty_after_cleaning"
    lang = language.identify(text)
    if reason is None and cfg.languages and lang not in cfg.languages:
        reason = "language"
    key_text = clean.dedup_key(text)
    exact_key = hashlib.sha256(key_text.encode()).digest()
    signature = None
    if cfg.near_dedup and reason is None:
        signature = minhash_signature(key_text, cfg.num_perm)
    counts: dict[str, int] = {}
    if cfg.pii and reason is None:
        text, counts = pii.scrub(text, lang)
    return Cleaned(text, reason, lang, exact_key, signature, counts, repaired)


def shingles(text: str) -> set[str]:
    """Overlapping runs of SHINGLE_WORDS units (words; characters in unsegmented scripts)."""
    return set(_shingles(text))


def _shingles(text: str) -> Iterator[str]:
    units = language.units(text)
    for i in range(max(len(units) - SHINGLE_WORDS + 1, 1)):  # one, for a short text
        yield " ".join(units[i : i + SHINGLE_WORDS])


def minhash_signature(key_text: str, num_perm: int, block: int = 1 << 13) -> np.ndarray:
    """The MinHash of the document's shingles, fed `block` at a time. datasketch hashes a
    batch as a (num_perm x batch) uint64 array: a 4.5 MB Chinese document, 1.5 M character
    shingles in one batch, took 1.5 GiB. Blocks give the same signature, since the minimum
    per permutation a MinHash keeps depends neither on the order nor on repeats."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    runs = _shingles(key_text)
    while batch := [s.encode() for s in itertools.islice(runs, block)]:
        m.update_batch(batch)
    return m.hashvalues


class NearDuplicates:
    """The kept documents' MinHash signatures in an LSH index.

    Banding is tuned against misses (16 bands of 8 rows at 0.8: a pair at Jaccard 0.86 is found
    99.7% of the time instead of 75%); candidates are then verified on their estimated Jaccard,
    so the extra candidates cost no false removals."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.signatures: list[np.ndarray] = []

    def _minhash(self, signature: np.ndarray):
        from datasketch import MinHash

        return MinHash(
            num_perm=self.num_perm, seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME
        )

    def match(self, signature: np.ndarray) -> bool:
        """True if an indexed document's estimated Jaccard with this one is >= threshold."""
        return any(
            np.mean(self.signatures[c] == signature) >= self.threshold
            for c in self.lsh.query(self._minhash(signature))
        )

    def add(self, signature: np.ndarray) -> None:
        self.lsh.insert(len(self.signatures), self._minhash(signature), check_duplication=False)
        self.signatures.append(signature)

    def seen(self, signature: np.ndarray) -> bool:
        """True if a kept document is a near duplicate; otherwise keeps this one."""
        if self.match(signature):
            return True
        self.add(signature)
        return False


def _windows(items: Iterable[T], chars: Callable[[T], int]) -> Iterator[list[T]]:
    block, total = [], 0
    for item in items:
        block.append(item)
        total += chars(item)
        if len(block) >= WINDOW or total >= WINDOW_CHARS:
            yield block
            block, total = [], 0
    if block:
        yield block


def _split_of(exact_key: bytes, val_fraction: float) -> str:
    # Decided by content, so a document lands in the same split whatever the input order.
    return "validation" if int.from_bytes(exact_key[:8], "big") / 2**64 < val_fraction else "train"


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Runs both passes and writes shards, tokenizer/, manifest.json and report.md."""
    expanded = expand_inputs(cfg.inputs)
    if unknown := sorted(set(cfg.languages) - set(language.known_tags())):
        raise DataError(
            f"--languages {' '.join(unknown)}: not a tag the language identifier gives; use "
            f"ISO 639-1 codes as in the report, e.g. zh en ja ar hi ru (all: "
            f"{' '.join(language.known_tags())})."
        )
    tokenizers.check_spec(cfg.tokenizer)  # a bad spec or file fails now, not after cleaning
    folders = [p for p in cfg.inputs if p != "stdlib" and os.path.isdir(p)]
    final = output.check_target(cfg.output, expanded.files, folders)
    held = output.lock(final)  # one prepare per target: a second one is refused, not raced
    try:
        output.check_target(cfg.output, expanded.files)  # again, now that no one else writes
        log = FileLog()
        for path, reason in expanded.skipped:
            log.skip(path, reason)
        # Built beside the target and swapped into place at the end: the output directory is
        # either the complete new dataset or the previous one, never half-written.
        staged = output.staging(final)
        try:
            manifest = _prepare_into(staged, expanded.files, log, cfg)
            output.publish(staged, final, expanded.files)
        except BaseException as e:
            output.discard(staged)
            errors.note_writing(e, final)
            raise
    finally:
        held.release()
    print(
        f"  manifest: {final / 'manifest.json'}\n  report:   {final / 'report.md'}", file=sys.stderr
    )
    return manifest


def _prepare_into(out: Path, files: list[Path], log: FileLog, cfg: PrepareConfig) -> dict[str, Any]:
    work = out / ".work"
    work.mkdir()
    workers = cfg.workers or os.cpu_count() or 1

    skipped: collections.Counter[str] = collections.Counter()
    filtered: collections.Counter[str] = collections.Counter()
    dedup: collections.Counter[str] = collections.Counter()
    pii_counts: collections.Counter[str] = collections.Counter()
    cleaning: collections.Counter[str] = collections.Counter()
    languages: collections.Counter[str] = collections.Counter()  # of kept documents
    kept_docs: collections.Counter[str] = collections.Counter()
    seen: set[bytes] = set()
    near = NearDuplicates(cfg.near_threshold, cfg.num_perm) if cfg.near_dedup else None

    def usable(docs: Iterator[RawDoc]) -> Iterator[RawDoc]:
        for doc in docs:
            if doc.skip is None:
                if doc.repaired_utf8:
                    cleaning["repaired_utf8"] += 1
                yield doc
                continue
            if cfg.strict:
                where = f"{doc.source}:{doc.line}" if doc.line else doc.source
                raise DataError(
                    f"{where}: {doc.skip.replace('_', ' ')} (--strict). Fix the "
                    "record, or drop --strict to skip and count such records."
                )
            skipped[doc.skip] += 1

    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX/threads are loaded
    documents_in = bytes_in = 0
    with ctx.Pool(workers) as pool:
        # ---- pass 1: clean, filter, dedup, scrub, split
        # Files as the unit: their count is known before reading (documents are not). Those
        # the listing skipped (a dangling link, a FIFO) are in the log already: counted done.
        total_files = len(files) + len(log.skipped)
        bar = progress.Bar("prepare: clean, dedup, scrub", total_files, "files")
        writers = {s: open(work / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        raw = usable(
            read_documents(
                files,
                text_field=cfg.text_field,
                invalid_utf8=cfg.invalid_utf8,
                log=log,
                max_record_bytes=cfg.max_record_bytes,
            )
        )
        for window in _windows(raw, lambda d: len(d.text or "")):
            texts = [d.text or "" for d in window]  # `usable` yields documents with text
            chunk = max(len(texts) // (4 * workers), 1)
            results = pool.starmap(clean_document, zip(texts, itertools.repeat(cfg)), chunk)
            for text, res in zip(texts, results, strict=True):
                documents_in += 1
                bytes_in += len(text.encode("utf-8", errors="replace"))
                if res.unicode_repaired:
                    cleaning["repaired_unicode"] += 1
                if res.reason is not None:
                    filtered[res.reason] += 1
                    continue
                if cfg.exact_dedup:
                    if res.exact_key in seen:
                        dedup["exact"] += 1
                        continue
                    seen.add(res.exact_key)
                if near is not None and res.minhash is not None and near.seen(res.minhash):
                    dedup["near"] += 1
                    continue
                pii_counts.update(res.pii_counts)
                languages[res.language] += 1
                split = _split_of(res.exact_key, cfg.val_fraction)
                kept_docs[split] += 1
                writers[split].write(json.dumps({"text": res.text}) + "\n")
            done_files = len(log.read) + len(log.skipped)
            bar.update(done_files, note=f"{documents_in:,} docs, {bytes_in / 1e6:,.1f} MB")
        for f in writers.values():
            f.close()
        bar.update(total_files)
        clean_seconds = bar.close()

        if not log.read:
            raise DataError(
                f"no readable input files: {len(log.skipped)} skipped "
                f"({dict(collections.Counter(r for _, r in log.skipped))}); see the lines above."
            )
        if sum(kept_docs.values()) == 0:
            raise DataError(
                f"no documents left after filtering {documents_in} (skipped: {dict(skipped)}, "
                f"filtered: {dict(filtered)}, duplicates: {dict(dedup)}). Check --text-field, "
                "or loosen the quality thresholds (e.g. --min-chars) or --no-quality."
            )

        if cfg.val_fraction > 0 and not kept_docs["validation"]:
            # The split is decided by each document's content hash; P(empty) = (1 - f)^n
            n = kept_docs["train"]
            print(
                f"prepare: warning: no document fell in the validation split ({n:,} documents, "
                f"--val-fraction {cfg.val_fraction:g}); bigjax train evaluates on it and will "
                f"refuse this dataset. Prepare with more data or e.g. --val-fraction "
                f"{min(0.5, 3 / n):.2g}.",
                file=sys.stderr,
            )

        # ---- tokenizer (BPE trains on the cleaned train split only: validation stays unseen)
        def train_texts() -> Iterator[str]:
            yield from _read_clean(work / "train.jsonl")

        tok = tokenizers.from_spec(cfg.tokenizer, train_texts)
        tok.save(out / "tokenizer")

        # ---- pass 2: tokenize into shards
        bar = progress.Bar("prepare: tokenize", sum(kept_docs.values()), "docs")
        splits: dict[str, Any] = {}
        done_docs = done_bytes = 0
        for split in SPLITS:
            with ShardWriter(out, split, tok.vocab_size, cfg.shard_tokens) as shards:
                for block in _windows(_read_clean(work / f"{split}.jsonl"), len):
                    chunk = max(len(block) // (4 * workers), 1)
                    encoded = pool.starmap(
                        tokenizers.encode_document, zip(itertools.repeat(tok), block), chunk
                    )
                    for ids in encoded:
                        shards.write(ids)
                    done_docs += len(block)
                    done_bytes += sum(len(t.encode()) for t in block)
                    bar.update(done_docs, note=f"{done_bytes / 1e6:,.1f} MB")
            splits[split] = shards.summary()
        tokenize_seconds = bar.close()

    shutil.rmtree(work)
    manifest = {
        "bigjax_version": bigjax.__version__,
        "inputs": log.read,
        "skipped_files": {
            "counts": {r: n for r in SKIP_REASONS if (n := sum(x == r for _, x in log.skipped))},
            "files": [{"path": p, "reason": r} for p, r in log.skipped],
        },
        "options": {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("inputs", "output", "workers")
        },
        "tokenizer": {
            "spec": cfg.tokenizer,
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "sha256": file_hashes(out / "tokenizer"),  # checked whenever a run loads it
        },
        "documents_in": documents_in,
        "documents_out": sum(kept_docs.values()),
        "bytes_in": bytes_in,
        "tokens_out": sum(s["tokens"] for s in splits.values()),
        "skipped": dict(sorted(skipped.items())),
        "cleaning": dict(sorted(cleaning.items())),
        "filtered": dict(sorted(filtered.items())),
        "dedup": {"exact": dedup["exact"], "near": dedup["near"]},
        "pii": {kind: pii_counts[kind] for kind in pii.PII_TYPES},
        "languages": dict(sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))),
        "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(manifest), encoding="utf-8")
    throughput = bytes_in / 1e6 / max(clean_seconds + tokenize_seconds, 1e-9)
    print(
        f"prepared {manifest['documents_out']:,} of {documents_in:,} documents, "
        f"{manifest['tokens_out']:,} tokens ({throughput:.2f} MB/s) -> {cfg.output}",
        file=sys.stderr,
    )
    return manifest


def _read_clean(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def render_report(m: dict[str, Any]) -> str:
    """The manifest as a page a person reads."""

    def table(title: str, counts: dict[str, int]) -> str:
        rows = "".join(f"| {k} | {v:,} |\n" for k, v in counts.items()) or "| (none) | 0 |\n"
        return f"## {title}\n\n| kind | count |\n|---|---|\n{rows}\n"

    tok = m["tokenizer"]
    split_rows = "".join(
        f"| {name} | {s['documents']:,} | {s['tokens']:,} | {len(s['shards'])} |\n"
        for name, s in m["splits"].items()
    )
    kept = m["documents_out"] / max(m["documents_in"], 1)
    named = m["skipped_files"]["files"]
    skipped_names = "".join(f"- `{f['path']}`: {f['reason']}\n" for f in named[:50])
    if len(named) > 50:
        skipped_names += f"- ... and {len(named) - 50} more (all in manifest.json)\n"
    skipped_names += "\n" if named else ""
    return (
        f"# Dataset report\n\n"
        f"{len(m['inputs'])} input files, {m['bytes_in'] / 1e6:,.1f} MB of text; "
        f"{m['documents_in']:,} documents in, {m['documents_out']:,} out ({kept:.1%} kept), "
        f"{m['tokens_out']:,} tokens.\n\n"
        f"Tokenizer: `{tok['spec']}` ({tok['kind']}, vocabulary {tok['vocab_size']:,}; "
        f"BOS {tok['bos_id']}, EOS {tok['eos_id']}, PAD {tok['pad_id']}).\n\n"
        f"## Splits\n\n| split | documents | tokens | shards |\n|---|---|---|---|\n{split_rows}\n"
        + table("Input files skipped (by reason)", m["skipped_files"]["counts"])
        + skipped_names
        + table("Skipped records (by reason)", m["skipped"])
        + table("Cleaning", m["cleaning"])
        + table("Quality filters (documents dropped)", m["filtered"])
        + table("Deduplication (documents dropped)", m["dedup"])
        + table("Personal data replaced (by type)", m["pii"])
        + table("Languages of the kept documents (py3langid)", m["languages"])
    )
