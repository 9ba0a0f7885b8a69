"""OpenAI's Responses API over the chat machinery: the response object, whole or as its event
stream (created, in progress, one message's text in deltas, completed or incomplete), every
event numbered. Stateless: nothing is stored, so there is no `GET /v1/responses/{id}`."""

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


def response_message(item_id: str, text_: str, status: str) -> dict:
    content = [] if status == "in_progress" else [_output_text(text_)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content}  # fmt: skip


def _output_text(text_: str) -> dict:
    return {"type": "output_text", "text": text_, "annotations": [], "logprobs": []}


def response(head: dict, c: Choice | None, item_id: str, usage: dict | None) -> dict:
    """The response object: `head` holds what the request set (id, model, sampling); `c`
    None while it is in progress. Stopped by the model: completed; by the token budget:
    incomplete (max_output_tokens), as OpenAI reports them."""
    if c is None:
        return {**head, "status": "in_progress", "output": [], "usage": None,
                "incomplete_details": None}  # fmt: skip
    done = c.finish_reason == "stop"
    status = "completed" if done else "incomplete"
    return {
        **head, "status": status, "output": [response_message(item_id, c.det.text(), status)],
        "usage": usage, "incomplete_details": None if done else {"reason": "max_output_tokens"},
    }  # fmt: skip


def text_events(item_id: str, piece: str, whole: str | None) -> list[dict]:
    """The events of one piece of text (`whole`: the text in full once it ended)."""
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events = [{"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}]
    events = events if piece else []
    if whole is not None:
        events += [
            {"type": "response.output_text.done", **where, "text": whole, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": _output_text(whole)},
        ]
    return events


def opening_events(response_: dict, item_id: str) -> list[dict]:
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    return [
        {"type": "response.created", "response": response_},
        {"type": "response.in_progress", "response": response_},
        {"type": "response.output_item.added", "output_index": 0,
         "item": response_message(item_id, "", "in_progress")},
        {"type": "response.content_part.added", **where, "part": _output_text("")},
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


def body(head: dict, c: Choice, usage: dict) -> dict:
    return response(head, c, _item_id(head), usage)


async def stream(
    pieces: AsyncIterator[tuple[Choice, str]], head: dict, usage: Callable[[], dict]
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

    yield sse(opening_events(response(head, None, item_id, None), item_id))
    async for c, piece in pieces:
        if c.finish_reason == "error":
            yield sse([{"type": "error", "code": "server_error", "param": None,
                        "message": f"generation failed: {c.error}"}])  # fmt: skip
            return
        done = c.finish_reason is not None
        yield sse(text_events(item_id, piece, c.det.text() if done else None))
        if done:
            yield sse(closing_events(response(head, c, item_id, usage())))
