"""Grain pipelines: documents -> tokens -> packed rows -> global batches.

Sources: the built-in corpus (stdlib byte ranges, tokenized on the fly), one prepared dataset
(`data.path`), or a weighted mixture of prepared datasets (`data.mixture`). Every source goes
through the same chain: seeded shuffle (new order each epoch) -> repeat -> decode -> one
packing stream per row of the global batch -> the rows this process owns -> optional
multiprocess prefetch. Batch n depends on the seed and n only, not on the number of processes
or workers; the iterator state (indices, per row) is saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from grain.experimental import (
    ConcatThenSplitIterDataset,
    FirstFitPackIterDataset,
    FlatMapIterDataset,
    FlatMapTransform,
    ThreadPrefetchIterDataset,
)

from bigjax.config import DataConfig
from bigjax.data import corpus, dataset, examples, images
from bigjax.data import tokenizer as tokenizers
from bigjax.data.corpus import Document
from bigjax.data.datastate import (
    BUILTIN,
    Digests,
    MalformedDataState,
    as_written,
    continues,
    layout_change,
    recut,
    state_shape,
)
from bigjax.data.mixture import Mixture
from bigjax.data.tokenizer import ByteTokenizer
from bigjax.signals import exit_with_parent
from bigjax.tasks import TASKS, Task


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
        n, step = len(element["tokens"]), self.length
        return [{k: v[i : i + step] for k, v in element.items()} for i in range(0, n, step)]


@dataclasses.dataclass(frozen=True)
class PadRow:
    """One example per row (`data.packing=pad`): truncated or padded to the row length, in
    the packers' output format (segment 1 on real tokens, 0 on padding)."""

    length: int

    def __call__(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = min(len(element["tokens"]), self.length)
        out = {"tokens_segment_ids": (np.arange(self.length) < n).astype(np.int32)}
        out["tokens_positions"] = np.where(out["tokens_segment_ids"] > 0, np.arange(self.length), 0)
        for key, value in element.items():
            if value.ndim == 0:  # per-example values (a class label) pass through
                out[key] = value
            else:
                out[key] = np.zeros(self.length, value.dtype)
                out[key][:n] = value[:n]
        return out


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
        if "loss_mask" in rows:  # SFT: loss only where the target is a response token
            same_doc &= rows["loss_mask"][:, 1:] > 0
        out = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": seg[:, :-1].astype(np.int32),
            "positions": rows["tokens_positions"][:, :-1].astype(np.int32),
            "weights": same_doc.astype(np.float32),
        }
        if "label" in rows:  # classification: one class per row
            out["labels"] = rows["label"].astype(np.int32)
        return out


def image_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"images": rows["image"], "labels": rows["label"].astype(np.int32)}


def document_stream(
    source: grain.MapDataset,
    read: Callable[[Any], dict[str, np.ndarray]],
    *,
    seed: int,
    shuffle: bool,
    endless: bool = True,
) -> grain.MapDataset:
    """The global document order: shuffled with a new order each epoch, endless (training)
    or one pass (evaluation), decoded.

    Every process builds the same stream; which documents a process reads is decided by the
    batch rows it owns (see `RowStreams`), never by the process count.
    """
    ds = source.shuffle(seed=seed) if shuffle else source
    return (ds.repeat(None) if endless else ds).map(read)


PACKING_BINS = 8  # first-fit bins per row stream: more bins, less padding, more memory


@dataclasses.dataclass(frozen=True)
class RowStreams:
    """Row r of every global batch comes from its own packing stream over documents
    r, r+B, r+2B, ... of the global order (B = global batch size).

    So batch n is a function of (seed, n) alone: the same for 1 process x 8 devices and
    2 processes x 4, for any number of Grain workers, and the iterator state is a set of
    per-row states that any process layout can take up on resume.
    """

    docs: grain.MapDataset
    batch_size: int
    seq_len: int
    pad_id: int
    packing: str
    features: tuple[str, ...] = ("tokens",)  # per-token arrays to pack ('loss_mask' for SFT)
    mixture: Mixture | None = None  # what `docs` mixes, for a resume under other weights

    def docs_of(self, row: int) -> grain.IterDataset:
        # No read threads per row stream: parallelism comes from Grain workers (or one
        # prefetch thread), not from B thread pools.
        no_threads = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        return self.docs[row :: self.batch_size].to_iter_dataset(no_threads)

    def rows_of(self, row: int) -> grain.IterDataset:
        docs = self.docs_of(row)
        length = {f: self.seq_len + 1 for f in self.features}
        if self.features == ("image",):  # images: one per row, nothing to pack
            return docs
        if self.packing == "pad":
            return docs.map(PadRow(self.seq_len + 1))
        if self.packing == "first_fit":
            pieces = FlatMapIterDataset(docs, SplitLong(self.seq_len + 1))
            return FirstFitPackIterDataset(
                pieces, length_struct=length, num_packing_bins=PACKING_BINS, shuffle_bins=False
            )
        return ConcatThenSplitIterDataset(docs, length_struct=length)


