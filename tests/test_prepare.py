"""`bigjax prepare` end to end on handmade messy files and real stdlib text."""

import gzip
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bigjax.data import tokenizer as tokenizers
from bigjax.data.clean import normalize
from bigjax.data.dataset import read_manifest, split_source
from bigjax.data.pii import scrub
from bigjax.data.prepare import PrepareConfig, prepare
from bigjax.data.sources import DataError

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROSE = [
    "The committee met on Tuesday to review the budget for the new library building downtown.",
    "Gardeners know that tomatoes need steady watering, full sun and a little patience in July.",
    "A lighthouse keeper wrote letters every evening, describing storms and passing ships.",
    "The recipe calls for flour, butter, two eggs and a pinch of salt, mixed until smooth.",
    "Engineers measured the bridge vibrations with sensors placed along the steel frame.",
]
LONG = (
    "In the spring the river rose and flooded the lower fields, so the farmers moved their "
    "sheep to the hills and waited for the water to recede before planting again. The old "
    "mill by the bridge stopped turning for a week, and children watched the brown current "
    "carry branches, fence posts and once a wooden chair past the church. When the level "
    "fell, neighbours gathered with shovels to clear the silt from the roads and cellars."
)


def _jsonl(path: Path, records: list, opener=open) -> None:
    with opener(path, "wt") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture
def messy(tmp_path) -> Path:
    d = tmp_path / "raw"
    d.mkdir()
    _jsonl(
        d / "a.jsonl",
        [
            {"text": PROSE[0] + " Mail jane.doe@example.com or call +1 415-555-0132."},
            '{"text": "broken json',  # line 2: malformed
            {"body": "no text field"},  # line 3: missing field
            {"text": PROSE[1]},
            {"text": PROSE[1]},  # exact duplicate
            {"text": PROSE[1].upper()},  # exact duplicate after case folding
            {"text": "tiny"},  # too short
            {"text": LONG},
            {"text": LONG.replace("sheep", "goats")},  # near duplicate (Jaccard > 0.8)
        ],
    )
    (d / "b.jsonl").write_bytes(
        b'{"text": "' + PROSE[2].encode() + b' Caf\xe9 on the corner."}\n'  # invalid UTF-8
    )
    (d / "empty.jsonl").write_text("")
    _jsonl(d / "c.jsonl.gz", [{"text": PROSE[3] + " Card 4111 1111 1111 1111."}], gzip.open)
    with zstandard.open(d / "d.jsonl.zst", "wt") as f:
        f.write(json.dumps({"text": PROSE[4] + " Server 192.168.0.17 answered."}) + "\n")
    pq.write_table(
        pa.table({"text": ["Parquet rows are documents too, one per row, here.", None]}),
        d / "e.parquet",
    )
    (d / "notes.md").write_text("# Notes\n\nMarkdown files are one document each, like this.\n")
    (d / "code.py").write_text("def add(a, b):\n    '''Add two numbers.'''\n    return a + b\n")
    return d


def _cfg(inputs, out, **kw) -> PrepareConfig:
    return PrepareConfig(inputs=tuple(map(str, inputs)), output=str(out), workers=2, **kw)


def _records(path: Path, split: str) -> list[np.ndarray]:
    if not read_manifest(path)["splits"][split]["shards"]:
        return []
    source, info = split_source(path, split)
    return [np.frombuffer(source[i], info["dtype"]).astype(np.int32) for i in range(len(source))]


