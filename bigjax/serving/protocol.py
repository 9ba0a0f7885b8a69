"""The OpenAI API's request bodies as strict pydantic models: an unknown field, a wrong type or
a value out of range is a 400 naming the field, before anything reaches the engine.

Fields OpenAI defines that this server does not implement (best_of, suffix, tools, response
formats) are accepted only at their neutral values, so a client that sends the defaults works
and one that relies on them is told so. A null is "not given" for a
field that has no null of its own, as in OpenAI's API: clients that serialise every field
(`message.model_dump()` sent back as the next turn's history) send nulls for what they did
not set.
"""

from __future__ import annotations

import codecs
import difflib
import types
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bigjax.serving.programs import MAX_LOGIT_BIAS

MAX_LOGPROBS = 20  # as vLLM; the legacy completions API itself allows 5
LOGPROBS = "message.output_text.logprobs"  # the Responses API's `include` that asks for them
MAX_N = 16  # choices per request


class _Strict(BaseModel):
    # strict: "1" is not an int and 1 is not a bool; forbid: a misspelt field is an error,
    # not a silently ignored option; no inf or nan (JSON's NaN and Infinity tokens, 1e400):
    # "a finite number" says what a bound's "less than or equal to 100" did not
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    # a field of another route (or of another API's dialect), named by a client that sent it
    # here: where it goes instead, said in the 400 (see `one_line`)
    elsewhere: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or _nullable(cls, k)}


