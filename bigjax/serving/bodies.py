"""Response bodies in OpenAI's formats: a choice as it accumulates (its text and the per-token
log-probabilities), whole or as stream chunks. Completions use the legacy logprobs object
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), chat the `content` list."""

from __future__ import annotations

import dataclasses
from typing import Any

from bigjax.serving import text
from bigjax.serving.engine import PromptScored, Sequence_, Token

Top = tuple[tuple[int, float], ...]


@dataclasses.dataclass
class Choice:
    """One sequence's output as it arrives. With echo, the prompt's tokens come first in the
    per-token lists (the first with no log-probability: nothing predicts it)."""

    index: int
    seq: Sequence_
    det: text.Detokenizer
    echo: bool
    generated: int = 0
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float | None] = dataclasses.field(default_factory=list)
    tops: list[Top | None] = dataclasses.field(default_factory=list)
    offsets: list[int] = dataclasses.field(default_factory=list)
    read_to: text.Detokenizer | None = None  # the text of ids[:len(offsets) - 1]
    streamed: int = 0  # per-token entries already sent in stream chunks
    finish_reason: str | None = None
    error: str = ""
    last_at: float = 0.0

    def prompt_scored(self, scores: PromptScored | None) -> None:
        prompt = self.seq.prompt
        self.ids += prompt
        self.logprobs += [None, *(scores.logprobs if scores else [None] * (len(prompt) - 1))]
        self.tops += [None, *(scores.top if scores else [None] * (len(prompt) - 1))]

    def token(self, t: Token) -> None:
        self.generated += 1
        self.ids.append(t.id)
        self.logprobs.append(t.logprob)
        self.tops.append(t.top)

    def text(self) -> str:
        return self.det.prefix + self.det.text() if self.echo else self.det.text()

    def text_offsets(self, tokenizer: Any, start: int, end: int) -> list[int]:
        """Character offsets of tokens [start, end) in the text (extended as tokens arrive):
        token i starts where the text of the tokens before it ends, read incrementally (a
        whole decode per token made an echoed 8k-token prompt cost seconds of host time)."""
        if self.read_to is None:
            self.read_to = text.Detokenizer(tokenizer)
        while len(self.offsets) < end:
            if self.offsets:
                self.read_to.add(self.ids[len(self.offsets) - 1])
            self.offsets.append(self.read_to.length())
        return self.offsets[start:end]


def _top_dict(tokenizer: Any, top: Top, k: int, chosen: int, lp: float) -> dict[str, float]:
    # vLLM's convention: the k most likely, and the chosen token even when it is not among them
    out = {text.token_string(tokenizer, i): v for i, v in top[:k]}
    out.setdefault(text.token_string(tokenizer, chosen), lp)
    return out


def completion_logprobs(c: Choice, tokenizer: Any, k: int, start: int, end: int) -> dict:
    ids = c.ids[start:end]
    tops = [
        None if top is None else _top_dict(tokenizer, top, k, i, lp or 0.0)
        for i, top, lp in zip(ids, c.tops[start:end], c.logprobs[start:end], strict=True)
    ]
    return {
        "tokens": [text.token_string(tokenizer, i) for i in ids],
        "token_logprobs": c.logprobs[start:end],
        "top_logprobs": tops,
        "text_offset": c.text_offsets(tokenizer, start, end),
    }


def chat_logprobs(c: Choice, tokenizer: Any, k: int, start: int, end: int) -> dict:
    def entry(i: int, lp: float) -> dict[str, Any]:
        return {"token": text.token_string(tokenizer, i), "logprob": lp,
                "bytes": text.token_bytes(tokenizer, i)}  # fmt: skip

    content = []
    for i, lp, top in zip(c.ids[start:end], c.logprobs[start:end], c.tops[start:end], strict=True):
        content.append(
            {**entry(i, lp or 0.0), "top_logprobs": [entry(j, v) for j, v in (top or ())[:k]]}
        )
    return {"content": content}


def completion_choice(c: Choice, tokenizer: Any, k: int | None) -> dict:
    logprobs = None if k is None else completion_logprobs(c, tokenizer, k, 0, len(c.ids))
    return {"index": c.index, "text": c.text(), "logprobs": logprobs,
            "finish_reason": c.finish_reason}  # fmt: skip


def chat_choice(c: Choice, tokenizer: Any, k: int | None) -> dict:
    logprobs = None if k is None else chat_logprobs(c, tokenizer, k, 0, len(c.ids))
    return {"index": c.index, "message": {"role": "assistant", "content": c.det.text()},
            "logprobs": logprobs, "finish_reason": c.finish_reason}  # fmt: skip


def completion_chunk(c: Choice, tokenizer: Any, k: int | None, piece: str) -> dict:
    end, start = len(c.ids), c.streamed
    c.streamed = end
    logprobs = None if k is None else completion_logprobs(c, tokenizer, k, start, end)
    return {"index": c.index, "text": piece, "logprobs": logprobs,
            "finish_reason": c.finish_reason}  # fmt: skip


def chat_role_chunk(c: Choice) -> dict:
    """A chat stream's first chunk of each choice: the role and no text, as OpenAI and vLLM
    open theirs (the Node.js client's stream helper counts twice the logprobs of a first
    chunk that carries tokens)."""
    return {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}  # fmt: skip


def chat_chunk(c: Choice, tokenizer: Any, k: int | None, piece: str) -> dict:
    end, start = len(c.ids), c.streamed
    c.streamed = end
    delta: dict[str, Any] = {"content": piece} if piece else {}
    logprobs = None if k is None else chat_logprobs(c, tokenizer, k, start, end)
    return {"index": c.index, "delta": delta, "logprobs": logprobs,
            "finish_reason": c.finish_reason}  # fmt: skip