class _RowsIterator(grain.DatasetIterator):
    def __init__(self, streams: RowStreams, rows: tuple[int, ...], start: dict[str, Any]):
        iters = []
        for row in rows:
            it = iter(streams.rows_of(row))
            if start.get(str(row)) is not None:
                it.set_state(start[str(row)])
            iters.append(it)
        super().__init__(iters)
        self._streams, self._rows, self._iters = streams, rows, iters
        self._blank_row: dict[str, np.ndarray] | None = None
        self._to_batch = (
            ToModelBatch(streams.pad_id) if "tokens" in streams.features else image_batch
        )

    def __next__(self) -> dict[str, Any]:
        # a one-pass split (the eval's) that has run out in a row goes on with blank rows
        read = [next(it, None) for it in self._iters]
        packed = [self._blank() if r is None else r for r in read]
        stacked = {k: np.stack([p[k] for p in packed]) for k in packed[0]}
        # The state travels with the batch, so the consumer knows the state of what it has
        # consumed, however far ahead workers run; `spent`: every row of it is blank.
        return {"batch": self._to_batch(stacked), "state": self.get_state(),
                "spent": all(r is None for r in read)}  # fmt: skip

    def _blank(self) -> dict[str, np.ndarray]:
        """A row past the end of a one-pass split: shaped as a real one, with segment 0 on
        every token (weight 0) and class -1 (no class), so an eval counts nothing of it. Its
        shape comes from row 0's first row, which every non-empty split has."""
        if self._blank_row is None:
            first = next(iter(self._streams.rows_of(0)), None)
            if first is None:
                raise dataset.EmptySplitError(
                    "the held-out split holds no documents: raise data.eval_fraction (or "
                    "prepare with a larger --val-fraction)")  # fmt: skip
            self._blank_row = {k: np.full_like(v, -1) if np.ndim(v) == 0 else np.zeros_like(v)
                               for k, v in first.items()}  # fmt: skip
        return self._blank_row

    def get_state(self) -> dict[str, Any]:
        return {str(r): it.get_state() for r, it in zip(self._rows, self._iters, strict=True)}

    def set_state(self, state: dict[str, Any]) -> None:
        for r, it in zip(self._rows, self._iters, strict=True):
            it.set_state(state[str(r)])


class RowsDataset(grain.IterDataset):
    """Some rows of every global batch. Grain's multiprocess prefetch slices it (set_slice):
    worker w of W packs rows[w::W]."""

    def __init__(self, streams: RowStreams, rows: tuple[int, ...], start: dict[str, Any]):
        super().__init__()
        self._streams, self._rows, self._start = streams, rows, start

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # rows are independent streams: any split is the same data
        self._rows = self._rows[sl]

    def __iter__(self) -> _RowsIterator:
        return _RowsIterator(self._streams, self._rows, self._start)


# the documents of a split (a mixture's, kept in segments: data/mixture.py), and their sources
Stream = tuple[grain.MapDataset | Mixture, Digests]