def test_minhash_signatures_are_the_same_in_blocks_and_bounded_in_memory():
    # One batch of a long document's shingles: datasketch's (num_perm x shingles) uint64
    # array took 1.5 GiB for a 4.5 MB Chinese document; the blocks give the same signature.
    from datasketch import MinHash

    from bigjax.data.prepare import MINHASH_SCHEME, MINHASH_SEED, minhash_signature, shingles

    rng = np.random.default_rng(0)
    han = "".join(chr(0x4E00 + int(i)) for i in rng.integers(0, 40, 100_000))  # repeats too
    for text in ("", "a b", "one two three four five six", "the cat sat " * 3000, han):
        whole = MinHash(num_perm=128, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
        whole.update_batch([s.encode() for s in shingles(text)])
        assert np.array_equal(minhash_signature(text, 128, block=1000), whole.hashvalues)
    tracemalloc.start()
    minhash_signature(han, 128)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # One batch: 128 x 100,000 x 8 bytes = 98 MiB at least; blocks of 8,192: 8 MiB each,
    # plus the document's 100,000 one-character units (~8 MiB)
    assert peak < 40 * 2**20, peak


def test_an_empty_validation_split_is_warned_with_a_fraction_that_fills_it(tmp_path, capfd):
    # prepare said nothing; the first `bigjax train` on the dataset was the one to refuse it
    files = [STDLIB / "json" / name for name in ("decoder.py", "encoder.py", "scanner.py")]
    m = prepare(_cfg(files, tmp_path / "ds", val_fraction=0.0001))
    assert m["splits"]["validation"]["documents"] == 0
    err = capfd.readouterr().err
    warning = "warning: no document fell in the validation split (3 documents, --val-fraction "
    assert f"{warning}0.0001); bigjax train evaluates on it" in err, err
    assert "e.g. --val-fraction 0.5." in err, err
    # P(empty) = (1 - f)^3 by content hash: 1e-6 at 0.99, whatever Python's json/ holds
    m = prepare(_cfg(files, tmp_path / "ds", val_fraction=0.99))
    assert m["splits"]["validation"]["documents"] >= 1 and "warning" not in capfd.readouterr().err


def test_messy_inputs_are_cleaned_counted_and_scrubbed(messy, tmp_path):
    out = tmp_path / "ds"
    m = prepare(_cfg([messy / "*"], out, val_fraction=0.0001))
    assert m["skipped"] == {"empty_file": 1, "malformed_json": 1, "missing_field": 2}
    assert m["cleaning"] == {"repaired_utf8": 1}
    assert m["filtered"] == {"too_short": 1}
    assert m["dedup"] == {"exact": 2, "near": 1}
    assert m["pii"] == {
        "SECRET": 0,
        "EMAIL": 1,
        "IBAN": 0,
        "CREDIT_CARD": 1,
        "NATIONAL_ID": 0,
        "IPV6": 0,
        "IPV4": 1,
        "PHONE": 1,
    }
    assert m["documents_in"] == 13 and m["documents_out"] == 9
    assert {i["path"] for i in m["inputs"]} == {str(p) for p in messy.iterdir()}
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])
    report = (out / "report.md").read_text()
    assert "malformed_json | 1" in report and "EMAIL | 1" in report

    tok = tokenizers.load(out / "tokenizer")
    texts = [tok.decode(r) for r in _records(out, "train") + _records(out, "validation")]
    assert all(r[0] == tok.bos_id and r[-1] == tok.eos_id for r in _records(out, "train"))
    joined = "\n".join(texts)
    assert "<EMAIL>" in joined and "jane.doe" not in joined and "4111" not in joined
    # the stray Latin-1 byte is repaired as the Windows-1252 it almost always is
    assert "Café on the corner" in joined and "\ufffd" not in joined
    assert "    return a + b" in joined  # code indentation survives normalisation
    assert sum(m["splits"][s]["tokens"] for s in m["splits"]) == m["tokens_out"]


