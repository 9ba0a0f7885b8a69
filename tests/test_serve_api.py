"""`bigjax serve` as a client sees it: a real server process on loopback, driven by clients
nobody here wrote (the openai package, httpx, lm-eval's remote tokenizer), with hostile
input, a full queue, clients that vanish mid-stream, 200 concurrent requests and SIGTERM."""

import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import xla_flags

KEY = "sk-bigjax-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def server(run_dir):
    """(base URL, process): 4 slots, 8 waiting at most, an API key."""
    flags = ["--slots", "4", "--max-waiting", "8", "--api-key", KEY, "--max-body-mb", "1",
             "--allowed-origins", f"{PAGE}, http://localhost:3000"]  # fmt: skip
    url, proc = start_server(run_dir, *flags)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


PAGE = "https://chat.example.org"  # a web page allowed to call the API from a browser


def start_server(run_dir, *flags):
    """`bigjax serve` in a process on one device (a fast start), healthy: (base URL, process)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    cmd = [sys.executable, "-m", "bigjax.cli", "serve", str(run_dir), "--port", "0", *flags]
    out = subprocess.PIPE
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while not (match := re.search(r"serve: .* on (http://[\d.]+:\d+)/v1", seen)):
        line = proc.stdout.readline()
        assert line, seen
        seen += line
    url = match.group(1)
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/health").status_code != 200:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    return url, proc


def _metrics(url):
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


def _client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def test_openai_client_completions_equal_generate_and_stream_the_same_text(server, run_dir):
    from bigjax.generate import Sampling, generate_from_run

    url, _ = server
    client = _client(url)
    prompts = ["def main(", "import os\n", "class A:", "x = [", "#", "for i in", "print(", "if"]
    want, _ = generate_from_run(str(run_dir), [], prompts, Sampling(max_new_tokens=10))
    # eight requests at once: each one's greedy text is generate's, batched or not
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(
                lambda p: client.completions.create(
                    model="run",
                    prompt=p,
                    max_tokens=10,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                ),
                prompts,
            )
        )
    assert [r.choices[0].text for r in got] == want
    assert all(
        r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length" for r in got
    )
    stream = client.completions.create(
        model="run",
        prompt=prompts[0],
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want[0]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streaming_usage_n_and_stop_strings(server):
    url, _ = server
    client = _client(url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(
        model="run", messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and whole.usage.completion_tokens >= 1
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    parts = list(
        client.chat.completions.create(
            model="run",
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
    )
    # the role opens the stream, with no text or logprobs, as OpenAI's and vLLM's do (the
    # Node.js client's helper counted the logprobs of a first chunk with tokens twice)
    first = parts[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and not first.logprobs
    assert not any(p.choices[0].delta.role for p in parts[1:] if p.choices)
    entries = [e for p in parts[1:] if p.choices for e in p.choices[0].logprobs.content]
    assert len(entries) == whole.usage.completion_tokens
    assert (
        "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        == choice.message.content
    )
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    # n choices, seeded sampling: the same seed gives the same choices
    a = client.completions.create(
        model="run", prompt="def", max_tokens=6, n=3, temperature=1.0, seed=5
    )
    b = client.completions.create(
        model="run", prompt="def", max_tokens=6, n=3, temperature=1.0, seed=5
    )
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    # OpenAI's seed is any 64-bit integer: a negative one is a seed like the others (it was a
    # 400), taken mod 2**32; past 64 bits it is refused naming the field
    texts = [
        [c.text for c in client.completions.create(
            model="run", prompt="def", max_tokens=6, n=3, temperature=1.0, seed=s).choices]
        for s in (-5, -5, 2**32 - 5)
    ]  # fmt: skip
    assert texts[0] == texts[1] == texts[2]
    huge = httpx.post(f"{url}/v1/completions", headers=AUTH, json={"prompt": "d", "seed": 2**63})
    assert huge.status_code == 400 and huge.json()["error"]["message"].startswith("seed:")
    # a stop string: the text ends before it, finish_reason stop
    long = (
        client.completions.create(
            model="run", prompt="def", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = long[3:5]
    cut = client.completions.create(
        model="run",
        prompt="def",
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.text == long[: long.index(stop)] and cut.finish_reason == "stop"
    # a top_k past int32 keeps every token (and fails nothing decoding beside it)
    plain = {"prompt": "def", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    texts = [
        httpx.post(f"{url}/v1/completions", headers=AUTH, json=body, timeout=60).json()
        for body in (plain, {**plain, "top_k": 10**20})
    ]
    assert texts[0]["choices"][0]["text"] == texts[1]["choices"][0]["text"]


def test_a_reply_sent_back_as_history_nulls_and_neutral_openai_fields_are_served(server):
    """What clients send besides the fields that matter: the last reply's `model_dump()` as
    the next turn (nulls for refusal, audio, tool_calls ...), None for what they did not set,
    and OpenAI's fields at their defaults; the same greedy text as without them. What the
    server cannot do (tools, JSON modes, images) is refused saying so."""
    import openai

    url, _ = server
    client = _client(url)
    msgs = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="run", messages=msgs, max_tokens=4, temperature=0)
    history = [*msgs, reply.choices[0].message.model_dump(), {"role": "user", "content": "And?"}]
    assert history[1]["refusal"] is None and history[1]["tool_calls"] is None
    plain = client.chat.completions.create(
        model="run", messages=history, max_tokens=6, temperature=0
    )
    padded = client.chat.completions.create(
        model="run",
        messages=history,
        max_tokens=6,
        temperature=0,
        top_p=None,
        n=None,
        presence_penalty=None,
        seed=None,
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        # newer than the oldest openai package the project supports: sent as raw fields
        extra_body={
            "parallel_tool_calls": False,
            "store": False,
            "metadata": {"user": "a"},
            "service_tier": "auto",
            "modalities": ["text"],
        },
    )
    assert padded.choices[0].message.content == plain.choices[0].message.content
    refused = [
        ({"response_format": {"type": "json_object"}}, "constrained decoding"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "function calling"),
        ({"tool_choice": "required"}, "function calling"),
        ({"messages": [*msgs, {"role": "tool", "tool_call_id": "1", "content": "4"}]}, "tool"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
    ]
    for extra, words in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "run", "messages": msgs, **extra})
        assert words in e.value.body["message"], (extra, e.value.body)


def test_the_responses_api_through_the_openai_client(server):
    """`client.responses`: the same greedy text as chat for the same conversation, whole and
    streamed; every object and event valid against the openai package's own (strict) types,
    events numbered in order; a reply's output sent back as history; what a stateless,
    text-only server cannot do refused saying so."""
    import openai
    import pydantic
    from openai.types.responses import Response, ResponseStreamEvent

    url, _ = server
    client = _client(url)
    convo = {"instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}]}
    chat = client.chat.completions.create(
        model="run",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
    )
    raw = httpx.post(
        f"{url}/v1/responses",
        headers=AUTH,
        json={**convo, "model": "run", "max_output_tokens": 8, "temperature": 0},
    )
    whole = Response.model_validate(raw.json())  # validated, not constructed: every field
    assert whole.output_text == chat.choices[0].message.content
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    assert whole.usage.output_tokens == chat.usage.completion_tokens == 8

    body = {**convo, "model": "run", "max_output_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/responses", headers=AUTH, json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [pydantic.TypeAdapter(ResponseStreamEvent).validate_json(line[6:]) for line in lines]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    with client.responses.stream(model="run", max_output_tokens=8, temperature=0, **convo) as s:
        assert [e for e in s][-1].response.output_text == whole.output_text

    history = [*convo["input"], *(item.model_dump() for item in whole.output)]
    again = client.responses.create(
        model="run", input=[*history, {"role": "user", "content": "More?"}], max_output_tokens=4
    )
    assert again.usage.input_tokens > whole.usage.input_tokens
    refused = [
        ({"previous_response_id": "resp_1"}, "whole conversation"),
        ({"text": {"format": {"type": "json_object"}}}, "constrained decoding"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "function calling"),
        ({"input": [{"type": "function_call_output", "call_id": "1", "output": "4"}]}, "tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "text parts"),
        ({"reasoning": {"effort": "high"}}, "reason"),
    ]
    for extra, words in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{"model": "run", "input": "Hi", **extra})
        assert words in e.value.body["message"], (extra, e.value.body)


def test_logit_bias_and_penalties_through_the_openai_client(server):
    # The byte tokenizer's ids are bytes: 97 is "a". A bias of 100 forces a token, in both
    # routes and with sampling; penalties at OpenAI's limits are served (their arithmetic is
    # tested against the formula in test_serve_engine.py).
    url, _ = server
    client = _client(url)
    forced = client.completions.create(
        model="run", prompt="def", max_tokens=5, temperature=0.9, logit_bias={"97": 100}
    )
    assert forced.choices[0].text == "aaaaa"
    chat = client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        logit_bias={"98": 100}, logprobs=True,
    )  # fmt: skip
    assert chat.choices[0].message.content == "bbb"
    assert all(t.logprob < 0 for t in chat.choices[0].logprobs.content)  # the model's own
    for presence, frequency in ((2.0, -2.0), (-2.0, 2.0)):
        r = client.completions.create(
            model="run", prompt="def", max_tokens=4, temperature=0,
            presence_penalty=presence, frequency_penalty=frequency,
        )  # fmt: skip
        assert r.choices[0].finish_reason in ("stop", "length")
    # vLLM's repetition_penalty and min_p, as vLLM's clients send them (the openai package's
    # extra_body), in all three routes; a penalty of 100 keeps greedy decoding off every
    # token of the prompt (the byte tokenizer: a character is a token)
    vllm = {"repetition_penalty": 100.0, "min_p": 0.05}
    r = client.completions.create(model="run", prompt="aaaa", max_tokens=6, temperature=0,
                                  extra_body=vllm)  # fmt: skip
    assert "a" not in r.choices[0].text
    client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=3, extra_body=vllm)  # fmt: skip
    client.responses.create(model="run", input="Hi", max_output_tokens=3, extra_body=vllm)


def test_a_field_of_another_route_is_refused_naming_where_it_goes(server):
    """A client that mixes up the three APIs' dialects (what the openai package sends with
    `extra_body`) is told the field this route takes, not only that the field is unknown."""
    import openai

    url, _ = server
    client = _client(url)
    hi = [{"role": "user", "content": "Hi"}]
    for create, kwargs, words in [
        (client.responses.create, {"input": "Hi", "extra_body": {"max_tokens": 4}},
         "calls it max_output_tokens"),
        (client.responses.create, {"input": "Hi", "extra_body": {"messages": hi}},
         "takes the conversation as input"),
        (client.chat.completions.create, {"messages": hi, "extra_body": {"prompt": "x"}},
         "a prompt goes to /v1/completions"),
        (client.completions.create, {"prompt": "x", "extra_body": {"max_completion_tokens": 3}},
         "calls it max_tokens"),
        (client.chat.completions.create, {"messages": hi, "extra_body": {"temprature": 0}},
         "did you mean 'temperature'?"),
    ]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            create(model="run", **kwargs)
        assert words in e.value.body["message"], (kwargs, e.value.body)


def test_responses_log_probabilities_are_chats(server):
    """`include: ["message.output_text.logprobs"]` with `top_logprobs`: the same per-token
    entries as chat's `logprobs` for the same conversation (greedy), valid against the openai
    package's types; streamed, the deltas' entries join to the finished text's. Asked for
    wrongly, a one-line 400."""
    import openai

    url, _ = server
    client = _client(url)
    messages = [{"role": "user", "content": "def main("}]
    chat = client.chat.completions.create(
        model="run", messages=messages, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    asked = {"model": "run", "input": messages, "max_output_tokens": 6, "temperature": 0,
             "top_logprobs": 3, "include": ["message.output_text.logprobs"]}  # fmt: skip
    whole = client.responses.create(**asked).output[0].content[0]
    assert whole.text == chat.choices[0].message.content
    want = [e.model_dump() for e in chat.choices[0].logprobs.content]
    assert [e.model_dump() for e in whole.logprobs] == want and len(want) == 6
    assert all(len(e["top_logprobs"]) == 3 for e in want)
    with client.responses.stream(**asked) as s:
        events = list(s)
    deltas = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    assert [e.model_dump() for e in deltas] == [e.model_dump() for e in done.logprobs] == want
    assert [e.model_dump() for e in events[-1].response.output[0].content[0].logprobs] == want
    plain = client.responses.create(model="run", input=messages, max_output_tokens=2)
    assert plain.output[0].content[0].logprobs == []  # not asked: none computed
    for extra, words in [
        ({"top_logprobs": 3}, "top_logprobs needs include"),
        ({"include": ["reasoning.encrypted_content"]}, "it can include"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="run", input="Hi", **extra)
        assert words in e.value.body["message"], (extra, e.value.body)


def test_echo_logprobs_equal_the_scorer(server, run_dir):
    # the server's log-probabilities are bigjax eval's: the same ids, two code paths
    from bigjax.scoring import Scorer
    from bigjax.trained import open_run

    url, _ = server
    ids = [256, *b"def main():\n    return 1\n"]
    r = httpx.post(
        f"{url}/v1/completions",
        headers=AUTH,
        json={
            "prompt": ids,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
        },
    ).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    with open_run(str(run_dir), [], "eval") as (prog, params, _):
        (want,) = Scorer(prog.graphdef, params, 128).score([(ids[:1], ids[1:])])
    # f32; cached attention vs the training forward pass, on different device counts: ~1e-7
    np.testing.assert_allclose(lp["token_logprobs"][1:], want.logprobs, atol=1e-5, rtol=0)
    assert lp["text_offset"][:3] == [0, 0, 1]  # BOS is no text; then one character each


def test_tokenizer_routes_work_with_lm_evals_remote_tokenizer(server):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url, _ = server
    assert check_remote_tokenizer_support(f"{url}/v1/completions", auth_token=KEY)
    tok = RemoteTokenizer(f"{url}/v1/completions", auth_token=KEY)
    text = "héllo <|endoftext|> wörld"
    ids = tok.encode(text)
    assert 257 in ids and tok.decode(ids).replace("\x00", "") == "héllo  wörld"
    assert tok.eos_token_id == 257 and tok.bos_token_id == 256
    info = httpx.get(f"{url}/tokenizer_info", headers=AUTH).json()
    assert info["model_max_length"] == 128 and "Assistant" in info["chat_template"]
    with_bos = httpx.post(f"{url}/tokenize", headers=AUTH, json={"prompt": "a"}).json()
    assert with_bos["tokens"] == [256, 97] and with_bos["count"] == 2


BAD = [
    (b"{not json", 400, "Invalid JSON"),
    (b'{"prompt": "\xff\xfe"}', 400, "Invalid JSON"),  # not UTF-8
    (b'{"prompt": "caf\xe9"}', 400, "column 16: the bytes there are not UTF-8"),  # Latin-1
    # JSON in UTF-16 or UTF-32, with a byte-order mark or without (a NUL among the first 4
    # bytes): it was "expected value at line 1 column 1"
    *[
        (
            '{"prompt": "x"}'.encode(e),
            400,
            "the body is UTF-16 or UTF-32 text; send the JSON as UTF-8",
        )
        for e in ("utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be")
    ],
    # half a UTF-16 pair, as JavaScript's JSON.stringify writes a lone surrogate: valid JSON
    # grammar, not text
    (b'{"prompt": "a\\ud800b"}', 400, "outside a surrogate pair at line 1 column 20"),
    (b'{"prompt": "\\udc00", "n": 1}', 400, "send the text as UTF-8"),
    # ... and before a nesting Python's own parser would not survive (it was re-parsed: a 500)
    (b'{"prompt": "\\ud800", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "surrogate"),
    (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
    # a misspelt field, and one of another route: what it should be
    (
        b'{"prompt": "x", "max_token": 3}',
        400,
        "max_token: not a field of this route (did you mean 'max_tokens'?)",
    ),
    (b'{"prompt": "x", "messages": []}', 400, "chat messages go to /v1/chat/completions"),
    # a field name half a megabyte long: named by its start and length, not echoed whole
    (b'{"prompt": "x", "' + b"k" * 500_000 + b'": 1}', 400, "k...(500000 characters): not a"),
    (b'{"prompt": "x", "max_tokens": "3"}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 100000}', 400, "context (128 tokens)"),
    (b'{"prompt": [1, 2, 99999]}', 400, "outside the vocabulary"),
    (b'{"prompt": [[1, 2], []]}', 400, "prompt"),
    (b'{"prompt": "x", "n": 0}', 400, "n:"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "x", "logprobs": 99}', 400, "logprobs"),
    (b'{"prompt": "x", "presence_penalty": 2.5}', 400, "presence_penalty"),
    (b'{"prompt": "x", "frequency_penalty": -3}', 400, "frequency_penalty"),
    (b'{"prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty"),
    (b'{"prompt": "x", "min_p": 1.5}', 400, "min_p"),
    # logit_bias: OpenAI's token-id strings and -100..100, each id once, ids of this vocabulary
    (b'{"prompt": "x", "logit_bias": {"a": 1}}', 400, "is not a token id"),
    (b'{"prompt": "x", "logit_bias": {" 7": 1}}', 400, "is not a token id"),
    (b'{"prompt": "x", "logit_bias": {"7": 1, "07": 2}}', 400, "token 7 is given twice"),
    (b'{"prompt": "x", "logit_bias": {"7": 101}}', 400, "logit_bias.7"),
    (b'{"prompt": "x", "logit_bias": {"7": "1"}}', 400, "logit_bias.7"),
    (b'{"prompt": "x", "logit_bias": {"7": NaN}}', 400, "logit_bias.7"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature: Input should be a finite number"),
    (b'{"prompt": "x", "top_p": 1e400}', 400, "top_p: Input should be a finite number"),
    (b'{"prompt": "x", "logit_bias": {"99999": 1}}', 400, "logit_bias: token id 99999 is outside"),
    (
        b'{"prompt": "x", "logit_bias": {' + b", ".join(b'"%d": 1' % i for i in range(301)) + b"}}",
        400,
        "at most 300",
    ),  # fmt: skip
    (b'{"prompt": "x", "max_tokens": 0}', 400, "echo"),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "does not exist"),
    (b'{"prompt": ["a", "b", "c"], "n": 4}', 400, "queues at most 8"),  # 12 > the queue
    (b"[1, 2]", 400, "object"),
    (b"", 400, "Invalid JSON"),
]


@pytest.mark.parametrize("body,status,words", BAD)
def test_bad_requests_are_one_line_4xx(server, body, status, words):
    url, _ = server
    r = httpx.post(
        f"{url}/v1/completions", headers={**AUTH, "content-type": "application/json"}, content=body
    )
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words.lower() in message.lower() and "\n" not in message


def test_a_utf8_byte_order_mark_before_the_json_is_read_past(server):
    """RFC 8259 lets a parser ignore it, and Windows tools write it (PowerShell 5's UTF8
    encoding): it was "Invalid JSON: expected value at line 1 column 1"."""
    url, _ = server
    body = b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9", "max_tokens": 1}'
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, content=body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 6, r.text  # BOS + 5 bytes


def test_browser_pages_uptime_checks_and_compressed_bodies(server):
    """CORS as a browser does it: a preflight (no key: browsers never send one on it) for an
    allowed page is answered with what it may send, another page's is refused, and every
    answer to the allowed page, refusals included, says it may read it. HEAD where GET is.
    A compressed body is a 415 that says so, not a JSON error (or, mislabelled, a 200)."""
    import gzip

    url, _ = server
    asked = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    pre = httpx.options(f"{url}/v1/chat/completions", headers=asked)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == PAGE
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    assert "POST" in pre.headers["access-control-allow-methods"]
    other = {**asked, "Origin": "https://evil.example.com"}
    pre = httpx.options(f"{url}/v1/chat/completions", headers=other)
    assert pre.status_code == 400 and "access-control-allow-origin" not in pre.headers
    page = {**AUTH, "Origin": PAGE}
    answers = [
        httpx.post(f"{url}/v1/completions", headers=page, json={"prompt": "x", "max_tokens": 1}),
        httpx.post(f"{url}/v1/completions", headers={"Origin": PAGE}, json={"prompt": "x"}),
        httpx.post(f"{url}/v1/completions", headers=page, json={"prompt": "x", "n": 0}),
        httpx.post(f"{url}/v1/completions", headers=page, content=b"x" * (2 << 20)),
    ]
    assert [r.status_code for r in answers] == [200, 401, 400, 413]
    assert all(r.headers["access-control-allow-origin"] == PAGE for r in answers)
    # a page's client can read when to come back from a 429
    exposed = answers[0].headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed and "retry-after-ms" in exposed
    assert [r.status_code for r in (
        httpx.head(f"{url}/health"), httpx.head(f"{url}/metrics"),
        httpx.head(f"{url}/v1/models", headers=AUTH), httpx.head(f"{url}/v1/models"),
    )] == [200, 200, 200, 401]  # fmt: skip
    assert httpx.head(f"{url}/health").content == b""
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for coding, content in [("gzip", gzip.compress(body)), ("gzip", body), ("br", body)]:
        headers = {**AUTH, "content-type": "application/json", "content-encoding": coding}
        r = httpx.post(f"{url}/v1/completions", headers=headers, content=content)
        assert r.status_code == 415, (coding, r.text)
        assert f"Content-Encoding '{coding}' is not supported" in r.json()["error"]["message"]
    headers = {**AUTH, "content-encoding": "identity"}
    assert httpx.post(f"{url}/v1/completions", headers=headers, content=body).status_code == 200


# valid bodies of every POST route, the seeds of the fuzzer below
FUZZ_SEEDS = {
    "/v1/completions": {"model": "run", "prompt": "def f(x):", "max_tokens": 4, "n": 2,
                        "temperature": 0.7, "top_k": 5, "stop": ["\n\n"], "logprobs": 2},
    "/v1/chat/completions": {"messages": [{"role": "system", "content": "brief"}, {"role": "user",
                             "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 4,
                             "logprobs": True, "top_logprobs": 2, "seed": 1},
    "/v1/responses": {"input": [{"role": "user", "content": [{"type": "input_text",
                      "text": "x"}]}], "instructions": "brief", "max_output_tokens": 4},
    "/tokenize": {"prompt": "import os", "add_special_tokens": True},
    "/detokenize": {"tokens": [1, 2, 3]},
}  # fmt: skip
# values a hostile or careless client sends: wrong types, extremes, odd text, nesting
FUZZ_VALUES = [
    None, True, 0, -1, 2**31, 2**64, 10**30, 1e300, -0.0, 0.5, 101.0, "", "\x00", "\u202e",
    "😀" * 40, "a" * 3000, "<|im_start|>", "{% for x in range(99999999) %}{% endfor %}", [],
    [None], [[1, 2], []], [-5, 10**9], {}, {"type": "image_url"}, {"role": "tool", "content": 1},
    [{"type": "text"}], [{"role": "user", "content": [{"type": "input_image"}]}],
]  # fmt: skip
RAW_TOKENS = ["NaN", "Infinity", "-1e400", "1e400", "00", '"\\ud800"', "[" * 3000 + "]" * 3000]


def test_fuzzed_bodies_never_get_a_server_error(server):
    """500 bodies mutated from valid ones (a field dropped, set to a hostile value or a raw
    JSON token, an unknown field added, streaming switched on) under a fixed seed: each gets
    a 2xx, or a 4xx that is OpenAI's error object with a one-line message; never a 5xx, and
    the server still answers after. (It finds the field name echoed whole into the message,
    which an earlier version did.)"""
    import random

    url, _ = server
    rng = random.Random(20261206)
    seen = collections.Counter()
    with httpx.Client(headers=AUTH, timeout=60) as client:
        for _ in range(500):
            route = rng.choice(sorted(FUZZ_SEEDS))
            body, raws = dict(FUZZ_SEEDS[route]), {}
            for _ in range(rng.choice([1, 1, 2, 4])):
                key = rng.choice([*sorted(body), "stream", "n", "stop", "echo", "k" * 3000])
                roll = rng.random()
                if roll < 0.2:
                    body.pop(key, None)
                elif roll < 0.35:
                    body["stream"] = True
                elif roll < 0.5:
                    raws[key] = rng.choice(RAW_TOKENS)
                else:
                    body[key] = rng.choice(FUZZ_VALUES)
            text = json.dumps({**body, **{k: f"RAW{i}" for i, k in enumerate(raws)}})
            for i, token in enumerate(raws.values()):
                text = text.replace(f'"RAW{i}"', token)
            r = client.post(f"{url}{route}", content=text.encode("utf-8", "surrogatepass"),
                            headers={"content-type": "application/json"})  # fmt: skip
            seen[r.status_code // 100] += 1
            assert r.status_code < 500, (route, text[:300], r.text[:300])
            if r.status_code >= 400:
                # at most three errors, each naming its field in 80 characters or fewer
                message = r.json()["error"]["message"]
                one_line = message and "\n" not in message and len(message) < 2000
                assert one_line, (text[:300], message[:300])
    assert seen[2] > 50 and seen[4] > 100, seen  # both paths driven (91 and 409 with this seed)
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_model_is_retrieved_by_name(server):
    """`client.models.retrieve`, as clients check that a model exists before they use it
    (it was a 404 'no route'): this model's object, the list's, and another name a 404
    naming the one served."""
    import openai

    url, _ = server
    client = _client(url)
    model = client.models.retrieve("run")
    assert model.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError, match="'org/gpt-4' does not exist; this server "
                       "serves 'run'"):  # fmt: skip
        client.models.retrieve("org/gpt-4")
    assert httpx.get(f"{url}/v1/models/run").status_code == 401  # the key, as every route


def test_an_allowed_origin_must_be_an_origin():
    from bigjax.config import ConfigError
    from bigjax.serving.server import Options

    assert Options(allowed_origins=("*", "http://localhost:3000", PAGE)).allowed_origins
    for bad in ("chat.example.org", "https://chat.example.org/app", "ftp://x"):
        with pytest.raises(ConfigError, match="is not an origin: give scheme://host"):
            Options(allowed_origins=(bad,))


def test_serve_sizes_below_one_name_the_flag_given():
    # --max-body-mb 0 was refused as "--max-body-bytes", a flag that does not exist
    from bigjax.config import ConfigError
    from bigjax.serving.server import Options

    for field, flag in [("slots", "--slots"), ("max_waiting", "--max-waiting"),
                        ("tensor", "--tensor"), ("max_body_bytes", "--max-body-mb")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"^serve: {flag} must be >= 1$"):
            Options(**{field: 0})


def test_an_api_key_must_be_printable_ascii():
    # a header carries ASCII: curl sent "é" as UTF-8 bytes read back as "Ã©", so such a key
    # locked every client out; "" was matched by a bare "Bearer "
    from bigjax.config import ConfigError
    from bigjax.serving.server import Options

    assert Options(api_key="sk-Ab3_~.+/=").api_key
    for bad in ("", "sécret", "two words", " edge", "tab\there"):
        with pytest.raises(ConfigError, match="--api-key must be printable ASCII without spaces"):
            Options(api_key=bad)


def test_auth_size_routes_and_health(server):
    url, _ = server
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert httpx.get(f"{url}/v1/models", headers=wrong).status_code == 401
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "run" and models["data"][0]["max_model_len"] == 128
    big = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'  # 10 MB, over the 1 MB limit
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, content=big)
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/completions", headers=AUTH).status_code == 405
    assert httpx.get(f"{url}/v2/nothing", headers=AUTH).status_code == 404
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_oversized_bodies_get_their_413_under_concurrency(server):
    # 32 clients at once each upload 3 MB (the limit is 1 MB). Answering before the upload
    # is read and closing made the kernel reset connections, and the reset dropped the 413
    # before the client read it: most of them saw a connection error instead.
    import openai

    url, _ = server
    big = b'{"prompt": "' + b"a" * (3 << 20) + b'"}'

    async def burst():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            return await asyncio.gather(
                *(c.post(f"{url}/v1/completions", content=big) for _ in range(32)),
                return_exceptions=True,
            )

    answers = asyncio.run(burst())
    assert [getattr(a, "status_code", repr(a)) for a in answers] == [413] * 32
    with pytest.raises(openai.APIStatusError) as refused:  # not a connection error, retried
        _client(url).completions.create(model="run", prompt="a" * (3 << 20), max_tokens=1)
    assert refused.value.status_code == 413
    long_name = httpx.post(f"{url}/v1/completions", headers=AUTH,
                           json={"model": "m" * 100_000, "prompt": "x"})  # fmt: skip
    assert long_name.status_code == 404 and len(long_name.json()["error"]["message"]) < 300


def test_a_full_queue_answers_429_and_a_vanished_client_frees_its_slot(server):
    url, _ = server
    body = {"prompt": "x", "max_tokens": 100, "ignore_eos": True, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            return await asyncio.gather(
                *(c.post(f"{url}/v1/completions", json=body) for _ in range(20))
            )

    answers = asyncio.run(burst())
    codes = sorted(r.status_code for r in answers)
    # the queue takes 8 (and the 4 slots what the engine moved out of it meanwhile); the rest
    # are refused at once, never queued without bound
    assert codes.count(200) >= 8 and set(codes) <= {200, 429} and 429 in codes
    # each refusal says when to come back: whole seconds for any HTTP client, milliseconds
    # for OpenAI's (which read retry-after-ms first and honour up to 60 s), in 50 ms .. 60 s
    waits_ms = []
    for r in answers:
        if r.status_code == 429:
            ms = int(r.headers["retry-after-ms"])
            assert 50 <= ms <= 60_000 and int(r.headers["Retry-After"]) == max(1, -(-ms // 1000))
            waits_ms.append(ms)
    # spread, so the clients refused together do not all come back at once
    assert len(waits_ms) < 3 or len(set(waits_ms)) > 1, waits_ms
    # a client that reads two chunks of a long stream and hangs up
    before = _metrics(url)["vllm:generation_tokens_total"]
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        headers=AUTH,
        json={**body, "stream": True, "max_tokens": 120},
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while _metrics(url)["vllm:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    m = _metrics(url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:generation_tokens_total"] - before < 120  # it stopped early
    assert (
        m["bigjax:requests_rejected_total"] >= 1
        and m["vllm:time_to_first_token_seconds_count"] >= 8
    )


def test_a_client_that_hangs_up_is_counted_as_cancelled(server):
    """The sequences of a client gone mid-stream are counted under
    request_success_total{finished_reason="cancelled"} (they were counted nowhere: the job
    stopped reading before the engine reported them)."""
    url, _ = server

    def cancelled():
        line = 'vllm:request_success_total{finished_reason="cancelled",model_name="run"}'
        text = httpx.get(f"{url}/metrics").text
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))

    before = cancelled()
    body = {"prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True, "n": 2}
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 20
    while cancelled() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled() == before + 2  # both sequences of the request, once each


def test_two_hundred_concurrent_clients(server):
    import psutil

    url, proc = server
    body = {"prompt": "def", "max_tokens": 4, "temperature": 0}

    async def wave():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(headers=AUTH, timeout=120, limits=limits) as c:
            return await asyncio.gather(
                *(c.post(f"{url}/v1/completions", json=body) for _ in range(200))
            )

    rss = []
    for _ in range(3):
        codes = [r.status_code for r in asyncio.run(wave())]
        assert set(codes) <= {200, 429} and 200 in codes, sorted(set(codes))
        rss.append(psutil.Process(proc.pid).memory_info().rss)
    m = _metrics(url)
    assert m["vllm:num_requests_running"] == 0 and m["bigjax:decode_slots_in_use"] == 0
    # flat: a leak per request (a slot, a queue, a task) would grow by every wave's 200
    assert rss[2] - rss[1] < 16 << 20, [r >> 20 for r in rss]


def test_two_processes_serve_as_one(run_dir, server):
    # a multi-host mesh on localhost: process 0 serves HTTP and schedules, process 1 makes the
    # same program calls (broadcast by process 0); greedy text equals one process's
    import concurrent.futures as cf
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hosts = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"]
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    follower = subprocess.Popen(
        [sys.executable, "-m", "bigjax.cli", "serve", str(run_dir), *hosts, "--process_id", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url, leader = start_server(run_dir, *hosts, "--process_id", "0")
    try:
        prompts = [{"prompt": p} for p in ("def main(", "import", "class B:")]
        # a request's logit bias and penalties travel with its prefill to the other process
        prompts.append({"prompt": "import", "logit_bias": {"97": 4.0, "101": -2.5},
                        "frequency_penalty": 1.5, "presence_penalty": 0.5,
                        "repetition_penalty": 1.4})  # fmt: skip
        body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}

        def ask(base, p):
            r = httpx.post(f"{base}/v1/completions", json={**body, **p}, headers=AUTH,
                           timeout=60)  # fmt: skip
            return r.json()["choices"][0]["text"]

        want = [ask(server[0], p) for p in prompts]
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(lambda p: ask(url, p), prompts)) == want
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(timeout=60) == 0
        assert follower.wait(timeout=60) == 0, follower.stderr.read()[-2000:]
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()


def test_sigterm_finishes_what_is_in_flight_and_exits_0(server):
    url, proc = server
    body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"  # all 60 tokens, not cut short
    assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_sigterm_while_the_model_compiles_exits_0_once_it_has(run_dir):
    # Kubernetes stopping a pod that is still starting: the warm-up thread was left inside
    # XLA's compiler when Python exited, and the process aborted ("FATAL: exception not
    # rethrown", exit 134)
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    cmd = [sys.executable, "-m", "bigjax.cli", "serve", str(run_dir), "--port", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        first = proc.stdout.readline()
        url = re.search(r"on (http://[\d.]+:\d+)/v1", first).group(1)
        while True:  # uvicorn answers (its signal handlers are in place): still compiling
            with contextlib.suppress(httpx.ConnectError):
                status = httpx.get(f"{url}/health").status_code
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, first + rest
    assert "FATAL" not in rest and rest.endswith("serve: stopped after finishing the requests "
                                                 "in flight\n"), rest  # fmt: skip
    if status == 503:  # signalled while compiling (the usual case: the warm-up takes seconds)
        assert "serve: stopping once the model has compiled" in rest, rest


def test_a_kv_cache_that_cannot_fit_is_one_line(tiny_run, capsys):
    # allocated whole at start: it was XLA's out-of-memory traceback
    from bigjax.cli import main

    assert main(["serve", str(tiny_run), "--port", "0", "--max-len", str(10**9)]) == 2
    err = capsys.readouterr().err
    assert (
        "the KV cache of 8 slots x 1,000,000,000 tokens needs" in err and "lower --max-len" in err
    )
