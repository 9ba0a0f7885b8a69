"""A prepared dataset on disk: ArrayRecord token shards per split, tokenizer/, manifest.json.

A record is one document's token ids (BOS ... EOS) as little-endian uint16 (vocabularies up to
65,536) or uint32: raw numbers, nothing executable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import numpy as np

from bigjax.config import DataConfig
from bigjax.data import tokenizer as tokenizers
from bigjax.errors import UsageError

SPLITS = ("train", "validation")


class EmptySplitError(UsageError, ValueError):
    """A prepared dataset has no documents in a split that training needs."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


class ShardWriter:
    """Writes one split as `{split}-NNNNN.array_record` files of about `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, vocab_size: int, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[str] = []
        self.documents = self.tokens = self._in_shard = 0
        self._writer = None

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
        self._writer.write(np.asarray(ids).astype(self.dtype).tobytes())
        self.documents += 1
        self.tokens += len(ids)
        self._in_shard += len(ids)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_shard = None, 0

    def __exit__(self, *exc: object) -> None:
        self._close_shard()

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "shards": self.shards,
            "dtype": self.dtype.str,
        }


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"data.path {str(path)!r} is not a prepared dataset (no manifest.json). Make one "
            "with: bigjax prepare --input 'raw/*.jsonl' --output DIR"
        )
    return json.loads(manifest.read_text())


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
    source = grain.sources.ArrayRecordDataSource([str(path / s) for s in info["shards"]])
    return grain.MapDataset.source(source), info


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    read_manifest(path)
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

    def fingerprint(path: Path) -> tuple:
        return tuple((f.name, f.read_bytes()) for f in sorted((path / "tokenizer").iterdir()))

    if len({fingerprint(p) for p in paths}) > 1:
        raise tokenizers.TokenizerError(
            f"data.mixture: datasets {[str(p) for p in paths]} were prepared with different "
            "tokenizers; prepare them with the same --tokenizer (e.g. hf:PATH of one of them)."
        )
    for path in paths:  # fail now, not at the first eval after hours of training
        for split in SPLITS:
            split_source(path, split)
    return load_tokenizer(paths[0])
