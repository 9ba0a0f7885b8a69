"""Resuming the data pipeline alone (no model): a state saved after any step, written and read
back by the checkpoint's own data handler (JSON files, one per process), continues with exactly
the batches of the iterator that never stopped, for every packing, document-length mix,
mixture and split of the batch rows over processes."""

import json
from pathlib import Path

import grain
import numpy as np
import pytest

from bigjax.checkpoint import DataHandler, DataRestore
from bigjax.data import pipeline

STEPS = 10  # states saved after steps 1..STEPS
AHEAD = 3  # batches compared after each restore

# Document lengths, as multiples of the row (seq_len + 1): what decides how packers split
# and carry documents over a batch boundary. 'exact' makes documents that end exactly at a
# row's end, the case whose saved state Grain misread after a JSON round trip.
LENGTHS = {
    "short": lambda rng, row, n: rng.integers(1, max(row // 3, 2), n),
    "exact": lambda rng, row, n: rng.choice([row, 2 * row, row - 1, row + 1, 1], n),
    "long": lambda rng, row, n: rng.integers(row, 4 * row, n),
    "mixed": lambda rng, row, n: rng.choice([1, row // 2 + 1, row, 3 * row + 2], n),
}


def _docs(kind: str, row: int, n: int, seed: int, first_id: int) -> grain.MapDataset:
    """`n` documents whose tokens are unique across the whole stream (id * 10_000 + position),
    so a dropped, repeated or shifted document changes some batch."""
    rng = np.random.default_rng(seed)
    lengths = LENGTHS[kind](rng, row, n)
    tokens = [
        ((first_id + i) * 10_000 + np.arange(length)).astype(np.int32)
        for i, length in enumerate(lengths)
    ]
    return grain.MapDataset.source(tokens)


def _streams(kind: str, seq_len: int, batch: int, packing: str, mixture: bool):
    row = seq_len + 1
    docs = _docs(kind, row, 200, seed=seq_len * 31 + batch, first_id=0)
    stream = pipeline.document_stream(docs, lambda t: {"tokens": t}, seed=5, shuffle=True)
    if mixture:  # a second source, other lengths, weighted as a data.mixture
        other = _docs("mixed", row, 150, seed=7, first_id=1000)
        second = pipeline.document_stream(other, lambda t: {"tokens": t}, seed=6, shuffle=True)
        stream = grain.MapDataset.mix([stream, second], [0.7, 0.3])
    return pipeline.RowStreams(stream, batch, seq_len, pad_id=-1, packing=packing)


def _save(directory: Path, parts: list[pipeline.Batches]) -> None:
    """What each of len(parts) processes writes into a checkpoint's `data` item."""
    directory.mkdir(parents=True)
    for i, part in enumerate(parts):
        name = f"process_{i}-of-{len(parts)}.json"
        (directory / name).write_text(json.dumps(part.get_state()))


def _restore(directory: Path, streams, rows_per_process: list[range]) -> list[pipeline.Batches]:
    out = []
    for rows in rows_per_process:
        it = pipeline.Batches(streams, rows, workers=0)
        DataHandler().restore(directory, DataRestore(it))  # merges every process's file
        out.append(it)
    return out


def _joined(parts: list[pipeline.Batches], n: int) -> list[dict[str, np.ndarray]]:
    got = [pipeline.take(p, n) for p in parts]
    for p in parts:
        p.close()
    steps = zip(*got, strict=True)
    return [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in steps]


CASES = [
    # (document lengths, seq_len, batch, packing, mixture, processes that save, that restore)
    ("exact", 15, 4, "concat", False, 1, 1),
    ("short", 15, 4, "concat", False, 2, 1),
    ("long", 7, 3, "concat", False, 1, 1),
    ("mixed", 31, 8, "concat", True, 4, 2),
    ("exact", 15, 4, "first_fit", False, 1, 2),
    ("short", 31, 2, "first_fit", False, 2, 2),
    ("mixed", 7, 8, "first_fit", True, 1, 4),
    ("long", 15, 1, "first_fit", False, 1, 1),
    ("mixed", 15, 4, "pad", False, 2, 1),
    ("exact", 7, 2, "pad", True, 1, 1),
]


@pytest.mark.parametrize("kind,seq_len,batch,packing,mixture,saving,restoring", CASES)
def test_state_after_every_step_resumes_the_same_batches(
    tmp_path, kind, seq_len, batch, packing, mixture, saving, restoring
):
    streams = _streams(kind, seq_len, batch, packing, mixture)
    split = lambda n: [range(i * batch // n, (i + 1) * batch // n) for i in range(n)]  # noqa: E731
    reference = pipeline.take(pipeline.Batches(streams, range(batch), 0), STEPS + AHEAD)
    writers = [pipeline.Batches(streams, rows, 0) for rows in split(saving)]
    for step in range(1, STEPS + 1):
        for w in writers:
            next(w)
        directory = tmp_path / str(step)
        _save(directory, writers)
        resumed = _joined(_restore(directory, streams, split(restoring)), AHEAD)
        for ahead, (got, want) in enumerate(zip(resumed, reference[step:], strict=False)):
            for key in want:
                assert np.array_equal(got[key], want[key]), (
                    f"resumed after step {step}: batch {step + ahead + 1} differs in {key!r}"
                )
    for w in writers:
        w.close()


def test_the_grain_fault_the_pipeline_works_around():
    """Grain's concat-then-split iterator, alone, misreads its own state after JSON: if this
    starts failing, Grain has fixed it (and `pipeline.as_written` may go)."""
    from grain.experimental import ConcatThenSplitIterDataset

    docs = grain.MapDataset.source([np.arange(4), np.arange(10, 13), np.arange(20, 25)])
    rows = ConcatThenSplitIterDataset(
        docs.map(lambda x: {"tokens": x}).to_iter_dataset(), length_struct={"tokens": 4}
    )
    it = iter(rows)
    next(it)
    state = it.get_state()
    want = next(it)["tokens"]
    resumed = iter(rows)
    resumed.set_state(json.loads(json.dumps(state)))
    assert not np.array_equal(next(resumed)["tokens"], want)  # Grain: document 2 is lost
    fixed = iter(rows)
    fixed.set_state(pipeline.as_written(json.loads(json.dumps(state)), state))
    np.testing.assert_array_equal(next(fixed)["tokens"], want)
