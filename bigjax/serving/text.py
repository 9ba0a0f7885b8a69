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
    never include a stop string or the start of one."""

    tokenizer: Tokenizer
    stop: Sequence[str] = ()
    prefix: str = ""  # text before the first generated token (echo), not searched for stops
    ids: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of the generated text already handed out
    stopped: bool = False

    def add(self, token_id: int) -> str:
        """Adds one generated id; returns the text that may be sent now ('' if none)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        hit = self._first_stop(text)
        if hit is not None:
            self.stopped = True
            return self._take(text[:hit])
        end = len(text)
        while end > self.sent and text[end - 1] == REPLACEMENT:  # a character still arriving
            end -= 1
        # hold back what could be the start of a stop string
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(text[: max(self.sent, end - hold)])

    def flush(self) -> str:
        """The rest of the text at the end of the sequence."""
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.ids))

    def text(self) -> str:
        """Everything handed out so far."""
        return self.tokenizer.decode(self.ids)[: self.sent] if self.ids else ""

    def _take(self, text: str) -> str:
        piece = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return piece

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None
