"""Grain pipelines: documents -> tokens -> packed rows -> model batches, per process.

Sources: the built-in corpus (stdlib byte ranges, tokenized on the fly), one prepared dataset
(`data.path`), or a weighted mixture of prepared datasets (`data.mixture`). Every source goes
through the same chain: per-process shard -> seeded shuffle (new order each epoch) -> repeat ->
decode -> pack -> batch -> optional multiprocess prefetch. The iterator's state is small
(indices) and is saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import jax
import numpy as np
from absl import flags
from grain.experimental import (
    ConcatThenSplitIterDataset,
    FirstFitPackIterDataset,
    FlatMapIterDataset,
    FlatMapTransform,
)

from bigjax.config import DataConfig
from bigjax.data import corpus, dataset
from bigjax.data import tokenizer as tokenizers
from bigjax.data.corpus import Document
from bigjax.data.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class ReadTokens:
    """Reads one built-in-corpus document's bytes and tokenizes them (in Grain workers)."""

    tokenizer: ByteTokenizer

    def __call__(self, doc: Document) -> dict[str, np.ndarray]:
        with open(doc.path, "rb") as f:
            f.seek(doc.start)
            data = f.read(doc.end - doc.start)
        ids = self.tokenizer.encode_bytes(data)
        bos = [self.tokenizer.bos_id] if doc.first else []
        eos = [self.tokenizer.eos_id] if doc.last else []
        return {"tokens": np.concatenate([bos, ids, eos]).astype(np.int32)}


class SplitLong(FlatMapTransform):
    """Cuts documents longer than a row into row-sized pieces, so first-fit packing (which
    drops what does not fit) loses nothing."""

    def __init__(self, length: int):
        self.length = length
        self.max_fan_out = 1 << 20

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens = element["tokens"]
        return [{"tokens": tokens[i : i + self.length]} for i in range(0, len(tokens), self.length)]


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


def document_stream(
    source: grain.MapDataset,
    read,
    *,
    seed: int,
    shuffle: bool,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """This process's disjoint share of `source`, shuffled per epoch, endless, decoded."""
    ds = source[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None).map(read)


def pack_and_batch(
    docs: grain.MapDataset,
    *,
    seq_len: int,
    local_batch: int,
    pad_id: int,
    packing: str,
    num_workers: int,
) -> grain.IterDataset:
    """Packs documents into rows of seq_len+1 tokens (segment ids and positions restart per
    document) and batches them into model batches."""
    length = {"tokens": seq_len + 1}
    stream = docs.to_iter_dataset()
    if packing == "first_fit":
        stream = FlatMapIterDataset(stream, SplitLong(seq_len + 1))
        packed = FirstFitPackIterDataset(
            stream, length_struct=length, num_packing_bins=local_batch, shuffle_bins=False
        )
    else:
        packed = ConcatThenSplitIterDataset(stream, length_struct=length)
    batched = packed.batch(local_batch, drop_remainder=True).map(ToModelBatch(pad_id))
    if num_workers > 0:
        # Grain's workers read absl flags; an application that never parsed them (ours parses
        # argparse) must mark them parsed, keeping every flag at its default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return batched


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
    packing: str = "concat",
) -> grain.IterDataset:
    """Batches of the built-in corpus (byte ranges of stdlib files)."""
    stream = document_stream(
        grain.MapDataset.source(list(docs)),
        ReadTokens(tokenizer),
        seed=seed,
        shuffle=shuffle,
        process_index=process_index,
        process_count=process_count,
    )
    return pack_and_batch(
        stream,
        seq_len=seq_len,
        local_batch=local_batch,
        pad_id=tokenizer.pad_id,
        packing=packing,
        num_workers=num_workers,
    )


def sources(cfg: DataConfig) -> tuple[tuple[Path, float], ...]:
    """(dataset dir, weight) of every prepared dataset the config reads; () for the stdlib."""
    if cfg.mixture:
        return tuple((Path(p), w) for p, w in cfg.mixture)
    return ((Path(cfg.path), 1.0),) if cfg.path else ()


def tokenizer_for(cfg: DataConfig) -> tokenizers.Tokenizer:
    """The built-in corpus's tokenizer, or the one saved in the prepared dataset(s)."""
    paths = [p for p, _ in sources(cfg)]
    if not paths:
        return tokenizers.TOKENIZERS[cfg.tokenizer]()
    for p in paths:
        dataset.read_manifest(p)  # a clear error when a path is not a prepared dataset

    def fingerprint(path: Path) -> tuple:
        return tuple((f.name, f.read_bytes()) for f in sorted((path / "tokenizer").iterdir()))

    if len({fingerprint(p) for p in paths}) > 1:
        raise tokenizers.TokenizerError(
            f"data.mixture: datasets {[str(p) for p in paths]} were prepared with different "
            "tokenizers; prepare them with the same --tokenizer (e.g. hf:PATH of one of them)."
        )
    for path in paths:  # fail now, not at the first eval after hours of training
        for split in dataset.SPLITS:
            dataset.split_source(path, split)
    return dataset.load_tokenizer(paths[0])


def for_config(
    cfg: DataConfig,
    *,
    split: str,
    seed: int,
    shuffle: bool | None = None,
    workers: int | None = None,
    builtin_docs: Sequence[Document] | None = None,
) -> grain.IterDataset:
    """The run's batches for this process. `split` is 'train' or 'validation'."""
    tok = tokenizer_for(cfg)
    shuffle = cfg.shuffle if shuffle is None else shuffle
    common = dict(
        seed=seed,
        shuffle=shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if not sources(cfg):
        if builtin_docs is None:
            train_docs, eval_docs = corpus.split_stdlib(cfg.eval_fraction, cfg.seq_len)
            builtin_docs = train_docs if split == "train" else eval_docs
        stream = document_stream(
            grain.MapDataset.source(list(builtin_docs)), ReadTokens(tok), **common
        )
    else:
        streams, weights = [], []
        for i, (path, weight) in enumerate(sources(cfg)):
            source, info = dataset.split_source(path, split)
            streams.append(
                document_stream(
                    source, dataset.DecodeTokens(info["dtype"]), **{**common, "seed": seed + i}
                )
            )
            weights.append(weight)
        stream = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
    return pack_and_batch(
        stream,
        seq_len=cfg.seq_len,
        local_batch=cfg.batch_size // jax.process_count(),
        pad_id=tok.pad_id,
        packing=cfg.packing,
        num_workers=cfg.num_workers if workers is None else workers,
    )


def take(iterator: Iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]
