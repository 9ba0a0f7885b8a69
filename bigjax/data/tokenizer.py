"""Tokenizers behind one interface, saved inside a prepared dataset and loaded from it.

Every tokenizer has `bos_id`, `eos_id`, `pad_id`; a document is always encoded as
BOS + tokens + EOS (`encode_document`), and PAD only ever fills the end of a packed row (it has
loss weight 0). Tokenizers are saved as plain files (JSON, or a SentencePiece model proto):
loading one never runs code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bigjax.dirswap import staging_dir, swap_in
from bigjax.errors import BigjaxWarning, UsageError

CONFIG_FILE = "tokenizer_config.json"
IN_RUN = "tokenizer"  # a run's own copy of its tokenizer: RUN/tokenizer (`keep_in_run`)
BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "[CLS]", "<|endoftext|>")
EOS_CANDIDATES = ("<eos>", "</s>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<|endoftext|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class TokenizerError(UsageError, ValueError):
    """A tokenizer spec or file that cannot be used; the message says what to pass instead."""


class Tokenizer(Protocol):
    # Read-only: implementations are frozen dataclasses and class constants.
    @property
    def kind(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: np.ndarray | Sequence[int]) -> str: ...
    def piece(self, token_id: int) -> str: ...  # a token's own name ('<eos>', '▁the')
    def save(self, directory: Path) -> None: ...
    def hf_json(self) -> str: ...  # as a Hugging Face tokenizer.json (`convert` exports it)


def encode_document(tok: Tokenizer, text: str) -> np.ndarray:
    """BOS + tokens + EOS, as int32: the one way documents are framed."""
    return np.concatenate([[tok.bos_id], tok.encode(text), [tok.eos_id]]).astype(np.int32)


def special_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's BOS, EOS and PAD by name (what /tokenizer_info reports)."""
    out: dict[str, int] = {}
    for token_id in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
        out.setdefault(tokenizer.piece(int(token_id)), int(token_id))
    return out


def encode_prompt(tokenizer: Tokenizer, text: str, *, add_bos: bool) -> list[int]:
    """A prompt's ids, as `generate`, `serve` and `eval --tasks` read prompts: special tokens
    written out in the text (by their `piece` names) become their ids, as Hugging Face
    tokenizers read them; with `add_bos`, BOS first, as training framed every document."""
    specials = special_tokens(tokenizer)
    ids = [int(tokenizer.bos_id)] if add_bos else []
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    pos = 0
    for m in re.finditer(pattern, text) if pattern else ():
        ids += tokenizer.encode(text[pos : m.start()]).tolist() if m.start() > pos else []
        ids.append(specials[m.group()])
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:]).tolist()
    return ids