def _nullable(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    return field is not None and types.NoneType in get_args(field.annotation)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


PromptIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's -1 and 0 both keep every token
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's: 0 keeps every token
    stop: str | list[str] | None = Field(None, validate_default=True)
    # OpenAI's type is a 64-bit integer, negative too (vLLM takes the same range); rows
    # sample with (seed + choice) mod 2**32
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's: generate max_tokens whatever the model says
    # OpenAI's ranges; applied to the logits before sampling (serving/programs.py)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # vLLM's (and Hugging Face's): seen tokens' logits divided (> 0) or multiplied (< 0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("give at most 16 non-empty stop strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if len(v or {}) > MAX_LOGIT_BIAS:
            raise ValueError(f"give at most {MAX_LOGIT_BIAS} tokens (this server's limit)")
        seen: dict[int, str] = {}
        for key in v or {}:
            # decimal ASCII digits only: int() would also take " 7", "7_0" and "٧"
            if not (key.isascii() and key.isdigit()) or len(key) > 12:
                raise ValueError(f"key {_shown(key)!r} is not a token id: give the ids as "
                                 'decimal strings, as {"50256": -100}')  # fmt: skip
            if int(key) in seen:
                raise ValueError(f"token {int(key)} is given twice ({seen[int(key)]!r} and "
                                 f"{key!r})")  # fmt: skip
            seen[int(key)] = key
        return v

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs."""
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @model_validator(mode="after")
    def _stream_options(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self


class CompletionRequest(_Sampling):
    elsewhere: ClassVar[dict[str, str]] = {
        "messages": "chat messages go to /v1/chat/completions; this route takes a prompt",
        "input": "input is the Responses API's (/v1/responses); this route takes a prompt",
        "max_completion_tokens": "this route calls it max_tokens",
    }
    prompt: str | list[str] | PromptIds | list[PromptIds]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported by this server; leave it out")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 needs echo: true (scoring the prompt)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: give at least one prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        p: Any = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


def _text_parts_only(parts: Any, text_kinds: tuple[str, ...]) -> None:
    # said plainly, before pydantic's union errors name every alternative it tried
    for part in parts if isinstance(parts, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in text_kinds:
            raise ValueError(f"content parts of type {kind!r} are not supported; "
                             "this model reads text parts only")  # fmt: skip


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None
    text_kinds: ClassVar[tuple[str, ...]] = ("text",)  # the content parts it reads

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if (
            data.get("role") in ("tool", "function")
            or data.get("tool_calls")
            or data.get("function_call")
        ):
            raise ValueError("tool and function calls are not supported by this server")
        _text_parts_only(data.get("content"), cls.text_kinds)
        return data

    def text(self) -> str:
        c = self.content
        return c if isinstance(c, str) else "".join(part.text for part in c)


def _no_tools(tools: list | None, tool_choice: object) -> None:
    if tools or tool_choice not in (None, "none", "auto"):
        raise ValueError("tools (function calling) are not supported by this server; "
                         "leave tools and tool_choice out")  # fmt: skip


class ResponseFormat(BaseModel):
    # only {"type": "text"} is served; the others' schema fields are allowed so that the
    # refusal names the format, not a field of it
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]


class ChatRequest(_Sampling):
    elsewhere: ClassVar[dict[str, str]] = {
        "prompt": "a prompt goes to /v1/completions; this route takes messages",
        "input": "input is the Responses API's (/v1/responses); this route takes messages",
        "max_output_tokens": "this route calls it max_completion_tokens (or max_tokens)",
        "echo": "echo is the completions route's (/v1/completions)",
    }
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI chat fields kept at their neutral values (see the module docstring)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    modalities: list[str] | None = None
    # what OpenAI keeps for its own dashboards and billing; nothing is kept here either way
    store: bool = False
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                f"response_format {self.response_format.type!r} is not supported "
                "by this server (it has no constrained decoding); leave it out"
            )
        _no_tools(self.tools, self.tool_choice)
        if self.modalities not in (None, ["text"]):
            raise ValueError("modalities: this server answers text only; leave it out")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class InputText(_Strict):
    # input_text in what the client writes; output_text in a reply sent back as history
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # a reply's, sent back: nothing to read here
    logprobs: list[Any] | None = None


class InputItem(Message):
    """One message of a Responses `input` list (a reply's output item sent back included)."""

    content: str | list[InputText]  # type: ignore[assignment]  # its own text part kinds
    type: Literal["message"] = "message"
    id: str | None = None  # what a sent-back output item carries
    status: str | None = None
    text_kinds: ClassVar[tuple[str, ...]] = ("input_text", "output_text", "text")

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type", "message") != "message":
            raise ValueError(f"input items of type {data['type']!r} are not supported by this "
                             "server (it has no tools or reasoning); send messages")  # fmt: skip
        return data

    def message(self) -> Message:
        return Message(role=self.role, content=self.text())


class ResponsesRequest(_Strict):
    """OpenAI's Responses API (`POST /v1/responses`), stateless: the whole conversation comes
    in `input`, nothing is kept after the reply, so `previous_response_id` is refused."""

    elsewhere: ClassVar[dict[str, str]] = {
        "messages": "the Responses API takes the conversation as input (or use "
        "/v1/chat/completions)",
        "prompt": "the Responses API takes the text as input (or use /v1/completions)",
        "max_tokens": "the Responses API calls it max_output_tokens",
        "max_completion_tokens": "the Responses API calls it max_output_tokens",
        "logprobs": f"the Responses API asks for them with include: [{LOGPROBS!r}]",
        **dict.fromkeys(("stop", "seed", "n"), "the Responses API has no such field (the "
                        "chat route, /v1/chat/completions, has)"),
    }  # fmt: skip
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extensions, as in the other routes
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to hide here
    # accepted at their neutral values (see the module docstring)
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None
    background: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    store: bool = True  # OpenAI's default; nothing is stored here either way
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        if self.previous_response_id is not None or self.conversation is not None:
            raise ValueError(
                "this server keeps no responses or conversations: send the whole "
                "conversation as input and leave previous_response_id out"
            )
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type") != "text":
            raise ValueError(
                "text.format other than text is not supported by this server (it "
                "has no constrained decoding); leave it out"
            )
        _no_tools(self.tools, self.tool_choice)
        if unknown := [x for x in self.include or () if x != LOGPROBS]:
            raise ValueError(
                f"include: {unknown[0]!r} is not supported by this server (it stores nothing, "
                f"runs no tools and its models do not reason); it can include {LOGPROBS!r}"
            )
        if self.top_logprobs is not None and self.logprobs() is None:
            raise ValueError(f"top_logprobs needs include: [{LOGPROBS!r}]")
        if self.background or (self.reasoning or {}).get("effort") not in (None, "none"):
            raise ValueError(
                "background and reasoning are not supported by this server (it stores "
                "nothing and its models do not reason)"
            )
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input: give at least one message")
        return self

    def logprobs(self) -> int | None:
        """Top log-probabilities per token to return (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or ()) else None

    def messages(self) -> list[Message]:
        """`instructions` as the system message, then the input as messages."""
        head = [Message(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            return [*head, Message(role="user", content=self.input)]
        return [*head, *(item.message() for item in self.input)]

    # what the shared sampling code reads from every request
    seed: ClassVar[None] = None
    ignore_eos: ClassVar[bool] = False
    stop: ClassVar[tuple[str, ...]] = ()
    presence_penalty: ClassVar[float] = 0.0
    frequency_penalty: ClassVar[float] = 0.0

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        return ()  # the Responses API has no logit_bias


class TokenizeRequest(_Strict):
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    model: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    tokens: list[Annotated[int, Field(ge=0)]]
    model: str | None = None


M = TypeVar("M", bound=BaseModel)


class BadBody(ValueError):
    """A body that is not a valid request; its message is the 400's one line."""


def parse(body: bytes, model: type[M]) -> M:
    """A request body as `model`. The body is the UTF-8 JSON that RFC 8259 requires between
    systems. A UTF-8 byte-order mark (what Windows tools write; the RFC lets a parser ignore
    it) is read past. UTF-16 or UTF-32 JSON, told by its mark or by a NUL among the first 4
    bytes (JSON begins with an ASCII character), is refused saying so: it was "expected value
    at line 1 column 1"."""
    body = body.removeprefix(codecs.BOM_UTF8)
    if body[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or b"\0" in body[:4]:
        raise BadBody("the body is UTF-16 or UTF-32 text; send the JSON as UTF-8")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise BadBody(one_line(e.errors(), model)) from None


def error_body(message: str, kind: str = "invalid_request_error", code: int = 400) -> dict:
    """OpenAI's error object (what its clients parse into an exception)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def one_line(errors: Sequence[Any], request: type[BaseModel] | None = None) -> str:
    """pydantic's validation errors as one line: where, then what. `request`: the body's
    model, whose fields name what a misspelt or misplaced top-level field should be."""
    # a field that is text or a list, given a list that failed inside: "should be a valid
    # string" only hides the reason it failed
    # (one pass over the errors: a hostile body can hold hundreds of thousands of them)
    locs = [tuple(e.get("loc", ())) for e in errors]
    # every place with an error at least two levels below it
    above_deeper = {loc[:k] for loc in locs for k in range(len(loc) - 1)}
    errors = [
        e for e, loc in zip(errors, locs, strict=True)
        if not (e.get("type") == "string_type" and loc[:-1] in above_deeper)
    ]  # fmt: skip
    parts = []
    for e in errors[:3]:
        where = ".".join(_shown(str(x)) for x in e.get("loc", ()) if x != "body")
        msg = _message(e)
        if request is not None and e.get("type") == "extra_forbidden" and len(e["loc"]) == 1:
            msg = _unknown_field(request, str(e["loc"][0]))
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def _message(e: Any) -> str:
    """One error's words. JSON's grammar allows a lone UTF-16 surrogate escape (`"\\ud800"`,
    which JavaScript's JSON.stringify writes for half a character), and pydantic refuses it as
    text in words that do not say what to fix ("unexpected end of hex escape"); its parser
    says those two things of a surrogate escape and nothing else (a short, a malformed and a
    cut-off escape each get other words), so they are recognised by them."""
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    if e.get("type") == "json_invalid" and msg.startswith(_NOT_UTF8):  # bytes in a string
        return f"{msg}: the bytes there are not UTF-8; send the JSON as UTF-8"
    if e.get("type") != "json_invalid" or not any(s in msg for s in _SURROGATE_FAULTS):
        return msg
    where = msg[msg.rfind(" at line ") :] if " at line " in msg else ""
    return (f"Invalid JSON: a \\uD800-\\uDFFF escape outside a surrogate pair{where} is "
            "half of a UTF-16 character, not text; send the text as UTF-8, or a character "
            "above U+FFFF as a pair of escapes (\\ud83d\\ude00)")  # fmt: skip


def _shown(name: str) -> str:
    # a field name is the client's text: a body can make one megabytes long
    return name if len(name) <= 80 else f"{name[:80]}...({len(name)} characters)"


def _unknown_field(request: type[BaseModel], name: str) -> str:
    elsewhere: dict[str, str] = getattr(request, "elsewhere", {})
    if name in elsewhere:
        return f"not a field of this route: {elsewhere[name]}"
    if len(name) > 80:  # no field's misspelling: not worth difflib's quadratic time
        return "not a field of this route"
    close = difflib.get_close_matches(name, list(request.model_fields), n=1, cutoff=0.6)
    return "not a field of this route" + (f" (did you mean {close[0]!r}?)" if close else "")


# pydantic's (jiter's) words for bytes in a string that are not UTF-8 (Latin-1 text, say)
_NOT_UTF8 = "Invalid JSON: invalid unicode code point"
# and for a high surrogate escape with no low one after it, and a low one with no high one
_SURROGATE_FAULTS = ("unexpected end of hex escape", "lone leading surrogate in hex escape")
