"""bigjax under a locale that is not UTF-8 (a Latin-1 terminal): the files it writes and reads
are UTF-8 whatever the locale, and what it prints that the terminal cannot show is escaped."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bigjax.data import tokenizer

ROOT = Path(__file__).resolve().parents[1]
NOT_LATIN1 = "Ünïcode ĀĒĪ 漢字"  # Ü and ï are Latin-1; Ā and 漢 are not


@pytest.fixture(scope="module")
def latin1_env(tmp_path_factory):
    """The environment of a process whose locale is ISO-8859-1, compiled for the test (most
    machines ship only C.UTF-8): Python then reads and writes text files in Latin-1 unless
    told otherwise."""
    if shutil.which("localedef") is None:
        pytest.skip("needs localedef (glibc's locale compiler) to make a Latin-1 locale")
    where = tmp_path_factory.mktemp("locales")
    name = where / "en_US.ISO-8859-1"
    made = subprocess.run(
        ["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(name)], capture_output=True, text=True
    )
    if not name.is_dir():
        pytest.skip(f"localedef could not make en_US.ISO-8859-1: {made.stderr[-300:]}")
    env = {**os.environ, "LOCPATH": str(where), "LANG": "en_US.ISO-8859-1",
           "LC_ALL": "en_US.ISO-8859-1", "PYTHONUTF8": "0"}  # fmt: skip
    probe = [sys.executable, "-c", "import locale; print(locale.getpreferredencoding())"]
    encoding = subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip()
    assert encoding == "ISO-8859-1", encoding  # else this test would prove nothing
    return env


@pytest.mark.slow
def test_a_bpe_dataset_prepared_in_latin1_reads_back_as_written(tmp_path, latin1_env):
    # Byte-level BPE pieces hold characters outside Latin-1 (Ġ, Ā): tokenizer.json was
    # written in the locale's encoding, a UnicodeEncodeError traceback after the whole
    # prepare had run (and another machine would have read it as UTF-8)
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = (
        f"{NOT_LATIN1} line {i}: rivers, gardens and mountains ({i * 7}).\n" for i in range(300)
    )
    (raw / "a.txt").write_text("".join(lines), encoding="utf-8")
    cmd = [sys.executable, "-m", "bigjax.cli", "prepare", "--input", str(raw), "--workers", "1",
           "--no-quality", "--output", str(tmp_path / "ds"), "--tokenizer", "bpe:300"]  # fmt: skip
    r = subprocess.run(cmd, env=latin1_env, cwd=ROOT, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode("latin-1")[-2000:]
    tok = tokenizer.load(tmp_path / "ds" / "tokenizer")  # here, in UTF-8
    assert tok.kind == "hf"
    assert tok.decode(tok.encode(NOT_LATIN1)) == NOT_LATIN1


def test_what_a_latin1_terminal_cannot_show_is_escaped_not_dropped(latin1_env):
    # The CLI's stdout swallowed the UnicodeEncodeError as a closed stream: generated text
    # outside Latin-1, and everything printed after it, vanished without a word
    code = ("import sys\nfrom bigjax.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print({ascii(NOT_LATIN1)}, 'and after')\n")  # fmt: skip
    # ascii(): the code is ASCII, as argv is read in Latin-1 there
    r = subprocess.run([sys.executable, "-c", code], env=latin1_env, cwd=ROOT,
                       capture_output=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode("latin-1")[-2000:]
    shown = r.stdout.decode("latin-1").splitlines()[-1]
    assert shown == "Ünïcode \\u0100\\u0112\\u012a \\u6f22\\u5b57 and after"
