"""The built-in corpus, byte tokenizer and Grain packing pipeline, on real stdlib text."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset

from bigjax.data import corpus, pipeline
from bigjax.data.tokenizer import ByteTokenizer, encode_document

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def split():
    return corpus.split_stdlib(0.02, 64)


def _dataset(docs, **kw):
    args = dict(
        tokenizer=TOK,
        seq_len=64,
        batch_size=8,
        seed=0,
        shuffle=True,
        num_workers=0,
    )
    return make_dataset(docs, **{**args, **kw})


def test_tokenizer_round_trip_including_invalid_utf8():
    data = "déf f(x):\n    return 'π'\n".encode() + b"\xff\xfe"
    ids = TOK.encode_bytes(data)
    assert ids.max() < 256 and bytes(ids.astype(np.uint8)) == data
    doc = encode_document(TOK, "déf")
    assert doc[0] == TOK.bos_id and doc[-1] == TOK.eos_id and TOK.decode(doc) == "déf"


def test_corpus_is_the_stdlib_and_split_is_disjoint(split):
    train, evals = split
    root = sysconfig.get_paths()["stdlib"]
    assert all(d.path.startswith(root) and "site-packages" not in d.path for d in train[:100])
    train_files, eval_files = {d.path for d in train}, {d.path for d in evals}
    assert not train_files & eval_files
    assert 0.005 < len(eval_files) / (len(train_files) + len(eval_files)) < 0.05
    assert sum(d.end - d.start for d in train) > 10_000_000  # the corpus is real: > 10 MB
    # chunks tile each file exactly
    by_file = {}
    for d in train:
        by_file.setdefault(d.path, []).append(d)
    for path, docs in list(by_file.items())[:50]:
        assert docs[0].start == 0 and docs[-1].end == Path(path).stat().st_size
        assert all(a.end == b.start for a, b in zip(docs, docs[1:], strict=False))


def test_batches_pack_documents_correctly(split):
    batches = _take_all(_dataset(split[0]), 4)
    assert {k: v.shape for k, v in batches[0].items()} == {k: (8, 64) for k in batches[0]}
    # 4 batches as one (32, 64) block: the first rows of each row stream start a document
    b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
    seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
    # targets are the inputs shifted by one
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    # positions restart at 0 at each new segment and count up inside it
    starts = np.concatenate([np.ones((32, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert np.all(pos[starts & (seg > 0)] == 0)
    assert np.all(pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1)
    # documents are packed: several segments per row on average, little padding
    assert (seg.max(axis=1) >= 2).mean() > 0.5 and w.mean() > 0.9
    # no loss across a document boundary (target in a new segment) or on padding
    assert np.all(w[:, :-1][seg[:, 1:] != seg[:, :-1]] == 0)


def test_seeded_order_is_deterministic_and_seed_dependent(split):
    a = pipeline.take(iter(_dataset(split[0])), 3)
    b = pipeline.take(iter(_dataset(split[0])), 3)
    c = pipeline.take(iter(_dataset(split[0], seed=1)), 3)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def _take_all(ds, n):
    out = pipeline.take(ds, n)
    ds.close()  # stop its Grain worker processes now, not at garbage collection
    return out


def _same(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_do_not_depend_on_process_or_worker_count(split):
    docs = split[0][:2000]
    whole = _take_all(_dataset(docs), 6)
    # Two "processes" own rows 0-3 and 4-7 (one with 2 Grain workers, one with 3 for 4 rows);
    # together they produce exactly the one-process batches.
    halves = [
        _take_all(_dataset(docs, rows=range(0, 4), num_workers=2), 6),
        _take_all(_dataset(docs, rows=range(4, 8), num_workers=3), 6),
    ]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves, strict=True)]
    _same(joined, whole)
    # the rows are different text, not copies
    rows = {r.tobytes() for b in whole for r in b["inputs"]}
    assert len(rows) == 6 * 8


@pytest.mark.slow
def test_iterator_state_from_two_processes_resumes_in_one_and_back(split):
    docs = split[0][:2000]
    whole = _dataset(docs)
    pipeline.take(whole, 3)
    expected = _take_all(whole, 3)
    halves = [_dataset(docs, rows=range(0, 4)), _dataset(docs, rows=range(4, 8), num_workers=2)]
    for h in halves:
        pipeline.take(h, 3)
    # what a checkpoint's merge of both processes' files gives
    merged = {
        "batch_size": 8,
        "rows": {**halves[0].get_state()["rows"], **halves[1].get_state()["rows"]},
    }
    for h in halves:
        h.close()
    one = _dataset(docs, num_workers=2)
    one.set_state(merged)
    _same(pipeline.take(one, 3), expected)
    # and one process's state resumes in two
    two = [_dataset(docs, rows=range(0, 4)), _dataset(docs, rows=range(4, 8))]
    for part in two:
        part.set_state(one.get_state())
    after = _take_all(one, 2)
    parts = [_take_all(p, 2) for p in two]
    _same(
        [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts, strict=True)], after
    )
    with pytest.raises(ValueError, match="batch_size=8, this run has 4"):
        _dataset(docs, batch_size=4).set_state(merged)


@pytest.mark.slow
def test_iterator_resumes_exactly_with_worker_processes(split):
    it = _dataset(split[0], num_workers=2)
    pipeline.take(it, 3)
    state = it.get_state()
    expected = pipeline.take(it, 3)
    it.close()
    it2 = _dataset(split[0], num_workers=2)
    it2.set_state(state)
    got = pipeline.take(it2, 3)
    it2.close()
    _same(got, expected)


@pytest.mark.parametrize("packing", ["first_fit", "pad"])
def test_the_held_out_split_is_read_once_then_blank_and_training_repeats(tmp_path, packing):
    from bigjax.config import DataConfig

    docs = []
    for i, size in enumerate([30, 5, 61, 12, 44]):
        path = tmp_path / f"doc{i}.py"
        path.write_bytes(bytes(range(97, 97 + 26)) * 3)
        path.write_bytes(path.read_bytes()[:size])
        docs.append(corpus.Document(str(path), 0, size, size))
    cfg = DataConfig(batch_size=2, seq_len=64, packing=packing)

    spent = {}  # split -> after each batch, whether it was blank in every row

    def read(split: str, n: int) -> list[dict]:
        it = pipeline.for_config(cfg, split=split, seed=0, shuffle=False, workers=0,
                                 builtin_docs=docs, tokenizer=TOK)  # fmt: skip
        out, spent[split] = [], []
        for _ in range(n):
            out.append(next(it))
            spent[split].append(it.spent)
        it.close()
        return out

    batches = read("validation", 8)
    # the eval stops at the first batch blank in every row: all before it held data
    first = spent["validation"].index(True)
    assert all(spent["validation"][first:]) and all(b["segment_ids"].any() for b in batches[:first])
    assert not any(b["segment_ids"].any() for b in batches[first:])
    starts = sum(int(((b["positions"] == 0) & (b["segment_ids"] > 0)).sum()) for b in batches)
    assert starts == len(docs)  # each document once: no row wrapped around to its first
    # every next-token target of every document once (each fits a row: BOS + bytes + EOS)
    assert sum(float(b["weights"].sum()) for b in batches) == sum(d.size + 1 for d in docs)
    assert not batches[-1]["segment_ids"].any() and not batches[-1]["weights"].any()
    # training is endless: the same 8 batches hold every document more than once
    train = read("train", 8)
    assert sum(int(((b["positions"] == 0) & (b["segment_ids"] > 0)).sum()) for b in train) > 8
    assert not any(spent["train"])
