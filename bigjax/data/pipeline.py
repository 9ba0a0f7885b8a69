"""Grain pipelines: documents -> tokens -> packed rows -> model batches, per process."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from absl import flags
from grain.experimental import ConcatThenSplitIterDataset

from bigjax.config import DataConfig
from bigjax.data.corpus import Document
from bigjax.data.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class ReadTokens:
    """Reads one document's bytes and tokenizes them (runs inside Grain workers)."""

    tokenizer: ByteTokenizer

    def __call__(self, doc: Document) -> dict[str, np.ndarray]:
        with open(doc.path, "rb") as f:
            f.seek(doc.start)
            data = f.read(doc.end - doc.start)
        return {"tokens": self.tokenizer.encode(data, bos=doc.first, eos=doc.last)}


@dataclasses.dataclass(frozen=True)
class ToModelBatch:
    """Packed rows of L+1 tokens -> next-token inputs/targets of length L.

    A target is trained on only if it continues the same document as its input token, so no
    loss is taken across a packing boundary and padding (segment 0) has weight 0.
    """

    pad_id: int

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = rows["tokens_segment_ids"]
        tokens = np.where(seg > 0, rows["tokens"], self.pad_id).astype(np.int32)
        same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": seg[:, :-1].astype(np.int32),
            "positions": rows["tokens_positions"][:, :-1].astype(np.int32),
            "weights": same_doc.astype(np.float32),
        }


def make_dataset(
    docs: Sequence[Document],
    *,
    tokenizer: ByteTokenizer,
    seq_len: int,
    local_batch: int,
    seed: int,
    shuffle: bool,
    num_workers: int,
    process_index: int,
    process_count: int,
) -> grain.IterDataset:
    """An endless dataset of this process's share of each global batch.

    Documents are split across processes first (disjoint), then shuffled with a seeded,
    epoch-dependent permutation, so every run with the same seed sees the same data order.
    """
    ds = grain.MapDataset.source(list(docs))[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None).map(ReadTokens(tokenizer))
    packed = ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
    batched = packed.batch(local_batch, drop_remainder=True).map(ToModelBatch(tokenizer.pad_id))
    if num_workers > 0:
        # Grain's workers read absl flags; an application that never parsed them (ours parses
        # argparse) must mark them parsed, keeping every flag at its default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return batched


def take(iterator: Iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def for_config(
    cfg: DataConfig,
    docs: Sequence[Document],
    tokenizer: ByteTokenizer,
    *,
    seed: int,
    shuffle: bool | None = None,
    workers: int | None = None,
) -> grain.IterDataset:
    """`make_dataset` for this process with the run's DataConfig."""
    return make_dataset(
        docs,
        tokenizer=tokenizer,
        seq_len=cfg.seq_len,
        local_batch=cfg.batch_size // jax.process_count(),
        seed=seed,
        shuffle=cfg.shuffle if shuffle is None else shuffle,
        num_workers=cfg.num_workers if workers is None else workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
