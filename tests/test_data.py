"""The built-in corpus, byte tokenizer and Grain packing pipeline, on real stdlib text."""

import sysconfig
from pathlib import Path

import grain
import numpy as np
import pytest

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
        local_batch=8,
        seed=0,
        shuffle=True,
        num_workers=0,
        process_index=0,
        process_count=1,
    )
    return pipeline.make_dataset(docs, **{**args, **kw})


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
    b = next(iter(_dataset(split[0])))
    assert {k: v.shape for k, v in b.items()} == {k: (8, 64) for k in b}
    seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
    # targets are the inputs shifted by one
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    # positions restart at 0 at each new segment and count up inside it
    starts = np.concatenate([np.ones((8, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
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


def test_processes_read_disjoint_documents(split):
    docs = split[0][:400]  # 400 chunks, 2 processes, 200 each, 64 bytes per chunk
    seen = []
    for pid in range(2):
        ds = _dataset(docs, shuffle=False, process_index=pid, process_count=2, local_batch=4)
        rows = np.concatenate([b["inputs"] for b in pipeline.take(iter(ds), 10)])
        seen.append({bytes(r.astype(np.uint8)) for r in rows})
    assert not seen[0] & seen[1]


def test_iterator_resumes_exactly_with_worker_processes(split):
    ds = _dataset(split[0], num_workers=2)
    it = iter(ds)
    pipeline.take(it, 3)
    state = it.get_state()
    expected = pipeline.take(it, 3)
    it.close()
    it2 = iter(ds)
    it2.set_state(state)
    got = pipeline.take(it2, 3)
    it2.close()
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert isinstance(ds, grain.IterDataset)