def _write_config(directory: Path, **fields: object) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(
        json.dumps(fields, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _fields_only(self: Any) -> dict[str, Any]:
    """Pickle state without the lazily built native tokenizer: workers rebuild their own."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _restore_fields(self: Any, state: dict[str, Any]) -> None:
    self.__dict__.update(state)


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; then BOS, EOS, PAD. Any byte string round-trips, so
    files that are not valid UTF-8 need no special case."""

    kind: str = "byte"
    vocab_size: int = 259
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    def encode(self, text: str) -> np.ndarray:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    @property
    def specials(self) -> dict[int, str]:
        return {self.bos_id: "<|bos|>", self.eos_id: "<|endoftext|>", self.pad_id: "<|pad|>"}

    def piece(self, token_id: int) -> str:
        if token_id >= self.vocab_size:  # a model's vocabulary may be padded past the tokenizer's
            return f"<|unused_{token_id}|>"
        return self.specials.get(token_id) or self.decode([token_id])

    def save(self, directory: Path) -> None:
        _write_config(directory, kind=self.kind)

    def hf_json(self) -> str:
        """The same ids as a `tokenizers` model: byte-level pre-tokenization (each byte one
        character of GPT-2's byte alphabet) and a BPE with no merges, so every byte stays its
        own token; BOS, EOS and PAD are special added tokens, matched in text as
        `encode_prompt` matches them."""
        vocab = {char: byte for byte, char in enumerate(byte_alphabet())}
        added = [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, name in sorted(self.specials.items())
        ]  # fmt: skip
        byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return json.dumps({
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", **byte_level},
            "post_processor": None, "decoder": {"type": "ByteLevel", **byte_level},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []},
        }, ensure_ascii=False, indent=1)  # fmt: skip


def same_ids(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give every text the same ids: equal, or one tokenizer.json (the
    byte tokenizer and its export, imported back as a Hugging Face one)."""
    if a == b:
        return True
    try:
        return a.hf_json() == b.hf_json()
    except TokenizerError:  # SentencePiece has no tokenizer.json
        return False


def byte_alphabet() -> list[str]:
    """GPT-2's printable character for each byte 0..255 (the byte-level pre-tokenizer's): bytes
    that print stand for themselves, the others take the code points from 256 up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face `tokenizers` model, held as its tokenizer.json text."""

    json_text: str
    kind: str = "hf"

    @functools.cached_property
    def _tok(self) -> Any:  # tokenizers.Tokenizer, imported lazily
        from tokenizers import Tokenizer as HFTok

        return HFTok.from_str(self.json_text)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special(self, candidates: tuple[str, ...]) -> int | None:
        for token in candidates:
            index = self._tok.token_to_id(token)
            if index is not None:
                return index
        return None

    @property
    def bos_id(self) -> int:
        found = self._special(BOS_CANDIDATES)
        return self.eos_id if found is None else found

    @property
    def eos_id(self) -> int:
        found = self._special(EOS_CANDIDATES)
        if found is None:
            raise TokenizerError(
                f"tokenizer has none of the end-of-text tokens {EOS_CANDIDATES}; add one "
                "(tokenizer.add_special_tokens) and save it again."
            )
        return found

    @property
    def pad_id(self) -> int:
        found = self._special(PAD_CANDIDATES)
        return self.eos_id if found is None else found  # padding has weight 0: any id works

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return str(self._tok.id_to_token(token_id))

    def save(self, directory: Path) -> None:
        _write_config(directory, kind=self.kind)
        (directory / "tokenizer.json").write_text(self.json_text, encoding="utf-8")

    def hf_json(self) -> str:
        return self.json_text

    __getstate__ = _fields_only
    __setstate__ = _restore_fields


@dataclasses.dataclass(frozen=True)
class SentencePieceTokenizer:
    """A SentencePiece model, held as its serialized model proto."""

    model_proto: bytes
    kind: str = "sentencepiece"

    @functools.cached_property
    def _sp(self) -> Any:  # sentencepiece.SentencePieceProcessor, imported lazily
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_proto=self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        if self._sp.eos_id() < 0:
            raise TokenizerError(
                "the SentencePiece model has no EOS piece; train it with eos_id>=0."
            )
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(token_id))

    def save(self, directory: Path) -> None:
        _write_config(directory, kind=self.kind)
        (directory / "tokenizer.model").write_bytes(self.model_proto)

    def hf_json(self) -> str:
        # Hugging Face reads a SentencePiece model through a model family's tokenizer class,
        # whose own conventions (a BOS added, a leading space) would change the ids.
        raise TokenizerError(
            "a SentencePiece tokenizer has no tokenizer.json of the same ids; copy "
            "tokenizer.model from the dataset's tokenizer/ folder and give the export the "
            "tokenizer class of its model family."
        )

    __getstate__ = _fields_only
    __setstate__ = _restore_fields


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) trained on `texts`; <pad>, <bos>, <eos>
    get ids 0, 1, 2."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok.to_str())


def parse_spec(spec: str) -> tuple[str, str]:
    """Checks a `--tokenizer` spec without building anything: (kind, argument)."""
    kind, _, arg = spec.partition(":")
    if kind == "byte" and not arg:
        return kind, arg
    if kind == "bpe":
        if not arg.isdigit() or int(arg) < 300:
            raise TokenizerError(
                f"--tokenizer {spec}: give a vocabulary size >= 300, e.g. bpe:32000."
            )
        return kind, arg
    if kind in ("sentencepiece", "hf"):
        path = Path(arg)
        if kind == "hf" and path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {spec}: no such file {str(path)!r}.")
        return kind, str(path)
    raise TokenizerError(
        f"--tokenizer {spec!r}: use byte, bpe:VOCAB, sentencepiece:PATH or hf:PATH."
    )


def check_spec(spec: str) -> None:
    """`parse_spec`, and for a tokenizer file, that it loads and has the ids a dataset records
    (vocabulary, EOS, BOS, PAD): prepare checks before its cleaning pass, not after it."""
    kind, path = parse_spec(spec)
    if kind not in ("sentencepiece", "hf"):
        return
    try:
        tok = from_spec(spec, lambda: ())
        _ = (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id)
    except TokenizerError as e:
        raise TokenizerError(f"--tokenizer {spec}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the parsers' own errors: `tokenizers` raises Exception
        said = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TokenizerError(
            f"--tokenizer {spec}: {path} is not a {kind} tokenizer that loads ({said}). Give "
            + ("a SentencePiece .model file." if kind == "sentencepiece" else
               "a tokenizer.json that Hugging Face tokenizers saved (or its directory).")
        ) from None  # fmt: skip


def from_spec(spec: str, training_texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """`byte`, `bpe:VOCAB` (trained on `training_texts()`), `sentencepiece:PATH`, `hf:PATH`."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(training_texts(), int(arg))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(Path(arg).read_bytes())
    return HFTokenizer(Path(arg).read_text(encoding="utf-8"))


def load(directory: Path) -> Tokenizer:
    """The tokenizer saved in a prepared dataset's `tokenizer/` directory."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no tokenizer in {directory}: expected {CONFIG_FILE}.")
    kind = json.loads(config_path.read_text(encoding="utf-8"))["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer((directory / "tokenizer.json").read_text(encoding="utf-8"))
    if kind == "sentencepiece":
        return SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
    raise TokenizerError(f"{config_path}: unknown tokenizer kind {kind!r}.")


TOKENIZERS = {"byte": ByteTokenizer}


def in_run(workdir: Path) -> Tokenizer | None:
    """The tokenizer a run kept (`keep_in_run`), None for a run from before that or an
    imported model that came without one; a damaged copy is a TokenizerError naming it."""
    kept = workdir / IN_RUN
    if not kept.exists():
        return None
    try:
        return load(kept)
    except (OSError, ValueError, KeyError) as e:  # TokenizerError is a ValueError
        raise TokenizerError(
            f"{kept}: the run's copy of its tokenizer does not load ({type(e).__name__}: {e}); "
            "restore it, or delete the folder to keep the data's tokenizer again."
        ) from None


def keep_in_run(
    workdir: Path,
    tokenizer: Tokenizer,
    *,
    write: bool,
    init_from: str,
    resuming: bool,
    teacher: str = "",
) -> None:
    """The run's own copy of its tokenizer, `RUN/tokenizer` (saved as a dataset saves it), by
    the process that `write`s: what the tools read its text with, whether or not the dataset
    is still there. A resume whose data now has another tokenizer (the dataset prepared again,
    or another `data.path`) is refused: its ids mean other text. With no checkpoint left to
    resume (`resuming` false: they were deleted to start the run afresh) the copy is replaced.
    A new run from another's weights (`init_from`) whose tokenizer is not its data's is
    warned about; a distillation `teacher` that kept another tokenizer is refused: its
    distributions, matched id by id, are over other text."""
    theirs = in_run(Path(teacher)) if teacher else None
    if theirs is not None and not same_ids(theirs, tokenizer):
        raise TokenizerError(
            f"distill.teacher: {other_ids(Path(teacher), theirs, tokenizer)} Distillation "
            f"matches the two models' distributions id by id: use data prepared with "
            f"{prepare_with(Path(teacher), theirs)}, or a teacher trained on this data's "
            "tokenizer."
        )
    kept = in_run(workdir)
    if kept is not None and not same_ids(kept, tokenizer):
        if resuming:
            raise TokenizerError(
                f"{other_ids(workdir, kept, tokenizer)} The dataset was prepared again with "
                "another tokenizer, or data.path names another dataset. Start a new run from "
                f"this one (checkpoint.init_from), or use data prepared with "
                f"{prepare_with(workdir, kept)}."
            )
        warnings.warn(f"{workdir / IN_RUN}: replaced by this run's {tokenizer.kind} tokenizer "
                      f"of {tokenizer.vocab_size} ids (it kept a {kept.kind} one of "
                      f"{kept.vocab_size}): no checkpoint is left to resume, the run starts "
                      "afresh.", BigjaxWarning, stacklevel=2)  # fmt: skip
        kept = None
    if kept is not None or not write:
        return
    save_in_run(workdir, tokenizer)
    source = (
        Path(init_from) if (Path(init_from) / "checkpoints").is_dir() else Path(init_from).parent
    )
    theirs = in_run(source) if init_from else None
    if theirs is not None and not same_ids(theirs, tokenizer):
        warnings.warn(f"checkpoint.init_from: {other_ids(source, theirs, tokenizer)} Use data "
                      f"prepared with {prepare_with(source, theirs)}.", BigjaxWarning,
                      stacklevel=2)  # fmt: skip


def save_in_run(workdir: Path, tokenizer: Tokenizer, chat_template: str | None = None) -> None:
    """`RUN/tokenizer` (with the model's chat template, where an import brings one), written
    whole beside it and swapped in: a kill leaves none or all of it (and a staging folder the
    next save removes)."""
    staged = staging_dir(workdir / IN_RUN)
    tokenizer.save(staged)
    if chat_template is not None:
        (staged / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    swap_in(staged, workdir / IN_RUN)


def other_ids(run: Path, theirs: Tokenizer, ours: Tokenizer) -> str:
    return (f"{run} was trained with a {theirs.kind} tokenizer of {theirs.vocab_size} ids (kept "
            f"in {run / IN_RUN}); this run's data has a {ours.kind} one of {ours.vocab_size}: "
            "the same ids mean other text.")  # fmt: skip


def prepare_with(run: Path, tokenizer: Tokenizer) -> str:
    """The `bigjax prepare` flag that makes data with the tokenizer `run` kept."""
    files = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}
    if tokenizer.kind not in files:
        return f"--tokenizer {tokenizer.kind}"
    return f"--tokenizer {tokenizer.kind}:{run / IN_RUN / files[tokenizer.kind]}"
