"""OpenAI's Responses API over the chat machinery: the response object, whole or as its event
stream (created, in progress, one message's text in deltas, completed or incomplete), every
event numbered. Stateless: nothing is stored, so there is no `GET /v1/responses/{id}`.

Log-probabilities (`include: ["message.output_text.logprobs"]`) are chat's per-token entries
(`token`, `logprob`, `bytes`, `top_logprobs`): each delta carries its tokens', the finished
text all of them."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from bigjax.serving import protocol
from bigjax.serving.bodies import Choice


def response_usage(prompt_tokens: int, generated: int) -> dict:
    return {
        "input_tokens": prompt_tokens, "output_tokens": generated,
        "total_tokens": prompt_tokens + generated,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip


# (choice, first token, end token) -> the per-token entries of tokens [first, end)
Logprobs = Callable[[Choice, int, int], list[dict]]


def no_logprobs(c: Choice, start: int, end: int) -> list[dict]:
    return []  # none were asked for


def response_message(item_id: str, text_: str, status: str, logprobs: list[dict]) -> dict:
    content = [] if status == "in_progress" else [_output_text(text_, logprobs)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content}  # fmt: skip


def _output_text(text_: str, logprobs: list[dict]) -> dict:
    return {"type": "output_text", "text": text_, "annotations": [], "logprobs": logprobs}


def response(
    head: dict, c: Choice | None, item_id: str, usage: dict | None, logprobs: Logprobs
) -> dict:
    """The response object: `head` holds what the request set (id, model, sampling); `c`
    None while it is in progress. Stopped by the model: completed; by the token budget:
    incomplete (max_output_tokens), as OpenAI reports them."""
    if c is None:
        return {**head, "status": "in_progress", "output": [], "usage": None,
                "incomplete_details": None}  # fmt: skip
    done = c.finish_reason == "stop"
    status = "completed" if done else "incomplete"
    message = response_message(item_id, c.det.text(), status, logprobs(c, 0, len(c.ids)))
    return {
        **head, "status": status, "output": [message], "usage": usage,
        "incomplete_details": None if done else {"reason": "max_output_tokens"},
    }  # fmt: skip


def text_events(item_id: str, c: Choice, piece: str, logprobs: Logprobs) -> list[dict]:
    """The events of one piece of text: its delta (with the log-probabilities of the tokens
    not sent yet), and once the choice ended, its whole text."""
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    start, c.streamed = c.streamed, len(c.ids)
    new = logprobs(c, start, c.streamed)
    events = []
    if piece or new:
        events.append({"type": "response.output_text.delta", **where, "delta": piece,
                       "logprobs": new})  # fmt: skip
    if c.finish_reason is not None:
        whole, every = c.det.text(), logprobs(c, 0, len(c.ids))
        events += [
            {"type": "response.output_text.done", **where, "text": whole, "logprobs": every},
            {"type": "response.content_part.done", **where, "part": _output_text(whole, every)},
        ]  # fmt: skip
    return events


def opening_events(response_: dict, item_id: str) -> list[dict]:
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    return [
        {"type": "response.created", "response": response_},
        {"type": "response.in_progress", "response": response_},
        {"type": "response.output_item.added", "output_index": 0,
         "item": response_message(item_id, "", "in_progress", [])},
        {"type": "response.content_part.added", **where, "part": _output_text("", [])},
    ]  # fmt: skip


def closing_events(response_: dict) -> list[dict]:
    item = response_["output"][0]
    return [
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": f"response.{response_['status']}", "response": response_},
    ]


def response_head(req: protocol.ResponsesRequest, model: str, created: int) -> dict[str, Any]:
    """What every form of the response object holds: its ids and what the request set."""
    rid = uuid.uuid4().hex
    return {
        "id": f"resp_{rid}", "object": "response", "created_at": created, "model": model,
        "error": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls, "tool_choice": req.tool_choice or "auto",
        "tools": [], "store": False, "truncation": "disabled",
        "text": {"format": {"type": "text"}}, "metadata": req.metadata or {}, "user": req.user,
    }  # fmt: skip


def _item_id(head: dict) -> str:
    return "msg_" + head["id"].removeprefix("resp_")


def body(head: dict, c: Choice, usage: dict, logprobs: Logprobs = no_logprobs) -> dict:
    return response(head, c, _item_id(head), usage, logprobs)


async def stream(
    pieces: AsyncIterator[tuple[Choice, str]],
    head: dict,
    usage: Callable[[], dict],
    logprobs: Logprobs = no_logprobs,
) -> AsyncIterator[str]:
    """The server-sent events of one response, as its one choice's text arrives."""
    item_id, sequence = _item_id(head), 0

    def sse(events: list[dict]) -> str:
        nonlocal sequence
        out = ""
        for event in events:
            event = {**event, "sequence_number": sequence}
            sequence += 1
            out += f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
        return out

    yield sse(opening_events(response(head, None, item_id, None, logprobs), item_id))
    async for c, piece in pieces:
        if c.finish_reason == "error":
            yield sse([{"type": "error", "code": "server_error", "param": None,
                        "message": f"generation failed: {c.error}"}])  # fmt: skip
            return
        yield sse(text_events(item_id, c, piece, logprobs))
        if c.finish_reason is not None:
            yield sse(closing_events(response(head, c, item_id, usage(), logprobs)))