class Batches:
    """This process's rows of each global batch, in order; an iterator with get_state,
    set_state and close.

    The state is {"batch_size": B, "seq_len": L, "packing": P, "data": {source: digest},
    "rows": {row: state}} (`data`, and the layout changes that go on: datastate.py).
    Checkpoints merge the states every process saved, so a run resumes on any process count
    (see `checkpoint.DataHandler`).
    `spent` is true once the last batch returned was blank in every row of this process: a
    one-pass split (the eval's) that has run out here, so every later batch is blank too.
    """

    def __init__(
        self, streams: RowStreams, rows: Sequence[int], workers: int, data: Digests | None = None
    ):
        if not rows or min(rows) < 0 or max(rows) >= streams.batch_size:
            raise ValueError(f"rows {rows} are not rows of a batch of {streams.batch_size}")
        self._streams, self._rows, self._data = streams, tuple(rows), dict(data or {})
        self._workers = min(workers, len(self._rows))
        self._row_states: dict[str, Any] = {str(r): None for r in self._rows}
        self._it: Iterator | None = None  # started lazily: a restore replaces the state first
        self.spent = False
        self.restarted = False  # a new run's data from its beginning (set_state, restart)

    def _start(self) -> Iterator:
        ds: grain.IterDataset = RowsDataset(self._streams, self._rows, dict(self._row_states))
        if self._workers == 0:
            return iter(ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2))
        # Grain's workers read absl flags; an application that never parsed them (ours parses
        # argparse) must mark them parsed, keeping every flag at its default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=self._workers)
        return iter(ds.mp_prefetch(options, worker_init_fn=exit_with_parent))

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._start()
        # Workers take turns (Grain interleaves them round-robin): one part from each.
        parts = [next(self._it) for _ in range(max(self._workers, 1))]
        out = {}
        for key in parts[0]["batch"]:
            first = parts[0]["batch"][key]
            out[key] = np.empty((len(self._rows), *first.shape[1:]), first.dtype)
            for w, part in enumerate(parts):
                out[key][w :: len(parts)] = part["batch"][key]
        for part in parts:
            self._row_states.update(part["state"])
        self.spent = all(part["spent"] for part in parts)
        return out

    @property
    def _packing(self) -> str:
        return "" if self._streams.features == ("image",) else self._streams.packing

    def get_state(self) -> dict[str, Any]:
        s = self._streams
        mixture = {"mixture": s.mixture.state()} if s.mixture else {}
        return {"batch_size": s.batch_size, "seq_len": s.seq_len, "packing": self._packing,
                "data": self._data, **mixture, "rows": dict(self._row_states)}  # fmt: skip

    def set_state(self, state: dict[str, Any], *, restart_other_data: bool = False) -> None:
        """Takes this process's rows from a state holding (at least) all of them. A state of
        other data under a source's name, or of a layout its order cannot go on in, is
        refused, or with `restart_other_data` (a new run from another's whole state) left:
        the data is read from its beginning."""
        if not isinstance(state, dict):
            raise MalformedDataState(f"it is a {type(state).__name__}, not a mapping")
        s, restart = self._streams, restart_other_data
        recut_at = layout_change(state, s.batch_size, s.seq_len, self._packing, restart=restart)
        same_data = continues(state.get("data"), self._data, restart_other_data=restart)
        if recut_at is None or not same_data:  # a new run's data from its beginning
            self.restart()
            return
        rows = state.get("rows")
        if not isinstance(rows, dict):
            raise MalformedDataState(f"its 'rows' is {type(rows).__name__}, not a mapping")
        missing = [r for r in self._row_states if r not in rows]
        if missing:
            raise MalformedDataState(f"it has no state for batch rows {missing[:8]}")
        # Every row's state must have the structure of the one a fresh stream writes: a
        # null or emptied row would silently restart its data order.
        template = iter(self._streams.rows_of(self._rows[0])).get_state()
        want = state_shape(template)
        for r in self._row_states:
            got = state_shape(rows[r])
            if got != want:
                raise MalformedDataState(f"row {r}'s state {got} is not of the form {want}")
        self.close()
        if s.mixture and isinstance(saved := state.get("mixture"), dict):
            mixture, fresh = s.mixture.going_on_from(saved, rows)
            s = self._streams = dataclasses.replace(s, docs=mixture.docs(), mixture=mixture)
            if fresh:  # other weights: a new segment of the mixed order, each row from its start
                self._row_states, self.spent = dict.fromkeys(self._row_states), False
                return
        self._row_states = {r: as_written(rows[r], template) for r in self._row_states}
        if recut_at:  # concat rows of another length: each row goes on where it stopped
            self._row_states = {r: recut(v, iter(s.docs_of(int(r))), recut_at + 1)
                                for r, v in self._row_states.items()}  # fmt: skip
        self.spent = False

    def restart(self) -> None:
        """Every row from the data's beginning."""
        self.close()
        self._row_states, self.spent, self.restarted = dict.fromkeys(self._row_states), False, True

    def close(self) -> None:
        if self._it is not None:
            getattr(self._it, "close", lambda: None)()
            self._it = None


def default_rows(batch_size: int) -> range:
    """The even, contiguous share of a global batch that data parallelism gives a process."""
    per = batch_size // jax.process_count()
    return range(jax.process_index() * per, (jax.process_index() + 1) * per)


def for_config(
    cfg: DataConfig,
    *,
    split: str,
    seed: int,
    rows: Sequence[int] | None = None,
    shuffle: bool | None = None,
    workers: int | None = None,
    builtin_docs: Sequence[Document] | None = None,
    image_shape: tuple[int, int] | None = None,
    tokenizer: tokenizers.Tokenizer,
) -> Batches:
    """The run's batches: `rows` (default: this process's even share) of each global batch.
    `split` is 'train' or 'validation'. `tokenizer`: the run's, already loaded
    (`dataset.tokenizer_for`; a training run loads it once, with its other resources)."""
    task = TASKS[cfg.task]
    shuffle = cfg.shuffle if shuffle is None else shuffle
    stream, data = STREAMS[task.source](
        cfg, task, tokenizer, Where(split, seed, shuffle, image_shape, builtin_docs)
    )
    mixture = stream if isinstance(stream, Mixture) else None
    docs = stream.docs() if isinstance(stream, Mixture) else stream
    streams = RowStreams(docs, cfg.batch_size, cfg.seq_len, tokenizer.pad_id, cfg.packing,
                         task.row_features, mixture)  # fmt: skip
    return Batches(
        streams,
        default_rows(cfg.batch_size) if rows is None else rows,
        cfg.num_workers if workers is None else workers,
        data=data,
    )


