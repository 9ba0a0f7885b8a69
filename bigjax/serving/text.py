"""From the engine's token ids to the text a client reads: incremental detokenization that
never splits a character, stop strings (the text ends before the first one, as OpenAI's API
does), and token strings for the log-probability fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from bigjax.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    """One token as text; a token that is not text on its own (one byte of a multi-byte
    character) is written `bytes:\\xe2\\x82` as vLLM does, so no two ids share a string."""
    text = tokenizer.decode([token_id])
    if not text:  # a special token decodes to nothing: its own name
        return str(tokenizer.piece(token_id))
    raw = _token_bytes(tokenizer, token_id)
    return f"bytes:{_escaped(raw)}" if REPLACEMENT in text and raw else text


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes of one token (chat logprobs' `bytes` field)."""
    raw = _token_bytes(tokenizer, token_id)
    return list(raw if raw is not None else tokenizer.decode([token_id]).encode())


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes | None:
    if getattr(tokenizer, "kind", "") == "byte":
        return bytes([token_id]) if token_id < 256 else b""
    return None


def _escaped(raw: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in raw)


@dataclasses.dataclass
class Detokenizer:
    """Text of a growing list of ids, handed out in pieces that end on whole characters and
    never include a stop string or the start of one.

    Incremental, as vLLM's and TGI's detokenizers are: each new id decodes a short window (the
    ids since the text last ended on a whole character, after the ones before them, which
    give tokenizers whose decode looks at the previous token their context), not the whole
    list, so n tokens cost O(n) decoding instead of O(n^2): decoding everything at every
    token averaged 0.72 ms a token over 8,192 BPE tokens, the window 5 µs (docs/benchmarks.md).
    """

    tokenizer: Tokenizer
    stop: Sequence[str] = ()
    prefix: str = ""  # text before the first generated token (echo), not searched for stops
    ids: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of the generated text already handed out
    stopped: bool = False
    decoded: str = ""  # the text of ids[:read], ending on a whole character
    start: int = 0  # the window decoded at each id: ids[start:], its text past ids[start:read]
    read: int = 0
    pending: str = ""  # the window's text while a character in it is still arriving

    def add(self, token_id: int) -> str:
        """Adds one generated id; returns the text that may be sent now ('' if none)."""
        self.ids.append(token_id)
        self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the end of the sequence (up to a stop string in it)."""
        if self.stopped:
            return ""
        self._decode(final=True)
        return self._release(final=True)

    def text(self) -> str:
        """Everything handed out so far."""
        return self.decoded[: self.sent]

    def length(self) -> int:
        """Characters in the text of all ids so far, less a character still arriving (what
        `len(decode(ids).rstrip(REPLACEMENT))` counts): a token's `text_offset`."""
        return len(self.decoded) + len(self.pending.rstrip(REPLACEMENT))

    def _decode(self, final: bool) -> None:
        """Moves the window's new text into `decoded` once it ends on a whole character (a
        character still arriving decodes to a trailing replacement character); at the end
        of the sequence whatever it holds."""
        before = self.tokenizer.decode(self.ids[self.start : self.read])
        after = self.tokenizer.decode(self.ids[self.start :])
        self.pending = after[len(before) :]
        if final or (len(after) > len(before) and not after.endswith(REPLACEMENT)):
            self.decoded, self.pending = self.decoded + self.pending, ""
            self.start, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        """The decoded text not yet sent, up to the first stop string, holding back what
        could be the start of one (unless the sequence has ended)."""
        hit = self._first_stop()
        if hit is not None:
            self.stopped = True
            return self._take(hit)
        hold = 0 if final else max((len(s) - 1 for s in self.stop), default=0)
        return self._take(len(self.decoded) - hold)

    def _take(self, end: int) -> str:
        end = max(self.sent, end)  # what is held back may reach into what was sent
        piece, self.sent = self.decoded[self.sent : end], end
        return piece

    def _first_stop(self) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.decoded.find(s, start)) >= 0]
        return min(hits) if hits else None