@pytest.mark.slow
def test_same_input_same_flags_byte_identical(tmp_path):
    inputs = [STDLIB / "json" / "*.py", STDLIB / "email" / "*.py"]
    digests = []
    for name in ("one", "two"):
        prepare(_cfg(inputs, tmp_path / name, tokenizer="bpe:600", val_fraction=0.1))
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append(
            {
                str(p.relative_to(tmp_path / name)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in files
            }
        )
    assert digests[0] == digests[1]
    assert any(k.endswith(".array_record") for k in digests[0])
    m = read_manifest(tmp_path / "one")
    assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["vocab_size"] == 600
    # BPE really compresses: fewer tokens than bytes
    assert m["tokens_out"] < 0.6 * m["bytes_in"]


def test_strict_stops_at_first_bad_record_naming_file_and_line(messy, tmp_path):
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed json"):
        prepare(_cfg([messy / "a.jsonl"], tmp_path / "ds", strict=True))
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.partial*"))


def test_missing_input_and_nothing_left_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare(_cfg([tmp_path / "nope" / "*.jsonl"], tmp_path / "ds"))
    _jsonl(tmp_path / "short.jsonl", [{"text": "hi"}, {"text": "yo"}])
    with pytest.raises(DataError, match="no documents left.*too_short"):
        prepare(_cfg([tmp_path / "short.jsonl"], tmp_path / "ds"))


def test_refuses_to_overwrite_a_foreign_directory(messy, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "important.txt").write_text("keep me")
    with pytest.raises(DataError, match="not written by bigjax prepare"):
        prepare(_cfg([messy / "notes.md"], tmp_path / "mine"))
    assert (tmp_path / "mine" / "important.txt").exists()


@pytest.mark.slow
def test_cli_prepare_and_exit_codes(messy, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "bigjax.cli", "prepare", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )

    r = run(
        "--input",
        str(messy / "*.jsonl*"),
        "--output",
        str(tmp_path / "ds"),
        "--no-near-dedup",
        "--min-chars",
        "10",
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "ds")
    assert m["dedup"]["near"] == 0 and m["options"]["quality"]["min_chars"] == 10
    assert "report.md" in r.stderr
    # progress: a bar over the files (their count is known before reading), then the docs
    assert re.search(r"prepare: clean, dedup, scrub \[#+\] 100% \d+/\d+ files", r.stderr)
    assert re.search(r"prepare: tokenize \[#+\] 100% [\d,]+/[\d,]+ docs", r.stderr)
    r = run("--input", str(messy / "a.jsonl"), "--output", str(tmp_path / "x"), "--strict")
    assert r.returncode == 2 and "a.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    r = run("--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "y"))
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.slow
def test_sentencepiece_and_hf_tokenizer_files(tmp_path):
    import sentencepiece as spm

    corpus = (STDLIB / "textwrap.py").read_text() + (STDLIB / "difflib.py").read_text()
    sp_prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_prefix=str(sp_prefix),
        vocab_size=400,
        pad_id=3,
        minloglevel=2,
    )
    bpe = tokenizers.train_bpe(corpus.splitlines(), 500)
    (tmp_path / "tokenizer.json").write_text(bpe.json_text)
    inputs = [STDLIB / "textwrap.py"]
    for spec, kind in [
        (f"sentencepiece:{sp_prefix}.model", "sentencepiece"),
        (f"hf:{tmp_path}", "hf"),
    ]:
        out = tmp_path / kind
        prepare(_cfg(inputs, out, tokenizer=spec, val_fraction=0.0001))
        tok = tokenizers.load(out / "tokenizer")
        assert tok.kind == kind
        (record,) = _records(out, "train")
        assert record[0] == tok.bos_id and record[-1] == tok.eos_id
        decoded = tok.decode(record[1:-1])
        # SentencePiece normalises whitespace runs: compare on words (the author's address in
        # the file's header has been scrubbed to <EMAIL>)
        expected = scrub(normalize((STDLIB / "textwrap.py").read_text()))[0]
        assert decoded.split()[:200] == expected.split()[:200]


def test_bad_tokenizer_spec_fails_before_any_work(messy, tmp_path):
    for spec, pattern in [
        ("bpe:abc", "vocabulary size"),
        ("foo", "use byte, bpe:VOCAB"),
        ("sentencepiece:/nope.model", "no such file"),
    ]:
        with pytest.raises((tokenizers.TokenizerError, FileNotFoundError), match=pattern):
            prepare(_cfg([messy / "a.jsonl"], tmp_path / "ds", tokenizer=spec))
        assert not list(tmp_path.glob(".ds.partial*")) and not (tmp_path / "ds").exists()


def test_a_tokenizer_file_that_does_not_load_fails_before_the_cleaning_pass(tmp_path, capfd):
    # it was read after the whole corpus was cleaned: a traceback from the parser, hours in
    cut = '{"version": "1.0", "model": {"type": "BPE"'
    (tmp_path / "cut.json").write_text(cut)
    (tmp_path / "bad.model").write_bytes(b"not a model proto")
    (tmp_path / "a.txt").write_text("A short document of ordinary prose for the run. " * 5)
    for spec, said in [
        (f"hf:{tmp_path / 'cut.json'}", "is not a hf tokenizer that loads (EOF while parsing"),
        (f"sentencepiece:{tmp_path / 'bad.model'}", "is not a sentencepiece tokenizer that"),
        (f"sentencepiece:{tmp_path / 'cut.json'}", "Give a SentencePiece .model file."),
    ]:
        with pytest.raises(tokenizers.TokenizerError, match=re.escape(said)):
            prepare(_cfg([tmp_path / "a.txt"], tmp_path / "ds", tokenizer=spec))
        assert "clean, dedup" not in capfd.readouterr().err
        assert not list(tmp_path.glob(".ds.partial*")) and not (tmp_path / "ds").exists()
