"""`bigjax convert RUN DST --with-tokenizer`: the run's tokenizer beside its weights, read by
transformers' AutoTokenizer with the ids bigjax gives the same text."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_config

from bigjax import convert, hf
from bigjax.cli import main
from bigjax.config import ConfigError
from bigjax.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    encode_prompt,
    train_bpe,
)

try:
    import transformers
except ImportError:  # the test extra has it; CI installs it (.ci/run)
    transformers = None
try:
    import torch
except ImportError:  # CI installs it (.ci/run); elsewhere the model test skips
    torch = None

IN_CI = os.environ.get("CI") == "true"  # where a missing package fails, not skips
needs_transformers = pytest.mark.skipif(
    transformers is None and not IN_CI, reason="needs transformers (pip install transformers)"
)
needs_torch = pytest.mark.skipif(
    (torch is None or transformers is None) and not IN_CI,
    reason="needs torch and transformers (pip install torch==2.13.0 transformers)",
)

# Bytes of every width, a special token's name written in the text (a prompt's special
# tokens become their ids, in bigjax as in transformers), whitespace runs, control bytes.
TEXTS = [
    "def f(x):\n    return x  # two  spaces",
    "naïve café, 日本語, emoji 🎉 and a tab\t",
    "before<|endoftext|>after <eos> <|bos|>",
    "\x00\x01\x7f trailing ",
    "",
]


@needs_torch
@pytest.mark.slow
def test_a_byte_run_exports_its_tokenizer_and_transformers_reads_the_same_ids(
    tiny_run, tmp_path, capsys
):
    out = tmp_path / "hf"
    assert main(["convert", str(tiny_run), str(out)]) == 0
    assert "add --with-tokenizer" in capsys.readouterr().out  # said, when not asked
    assert not (out / "tokenizer.json").exists()
    # Asked, into that export holding a user's stale tokenizer: the run's own replaces it.
    (out / "tokenizer.json").write_text("{}")
    (out / "README.md").write_text("mine")
    assert main(["convert", str(tiny_run), str(out), "--with-tokenizer"]) == 0
    assert (out / "README.md").read_text() == "mine"  # other files are still kept

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == encode_prompt(tok, text, add_bos=False), text
        assert hf_tok.decode(ids) == text  # byte-level: every text round-trips
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (256, 257, 258)
    assert hf_tok.model_max_length == 128  # the run's context

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (257, 258)
    prompt = hf_tok("import os\n", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    length = prompt["input_ids"].shape[1]
    assert length < generated.shape[1] <= length + 6  # fewer: it stopped at the run's EOS
    assert generated[0, :length].tolist() == prompt["input_ids"][0].tolist()


@needs_transformers
def test_a_bpe_tokenizer_and_its_chat_template_go_along_unchanged(tmp_path):
    texts = [t * 20 for t in ("the quick brown fox ", "jumps over the lazy dog ", "λx. x ")]
    tok = train_bpe(texts, 300)
    (tmp_path / "ds" / "tokenizer").mkdir(parents=True)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "ds" / "tokenizer" / "chat_template.jinja").write_text(template)
    cfg = tiny_config(data={"path": str(tmp_path / "ds")})
    out = tmp_path / "hf"
    out.mkdir()
    for name, text in convert.tokenizer_files(tok, cfg).items():
        (out / name).write_text(text, encoding="utf-8")

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in [*TEXTS, "the lazy fox <eos> jumps"]:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == encode_prompt(tok, text, add_bos=False), text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == "<user>hi"


def test_a_sentencepiece_tokenizer_is_refused_before_anything_is_written(tmp_path):
    cfg = tiny_config()
    with pytest.raises(hf.ConvertError, match="SentencePiece.*tokenizer.model"):
        convert.export_hf(cfg, {}, tmp_path / "hf", "float32", 10**9,
                          SentencePieceTokenizer(b""))  # fmt: skip
    assert not (tmp_path / "hf").exists()


def test_with_tokenizer_on_an_import_is_refused_naming_the_direction(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "run"), "--with-tokenizer"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--with-tokenizer is for an export" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_byte_alphabet_is_the_byte_level_pre_tokenizers():
    from tokenizers import pre_tokenizers

    from bigjax.data.tokenizer import byte_alphabet

    chars = byte_alphabet()
    assert len(set(chars)) == 256 and set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    assert chars[ord("A")] == "A" and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ"
    assert np.all(np.diff([ord(c) for c in chars if ord(c) >= 256]) == 1)  # in byte order


@pytest.mark.parametrize(
    "name, data, said",
    [
        ("chat_template.jinja", b"caf\xe9 {{ messages }}", "not UTF-8 text"),  # Latin-1
        ("tokenizer_config.json", b'{"chat_template": ', "not JSON"),
    ],
)
def test_a_chat_template_file_that_does_not_read_is_one_error_naming_it(name, data, said,
                                                                         tmp_path):  # fmt: skip
    # A user's file beside the dataset's tokenizer: serve and the export both read it.
    (tmp_path / "ds" / "tokenizer").mkdir(parents=True)
    (tmp_path / "ds" / "tokenizer" / name).write_bytes(data)
    cfg = tiny_config(data={"path": str(tmp_path / "ds")})
    with pytest.raises(ConfigError, match=f"{name} is {said}"):
        convert.tokenizer_files(ByteTokenizer(), cfg)


def test_the_byte_tokenizer_and_its_export_are_the_same_ids_and_others_are_not():
    # an export imported back keeps the byte tokenizer as a tokenizer.json: eval and a resume
    # on the built-in corpus must take it as the same (they refused it as another tokenizer)
    from bigjax.data.tokenizer import HFTokenizer, same_ids

    byte = ByteTokenizer()
    assert same_ids(byte, HFTokenizer(byte.hf_json())) and same_ids(byte, ByteTokenizer())
    assert not same_ids(byte, train_bpe(["some text " * 50], 300))
    assert not same_ids(byte, SentencePieceTokenizer(b"proto"))
