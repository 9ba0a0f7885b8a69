"""The text a client reads: incremental detokenization against decoding everything at once,
for every tokenizer kind, with characters split across tokens, invalid bytes and stops."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bigjax.data import tokenizer as tk
from bigjax.serving.text import Detokenizer

TEXT = "naïve café — 日本語の文 🙂👍🏽 Ελληνικά\nprint(f'{x!r}')\n\n  indented\tend"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    import sentencepiece as spm

    corpus = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
    corpus.append(TEXT)
    sp = tmp_path_factory.mktemp("sp") / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(sp), vocab_size=400, pad_id=3,
        minloglevel=2, byte_fallback=True, character_coverage=1.0,
    )  # fmt: skip
    return [tk.ByteTokenizer(), tk.train_bpe(corpus, 320),
            tk.SentencePieceTokenizer(Path(f"{sp}.model").read_bytes())]  # fmt: skip


class Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded_ids = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids)


def _streamed(tokenizer, ids, stop=()):
    """Every piece `add` and `flush` hand out, and the detokenizer."""
    det = Detokenizer(tokenizer, stop)
    pieces = [det.add(int(i)) for i in ids]
    return [*pieces, det.flush()], det


def _sequences(tokenizer, rng):
    text_ids = [int(i) for i in tokenizer.encode(TEXT * 3)]
    random_ids = rng.integers(0, tokenizer.vocab_size, 300).tolist()  # invalid bytes too
    return [text_ids, random_ids, text_ids[::2]]  # every other id: characters cut apart


def test_pieces_join_to_the_whole_decode_and_end_on_whole_characters(tokenizers):
    rng = np.random.default_rng(0)
    for tok in tokenizers:
        for ids in _sequences(tok, rng):
            whole = tok.decode(ids)
            pieces, det = _streamed(tok, ids)
            assert "".join(pieces) == whole == det.text(), tok.kind
            sent = ""
            for i, piece in enumerate(pieces[:-1]):
                sent += piece
                # nothing of a character still arriving is sent: what was sent is what the
                # first i + 1 ids decode to, less a tail of replacement characters
                assert tok.decode(ids[: i + 1]).startswith(sent), (tok.kind, i)
                assert whole.startswith(sent)


def test_the_text_ends_before_the_first_stop_string(tokenizers):
    rng = np.random.default_rng(1)
    for tok in tokenizers:
        for ids in _sequences(tok, rng):
            whole = tok.decode(ids)
            for _ in range(8):
                at = int(rng.integers(0, max(len(whole) - 4, 1)))
                stops = (whole[at : at + int(rng.integers(1, 5))], "\x00never\x00")
                cut = min(i for s in stops if (i := whole.find(s)) >= 0)
                pieces, det = _streamed(tok, ids, stops)
                assert "".join(pieces) == whole[:cut] == det.text(), (tok.kind, stops)
                assert det.stopped


def test_decoding_is_linear_in_the_length(tokenizers):
    # Decoding the whole list at every token costs n^2 / 2 ids (2 million here); the
    # window costs a few ids a token. The bound (8 per token) leaves room for the windows
    # that wait for a character's last byte.
    for tok in tokenizers:
        ids = [int(i) for i in tok.encode(TEXT * 40)][:2000]
        counting = Counting(tok)
        pieces, _ = _streamed(counting, ids, stop=("\x00never",))
        assert "".join(pieces) == tok.decode(ids)
        assert counting.decoded_ids <= 8 * len(ids), (tok.kind, counting.decoded_ids)


class Pieces:
    """A tokenizer whose ids stand for byte strings, several characters each (as BPE merges)."""

    kind = "pieces"

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_a_stop_string_before_a_cut_character_at_the_end_is_honoured():
    # The last token ends inside a character, so its text is held until the sequence ends;
    # the stop string before that cut must still end the text there.
    tok = Pieces({0: b"ab", 1: b"cSTOP\xe2\x82"})
    pieces, det = _streamed(tok, [0, 1], stop=("STOP",))
    assert "".join(pieces) == "abc" == det.text() and det.stopped
    pieces, det = _streamed(tok, [0, 1])  # no stop: the cut character as the decoder writes it
    assert "".join(pieces) == "abcSTOP\ufffd" == det.text()


def test_text_offsets_are_where_each_token_starts(tokenizers):
    # a completion's `text_offset` with echo and logprobs, read as a stream reads it (in
    # chunks as tokens arrive): token i starts where the text of the tokens before it ends
    from bigjax.serving.bodies import Choice

    rng = np.random.default_rng(2)
    for tok in tokenizers:
        for ids in _sequences(tok, rng):
            want = [len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
            choice = Choice(index=0, seq=None, det=None, echo=True, ids=list(ids))
            got = []
            for end in range(0, len(ids) + 7, 7):
                got += choice.text_offsets(tok, len(got), min(end, len(ids)))
            assert got == want, tok.kind
        counting = Counting(tok)
        ids = [int(i) for i in tok.encode(TEXT * 40)][:2000]
        Choice(index=0, seq=None, det=None, echo=True, ids=ids).text_offsets(counting, 0, len(ids))
        assert counting.decoded_ids <= 8 * len(ids), (tok.kind, counting.decoded_ids)


def test_a_chat_template_jinja_cannot_parse_is_refused_at_start(tmp_path):
    # it served, and then every chat request was a 400 blaming the client's messages
    from bigjax.config import ConfigError
    from bigjax.serving import chat
    from bigjax.serving.server import _chat_template

    assert chat.syntax_error(chat.PLAIN) is None
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content ")
    with pytest.raises(ConfigError, match=r"bad.jinja has a Jinja syntax error \(line 2: unexp"):
        _chat_template(str(bad), None)
    bad.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ConfigError, match="bad.jinja: not UTF-8 text"):
        _chat_template(str(bad), None)
    tokenizer_dir = tmp_path / "tokenizer"  # a run's own template, as Hugging Face saves it
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text('{"chat_template": "{% if %}"}')
    with pytest.raises(ConfigError, match="the chat template in .*tokenizer has a Jinja syntax"):
        _chat_template("", tokenizer_dir)
    (tokenizer_dir / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert _chat_template("", tokenizer_dir) == "{{ messages }}"


@pytest.mark.parametrize("reason,status", [("stop", "completed"), ("length", "incomplete")])
def test_a_response_says_why_it_ended_in_openais_own_types(reason, status):
    """The Responses API's object and event stream for a reply the model ended (completed)
    and one its budget ended (incomplete), validated against the openai package's pydantic
    types (validated, not constructed: a missing required field fails), a character split
    across tokens included."""
    import asyncio

    import pydantic
    from openai.types.responses import Response, ResponseStreamEvent

    from bigjax.serving import bodies, protocol, responses
    from bigjax.serving.engine import Params, Sequence_, Token

    tok = tk.ByteTokenizer()
    req = protocol.ResponsesRequest.model_validate({"input": "hi", "max_output_tokens": 8})
    head = responses.response_head(req, "run", 0)
    seq = Sequence_([1, 2], Params(max_tokens=8), lambda _: None)
    choice = bodies.Choice(0, seq, Detokenizer(tok), echo=False)
    ids = list("héllo".encode())  # é is two bytes: two tokens, one character

    async def pieces():
        for i, token_id in enumerate(ids):
            choice.token(Token(token_id, -1.0, ()))
            piece = choice.det.add(token_id)
            if i == len(ids) - 1:
                choice.finish_reason = reason
                piece += choice.det.flush()
            yield choice, piece

    async def stream():
        usage = responses.response_usage(2, len(ids))
        return "".join([chunk async for chunk in responses.stream(pieces(), head, lambda: usage)])

    lines = [line[6:] for line in asyncio.run(stream()).splitlines() if line.startswith("data: ")]
    events = [pydantic.TypeAdapter(ResponseStreamEvent).validate_json(line) for line in lines]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "héllo"
    last = events[-1]
    assert last.type == f"response.{status}" and last.response.status == status
    assert (last.response.incomplete_details is None) == (reason == "stop")
    whole = Response.model_validate(responses.body(head, choice, responses.response_usage(2, 6)))
    assert whole.status == status and whole.output_text == "héllo"
    assert whole.usage.total_tokens == 8 and whole.id == head["id"]