@dataclasses.dataclass(frozen=True)
class Where:
    """Which split a stream reads, in which order, and what its caller hands it."""

    split: str  # 'train' or 'validation'
    seed: int
    shuffle: bool
    image_shape: tuple[int, int] | None  # images: (model.image_size, model.channels)
    builtin_docs: Sequence[Document] | None  # the built-in corpus's documents, if given

    @property
    def endless(self) -> bool:
        """Training repeats its split, epoch after epoch. An eval reads the held-out split
        once: rows past its end are blank (weight 0), so however many batches
        eval.num_batches asks for, no document is scored twice."""
        return self.split == "train"


def image_stream(cfg: DataConfig, task: Task, tok: tokenizers.Tokenizer, where: Where) -> Stream:
    """data.images, one record an image, augmented in training when data.augment says so."""
    if where.image_shape is None:
        raise ValueError("images need image_shape=(model.image_size, model.channels)")
    data = images.load(cfg.images, where.split, cfg.eval_fraction, *where.image_shape)
    stream = grain.MapDataset.source(images.Record(data))
    stream = stream.shuffle(seed=where.seed) if where.shuffle else stream
    stream = stream.repeat(None) if where.endless else stream
    if where.split == "train" and cfg.augment:
        stream = stream.random_map(images.Augment(flip=cfg.flip), seed=where.seed)
    return stream, {cfg.images: data.digest}


def example_stream(cfg: DataConfig, task: Task, tok: tokenizers.Tokenizer, where: Where) -> Stream:
    """data.examples (JSONL records in the task's format), encoded with the run's tokenizer."""
    found = examples.load(cfg.examples, task.examples, where.split, cfg.eval_fraction)
    source = grain.MapDataset.source(list(found.records))
    stream = document_stream(source, examples.Encode(tok, found.classes), seed=where.seed,
                             shuffle=where.shuffle, endless=where.endless)  # fmt: skip
    return stream, {cfg.examples: found.digest}


def document_streams(
    cfg: DataConfig, task: Task, tok: tokenizers.Tokenizer, where: Where
) -> Stream:
    """The built-in corpus (or `builtin_docs`), else the prepared datasets of data.path or
    data.mixture, mixed by their weights."""
    if not dataset.sources(cfg):
        docs = where.builtin_docs
        if docs is None:
            train_docs, eval_docs = corpus.split_stdlib(cfg.eval_fraction, cfg.seq_len)
            docs = train_docs if where.split == "train" else eval_docs
        # The built-in corpus is raw bytes: ByteTokenizer (data.tokenizer's only choice) reads
        # any byte string, valid UTF-8 or not.
        stream = document_stream(grain.MapDataset.source(docs), ReadTokens(ByteTokenizer()),
                                 seed=where.seed, shuffle=where.shuffle,
                                 endless=where.endless)  # fmt: skip
        # a caller's own documents (tests) are not the built-in corpus: nothing to check
        return stream, ({} if where.builtin_docs is not None else {BUILTIN: corpus.stdlib_digest()})
    streams, weights = [], []
    for i, (path, weight) in enumerate(dataset.sources(cfg)):
        source, info = dataset.split_source(path, where.split)
        read = dataset.DecodeTokens(info["dtype"])
        seed = (where.seed + i) % 2**32  # Grain's seeds are 32-bit; the same for seed < 2**32 - i
        streams.append(document_stream(source, read, seed=seed, shuffle=where.shuffle,
                                       endless=where.endless))  # fmt: skip
        weights.append(weight)
    digests = {str(path): dataset.digest(path) for path, _ in dataset.sources(cfg)}
    if len(streams) == 1:
        return streams[0], digests
    return Mixture(tuple(digests), tuple(streams), tuple(weights), (0,) * len(streams)), digests


# A task's `source` -> what reads its records into a stream of rows' features, with the
# digest of each source it read (by its config name: see bigjax/data/datastate.py). A new kind of
# data is one function here and its name in the tasks that read it (bigjax/tasks.py).
STREAMS: dict[str, Callable[[DataConfig, Task, tokenizers.Tokenizer, Where], Stream]] = {
    "images": image_stream,
    "examples": example_stream,
    "documents": document_streams,
}


def take(iterator: Iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]
