"""A prepared dataset damaged on disk after `bigjax prepare` wrote it (a flipped bit, a cut
copy, an edited manifest): every read either returns what prepare wrote or stops with one line
naming the damaged file and the fix; never a traceback, never silently other data."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bigjax.data.dataset import DamagedDatasetError, load_tokenizer, split_source
from bigjax.data.prepare import PrepareConfig, prepare

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
NAMES = (
    "textwrap",
    "shlex",
    "fnmatch",
    "glob",
    "bisect",
    "heapq",
    "colorsys",
    "keyword",
    "base64",
    "calendar",
    "copy",
    "csv",
    "difflib",
    "getopt",
    "gettext",
    "netrc",
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    files = [str(STDLIB / f"{n}.py") for n in NAMES]
    prepare(PrepareConfig(inputs=tuple(files), output=str(out), workers=1,
                          tokenizer="bpe:300", val_fraction=0.3))  # fmt: skip
    return out


def _copy(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "ds"))


def _all_records(ds: Path, split: str = "train") -> list[bytes]:
    source, _ = split_source(ds, split)
    return [source[i] for i in range(len(source))]


def test_every_flipped_bit_in_a_shard_reads_back_the_same_or_names_the_file(prepared, tmp_path):
    ds = _copy(prepared, tmp_path)
    shard = ds / json.loads((ds / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    original, expected = shard.read_bytes(), _all_records(ds)
    used = max(i for i, b in enumerate(original) if b)  # the rest is the block's zero padding
    named = 0
    for offset in range(0, used, max(used // 40, 1)):
        flipped = bytearray(original)
        flipped[offset] ^= 0x10
        shard.write_bytes(flipped)
        try:
            got = _all_records(ds)
        except DamagedDatasetError as e:
            assert str(shard) in str(e) and "bigjax prepare" in str(e)
            named += 1
            continue
        assert got == expected, f"a flip at byte {offset} read back other data, silently"
    assert named >= 10  # the chunks' data: most flips land there (the rest: headers, padding)
    shard.write_bytes(original[:40_000])  # a cut copy: refused when the split is opened
    with pytest.raises(DamagedDatasetError, match="train-00000.array_record is damaged"):
        split_source(ds, "train")


def _edited(manifest: bytes, change) -> bytes:
    record = json.loads(manifest)
    change(record)
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: b"\xff" + m[1:],  # not UTF-8
        lambda m: m[: len(m) // 2],  # cut
        lambda m: m.replace(b'"splits"', b'"splitz"'),
        lambda m: m.replace(b'"train-00000', b'"../train-00000'),  # a path out of the dataset
        lambda m: _edited(m, lambda d: d["splits"]["train"].update(shards=[".."])),
        lambda m: m.replace(b'"<u2"', b'"<q9"'),
        lambda m: _edited(m, lambda d: d["tokenizer"].update(sha256=["not", "a", "mapping"])),
        lambda m: _edited(m, lambda d: d["splits"]["train"].update(fingerprints=[1])),
        lambda m: _edited(m, lambda d: d["splits"]["train"].update(fingerprints=["1:a", "2:b"])),
        lambda m: b"[]",
    ],
    ids=["utf8", "cut", "key", "path", "parent", "dtype", "hashes", "prints", "count", "list"],
)
def test_a_damaged_manifest_is_one_error_naming_it(prepared, tmp_path, edit):
    ds = _copy(prepared, tmp_path)
    manifest = ds / "manifest.json"
    manifest.write_bytes(edit(manifest.read_bytes()))
    with pytest.raises(DamagedDatasetError, match="manifest.json is damaged"):
        split_source(ds, "train")


def test_a_changed_tokenizer_file_is_refused_by_train_in_one_line(prepared, tmp_path):
    ds = _copy(prepared, tmp_path)
    # a file the user adds beside the tokenizer (a chat template for serving) is no damage
    (ds / "tokenizer" / "chat_template.jinja").write_text("{{ messages }}")
    assert load_tokenizer(ds).vocab_size == 300  # as prepared: read
    tok = ds / "tokenizer" / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] ^= 0x01  # one merge or vocabulary entry changes: still valid JSON
    tok.write_bytes(data)
    with pytest.raises(DamagedDatasetError, match="tokenizer.json differ"):
        load_tokenizer(ds)
    cmd = [sys.executable, "-m", "bigjax.cli", "train", "--config", "configs/lm_tiny.py",
           "--workdir", str(tmp_path / "run"), f"--config.data.path={ds}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.count("\n") == 1 and "tokenizer.json differ" in run.stderr


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A dataset of several shards a split (shards of ~4k tokens)."""
    out = tmp_path_factory.mktemp("sharded") / "ds"
    files = [str(STDLIB / f"{n}.py") for n in NAMES]
    prepare(PrepareConfig(inputs=tuple(files), output=str(out), workers=1, tokenizer="bpe:300",
                          val_fraction=0.3, shard_tokens=4000))  # fmt: skip
    return out


def test_a_shard_swapped_or_copied_in_is_named_never_read_as_its_place(sharded, prepared, tmp_path):
    ds = _copy(sharded, tmp_path)
    train = json.loads((ds / "manifest.json").read_text())["splits"]["train"]
    assert len(train["shards"]) >= 3 and len(train["fingerprints"]) == len(train["shards"])
    # ArrayRecord pads shards to whole blocks: sizes alike, so a swap is not told by size
    a, b = (ds / s for s in train["shards"][:2])
    assert a.stat().st_size == b.stat().st_size
    expected = _all_records(ds)
    a.rename(tmp_path / "a")  # two shards swapped by hand: the same records, in another order
    b.rename(a)
    (tmp_path / "a").rename(b)
    with pytest.raises(DamagedDatasetError, match="train-00000.array_record is not the shard"):
        split_source(ds, "train")
    b.rename(tmp_path / "b")  # put back: read as prepared
    a.rename(b)
    (tmp_path / "b").rename(a)
    assert _all_records(ds) == expected
    # a validation shard copied over a train shard; the same shard of another preparation
    val = ds / json.loads((ds / "manifest.json").read_text())["splits"]["validation"]["shards"][0]
    shutil.copy(val, b)
    with pytest.raises(DamagedDatasetError, match="train-00001.array_record is not the shard"):
        split_source(ds, "train")
    shutil.copy(sharded / b.name, b)
    shutil.copy(prepared / a.name, a)
    with pytest.raises(DamagedDatasetError, match="train-00000.array_record is not the shard"):
        split_source(ds, "train")
    shutil.copy(sharded / a.name, a)
    # a dataset prepared before the fingerprints were recorded reads unchecked, as before
    manifest = ds / "manifest.json"
    manifest.write_bytes(_edited(manifest.read_bytes(),
                                 lambda d: d["splits"]["train"].pop("fingerprints")))  # fmt: skip
    assert _all_records(ds) == expected
