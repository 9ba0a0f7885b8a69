"""A prepared dataset on disk: ArrayRecord token shards per split, tokenizer/, manifest.json.

A record is one document's token ids (BOS ... EOS) as little-endian uint16 (vocabularies up to
65,536) or uint32: raw numbers, nothing executable.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grain
import numpy as np

from bigjax.config import DataConfig
from bigjax.data import tokenizer as tokenizers
from bigjax.errors import UsageError

SPLITS = ("train", "validation")
T = TypeVar("T")


class EmptySplitError(UsageError, ValueError):
    """A prepared dataset has no documents in a split that training needs."""


class DamagedDatasetError(UsageError, ValueError):
    """A dataset that does not read back as prepare wrote it: a truncated shard or a flipped
    bit (every ArrayRecord chunk carries a hash checked on each read), a shard swapped or
    copied in from another dataset (the manifest records each shard's fingerprint), a
    tokenizer file changed (it records their hashes too), or a manifest that is no longer one."""


def fingerprint(records: int, first: bytes, last: bytes) -> str:
    """Names a shard by its record count and its first and last records: what tells two
    shards of one dataset apart, read at each open in two records. (ArrayRecord pads every
    shard to whole blocks, so their sizes do not; hashing whole shards at each start would
    read the dataset.)"""
    h = hashlib.sha256(len(first).to_bytes(8, "little") + first + last)
    return f"{records}:{h.hexdigest()[:16]}"


class Shards:
    """The records of a split's shards, in order, as one random-access source (Grain's
    `RandomAccessDataSource`); a shard that cannot be read is an error naming it and the fix,
    raised where the damaged record is read (at the start for a truncated shard)."""

    def __init__(self, paths: Sequence[Path], fingerprints: Sequence[str] | None = None):
        self.paths = [str(p) for p in paths]
        self._sources = [_checked(p, functools.partial(grain.sources.ArrayRecordDataSource, [p]))
                         for p in self.paths]  # fmt: skip
        self._starts = list(itertools.accumulate((len(s) for s in self._sources), initial=0))
        for shard, expected in enumerate(fingerprints or ()):  # None: prepared before them
            if (found := self._fingerprint(shard)) != expected:
                raise DamagedDatasetError(
                    f"{self.paths[shard]} is not the shard prepare wrote there (fingerprint "
                    f"{found}, manifest.json records {expected}): a shard renamed, swapped or "
                    f"copied in from another dataset. {CHANGED}"
                )

    def _fingerprint(self, shard: int) -> str:
        n = len(self._sources[shard])
        read = lambda i: self[self._starts[shard] + i] if n else b""  # noqa: E731
        return fingerprint(n, read(0), read(n - 1))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> bytes:
        shard = bisect.bisect_right(self._starts, index) - 1
        record = index - self._starts[shard]
        return _checked(self.paths[shard], lambda: self._sources[shard][record], record)


def _checked(path: str, read: Callable[[], T], record: int | None = None) -> T:
    try:
        return read()
    except RuntimeError as e:  # riegeli: "Corrupted Riegeli/records file: ...", a short file
        where = "" if record is None else f" (record {record})"
        raise DamagedDatasetError(
            f"{path}{where} is damaged: {str(e).splitlines()[0][:200]}. {CHANGED}"
        ) from None


CHANGED = (
    "The dataset changed on disk after it was prepared; restore the file or run `bigjax "
    "prepare` again (a run resumes from its last checkpoint once its data reads)."
)


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of each file in `directory`, by name (the tokenizer's, kept in the manifest)."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.iterdir()) if f.is_file()}  # fmt: skip


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


class ShardWriter:
    """Writes one split as `{split}-NNNNN.array_record` files of about `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, vocab_size: int, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[str] = []
        self.fingerprints: list[str] = []  # one a shard, checked whenever a run opens it
        self.documents = self.tokens = self._in_shard = 0
        self._writer = None
        self._first, self._last, self._records = b"", b"", 0  # of the open shard

    def __enter__(self) -> ShardWriter:
        return self

    def write(self, ids: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self._in_shard >= self.shard_tokens:
            self._close_shard()
            name = f"{self.split}-{len(self.shards):05d}.array_record"
            self.shards.append(name)
            # group_size 1: every record is individually addressable for global shuffling.
            self._writer = ArrayRecordWriter(str(self.out / name), "group_size:1")
        assert self._writer is not None  # opened just above when missing
        record = np.asarray(ids).astype(self.dtype).tobytes()
        self._writer.write(record)
        self._first = record if self._records == 0 else self._first
        self._last, self._records = record, self._records + 1
        self.documents += 1
        self.tokens += len(ids)
        self._in_shard += len(ids)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.fingerprints.append(fingerprint(self._records, self._first, self._last))
        self._writer, self._in_shard, self._records = None, 0, 0

    def __exit__(self, *exc: object) -> None:
        self._close_shard()

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "shards": self.shards,
            "fingerprints": self.fingerprints,
            "dtype": self.dtype.str,
        }


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"data.path {str(path)!r} is not a prepared dataset (no manifest.json). Make one "
            "with: bigjax prepare --input 'raw/*.jsonl' --output DIR"
        )
    try:
        info = json.loads(manifest.read_bytes())
        hashes = info["tokenizer"].get("sha256", {})  # absent before hashes were recorded
        if not isinstance(hashes, dict) or not all(isinstance(h, str) for h in hashes.values()):
            raise TypeError("tokenizer.sha256 is not a mapping of file names to hashes")
        for split in SPLITS:
            shards, dtype = info["splits"][split]["shards"], info["splits"][split]["dtype"]
            plain = lambda s: Path(s).name == s and s not in ("", "..")  # noqa: E731
            if not isinstance(shards, list) or not all(map(plain, shards)):
                raise TypeError(f"splits.{split}.shards is not a list of file names")
            prints = info["splits"][split].get("fingerprints")  # None: prepared before them
            strings = isinstance(prints, list) and all(isinstance(f, str) for f in prints)
            if prints is not None and not (strings and len(prints) == len(shards)):
                raise TypeError(f"splits.{split}.fingerprints is not one string per shard")
            np.dtype(dtype)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8, odd fields
        raise DamagedDatasetError(
            f"{manifest} is damaged ({type(e).__name__}: {e}). {CHANGED}"
        ) from None
    return info


class DecodeTokens(grain.transforms.Map):
    """ArrayRecord bytes -> {'tokens': int32 ids}."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return {"tokens": np.frombuffer(record, dtype=self.dtype).astype(np.int32)}


def split_source(path: Path, split: str) -> tuple[grain.MapDataset, dict[str, Any]]:
    """The documents of one split as a random-access Grain dataset, and the split's summary."""
    info = read_manifest(path)["splits"][split]
    if not info["shards"]:
        raise EmptySplitError(
            f"{path}: the {split} split is empty; prepare with a larger --val-fraction or more "
            "data."
        )
    shards = Shards([path / s for s in info["shards"]], info.get("fingerprints"))
    return grain.MapDataset.source(shards), info


def digest(path: Path) -> str:
    """Names a prepared dataset's documents by its splits' summaries (shards, documents,
    tokens): a resume checks that the dataset was not prepared again under it."""
    splits = read_manifest(path)["splits"]
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    """The tokenizer a dataset was prepared with, the files prepare wrote checked against the
    manifest's hashes (datasets prepared before the hashes were recorded are read unchecked)."""
    recorded = read_manifest(path)["tokenizer"].get("sha256") or {}
    found = file_hashes(path / "tokenizer")
    # only what prepare wrote: a file added beside it (a chat template for serving) is the user's
    if changed := sorted(k for k in recorded if found.get(k) != recorded[k]):
        raise DamagedDatasetError(f"{path / 'tokenizer'}: {', '.join(changed)} differ from what "
                                  f"prepare wrote. {CHANGED}")  # fmt: skip
    return tokenizers.load(path / "tokenizer")


def sources(cfg: DataConfig) -> tuple[tuple[Path, float], ...]:
    """(dataset dir, weight) of every prepared dataset the config reads; () for the stdlib."""
    if cfg.mixture:
        return tuple((Path(p), w) for p, w in cfg.mixture)
    return ((Path(cfg.path), 1.0),) if cfg.path else ()


def tokenizer_dir(cfg: DataConfig) -> Path | None:
    """Where the run's tokenizer files are (the first dataset's `tokenizer/`), None for the
    built-in corpus: other files saved beside the tokenizer (a chat template) are read there."""
    paths = [p for p, _ in sources(cfg)]
    return paths[0] / "tokenizer" if paths else None


def tokenizer_for(cfg: DataConfig) -> tokenizers.Tokenizer:
    """The built-in corpus's tokenizer, or the one saved in the prepared dataset(s)."""
    paths = [p for p, _ in sources(cfg)]
    if not paths:
        return tokenizers.TOKENIZERS[cfg.tokenizer]()
    for p in paths:
        read_manifest(p)  # a clear error when a path is not a prepared dataset

    if len({tuple(file_hashes(p / "tokenizer").items()) for p in paths}) > 1:
        raise tokenizers.TokenizerError(
            f"data.mixture: datasets {[str(p) for p in paths]} were prepared with different "
            "tokenizers; prepare them with the same --tokenizer (e.g. hf:PATH of one of them)."
        )
    for path in paths:  # fail now, not at the first eval after hours of training
        for split in SPLITS:
            split_source(path, split)
    return load_tokenizer(paths[0])
