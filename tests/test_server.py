"""End-to-end tests of the head's OpenAI-compatible API with OpenAI's own Python client.

Every test talks to a real ``prima-node serve`` subprocess on 127.0.0.1 serving a tiny synthetic
model (random weights: its text is gibberish, so the tests check the protocol, the constraints and
the server's behaviour, never what the text says). What a client relies on is checked through
OpenAI's client itself (sync and async): if the server's answers drift from OpenAI's shapes, the
client raises or returns something else and the test fails the way a user's tool would.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from conftest import ModelFactory
from server_process import ServerProcess

from prima_node.device.link import measure_link

pytestmark = pytest.mark.timeout(120)

CTX = 2048  # room for a long generation (the cancellation and event-loop tests need one)
API_KEY = "test-key-0123456789"
#: max_tokens of a generation meant to outlast what a test does meanwhile (~1 ms/token here).
LONG = 1900
GUARDED_CTX = 8192  # the queue test holds the model with a generation it then cancels

ROOM_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "light_on", "description": "Turn on the light of a room",
    "parameters": {"type": "object",
                   "properties": {"room": {"type": "string", "enum": ["kitchen", "hall"]}},
                   "required": ["room"], "additionalProperties": False}}}
TIMER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "start_timer", "description": "Start a kitchen timer",
    "parameters": {"type": "object",
                   "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 60}},
                   "required": ["minutes"], "additionalProperties": False}}}

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
#: What the issue asks /metrics for: requests, tokens, prefill/decode latency, queue depth, KV cache
#: use and prefix-cache hits.
REQUIRED_METRICS = {
    "prima_requests_total": "counter", "prima_prompt_tokens_total": "counter",
    "prima_completion_tokens_total": "counter", "prima_prefill_seconds": "histogram",
    "prima_decode_seconds_per_token": "histogram", "prima_queue_depth": "gauge",
    "prima_kv_cache_usage_ratio": "gauge", "prima_prefix_cache_hits_total": "counter"}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# -- servers and clients --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(make_model: ModelFactory) -> Path:
    return make_model("llama", "tiny", "F16", "bpe")  # its template has llama3 tool calls


@pytest.fixture(scope="module")
def model_id(model_path: Path) -> str:
    return model_path.stem


def _run_server(srv: ServerProcess) -> Iterator[ServerProcess]:
    srv.start()
    try:
        srv.wait_ready()
    except BaseException:
        srv.kill()
        raise
    yield srv
    rc = srv.stop()
    assert rc == 0, f"the server exited with status {rc} after SIGTERM:\n{srv.log()}"


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    yield from _run_server(ServerProcess(model_path, tmp_path_factory.mktemp("state"), ctx=CTX))


@pytest.fixture(scope="module")
def guarded(model_path: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerProcess]:
    """A node as exposed on a network: an API key, and at most one request waiting."""
    yield from _run_server(ServerProcess(model_path, tmp_path_factory.mktemp("state"),
                                         ctx=GUARDED_CTX, api_key=API_KEY, queue_limit=1))


@pytest.fixture(autouse=True)
def _server_log_of_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print what the servers a test used logged meanwhile: pytest shows it when it fails."""
    used = [(name, request.getfixturevalue(name)) for name in ("server", "guarded")
            if name in request.fixturenames]
    start = {name: len(srv.log().splitlines()) for name, srv in used}
    yield
    for name, srv in used:
        lines = srv.log().splitlines()[start[name]:]
        print(f"--- {name} server log during the test ---", *lines, sep="\n")


@pytest.fixture
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


def aclient(srv: ServerProcess, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=60)


def settled_metrics(srv: ServerProcess) -> dict[str, float]:
    """The metrics once every generation the node started is counted in them.

    (See test_a_request_is_counted_by_the_time_its_answer_arrives: the counting can lag the
    answer, which tests that compare counts across requests must not mistake for a miscount.)
    """
    def settled() -> dict[str, float] | None:
        started = srv.status()["requests"]["requests"]
        m = srv.metrics()
        done = sum(v for k, v in m.items() if k.startswith("prima_generations_total{"))
        return m if done == started else None

    metrics: dict[str, float] = wait_for(settled, "the metrics to count every generation", srv)
    return metrics


def wait_for(predicate: Any, what: str, srv: ServerProcess, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}:\n{srv.log()}")


# -- chat, usage, streaming -----------------------------------------------------------------------


def test_a_chat_answer_has_text_usage_and_a_finish_reason(client: openai.OpenAI, model_id: str,
                                                          server: ServerProcess) -> None:
    r = client.chat.completions.create(model=model_id, messages=user("Is the hall light on?"),
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == model_id and r.id
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u is not None, server.log()
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "stop":  # only an end token ends it early
        assert u.completion_tokens < 12


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client: openai.OpenAI,
                                                              model_id: str) -> None:
    r = client.chat.completions.create(model=model_id, messages=user("Tell me a long story"),
                                       max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3
    # max_completion_tokens is the newer name and wins over max_tokens
    r = client.chat.completions.create(model=model_id, messages=user("Tell me a long story"),
                                       max_tokens=9, max_completion_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 2


def test_a_stream_carries_the_same_answer_and_a_final_usage_chunk(client: openai.OpenAI,
                                                                  model_id: str) -> None:
    kwargs: dict[str, Any] = {"model": model_id, "messages": user("Describe the garden"),
                              "max_tokens": 30, "temperature": 0.7, "seed": 11}
    whole = client.chat.completions.create(**kwargs)
    assert whole.usage is not None
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks, "no chunks"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" and c.model == model_id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, tail = chunks
    text = "".join(c.choices[0].delta.content or "" for c in body)
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert body[-1].choices[0].finish_reason is not None  # the last chunk with a choice
    # include_usage: every chunk has usage null but the last, which has no choices
    assert all(c.usage is None for c in body)
    assert tail.choices == [] and tail.usage is not None
    assert tail.usage.completion_tokens == whole.usage.completion_tokens
    assert tail.usage.prompt_tokens == whole.usage.prompt_tokens
    assert tail.usage.total_tokens == tail.usage.prompt_tokens + tail.usage.completion_tokens
    pieces = [c for c in body if c.choices[0].delta.content]
    assert len(pieces) <= tail.usage.completion_tokens  # at most one text chunk per token


def test_the_raw_event_stream_ends_with_done(server: ServerProcess, model_id: str) -> None:
    """OpenAI's client stops reading at ``[DONE]`` without checking it; other clients need it."""
    status, raw = server.post("/v1/chat/completions", {
        "model": model_id, "messages": user("hello"), "max_tokens": 5, "stream": True})
    assert status == 200, raw
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", events[-3:]
    assert all(e.startswith("data: ") for e in events[:-1])
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_completions_default_to_16_tokens(client: openai.OpenAI, model_id: str) -> None:
    r = client.completions.create(model=model_id, prompt="Once upon a time")
    assert r.object == "text_completion"
    assert isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 16
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


# -- prefix cache, stop strings, seeds ------------------------------------------------------------


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(
        client: openai.OpenAI, server: ServerProcess, model_id: str) -> None:
    system = "You are the voice assistant of a house. " + " ".join(
        f"Lamp {i} is in room {i % 7} and is {'on' if i % 3 else 'off'}." for i in range(30))
    before = settled_metrics(server)

    def ask(question: str) -> Any:
        r = client.chat.completions.create(
            model=model_id, max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        assert r.usage is not None
        return r.usage

    first = ask("Which lamps are on?")
    middle = settled_metrics(server)
    second = ask("And in room 3?")
    after = settled_metrics(server)

    assert first.prompt_tokens > 200  # long enough for the reuse to matter
    details = second.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # everything up to the new user message came from the cache, and only the new part was run
    assert 0.85 * second.prompt_tokens <= details.cached_tokens < second.prompt_tokens
    hits = "prima_prefix_cache_hits_total"
    assert after[hits] == middle[hits] + 1, (before[hits], middle[hits], after[hits])
    cached = "prima_prefix_cache_tokens_total"
    assert after[cached] - middle[cached] == details.cached_tokens


def pick_stop(text: str) -> tuple[int, str]:
    """A short piece from the middle of ``text`` that does not occur before it."""
    for length in (3, 4, 5, 6, 8):
        mid = len(text) // 2
        for i in sorted(range(1, len(text) - length), key=lambda i: abs(i - mid)):
            piece = text[i:i + length]
            if text.find(piece) == i and "\ufffd" not in piece:
                return i, piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_a_stop_string_ends_the_answer_before_it(client: openai.OpenAI, model_id: str) -> None:
    kwargs: dict[str, Any] = {"model": model_id, "messages": user("Count the apples"),
                              "max_tokens": 40, "temperature": 0}
    free = client.chat.completions.create(**kwargs)
    text = free.choices[0].message.content or ""
    assert len(text) >= 10, f"too short to cut: {text!r}"
    at, stop = pick_stop(text)

    r = client.chat.completions.create(**kwargs, stop=[stop, "\x00never"])
    assert r.choices[0].finish_reason == "stop", (text, stop, r.choices[0].message.content)
    assert r.choices[0].message.content == text[:at], (text, stop)
    assert r.usage is not None and free.usage is not None
    assert r.usage.completion_tokens <= free.usage.completion_tokens

    streamed = list(client.chat.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:at]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(server: ServerProcess, model_id: str) -> None:
    async def main() -> tuple[list[str], list[str]]:
        async with aclient(server) as c:
            async def sample(seed: int) -> str:
                r = await c.chat.completions.create(
                    model=model_id, messages=user("Name a colour"), max_tokens=16,
                    temperature=0.8, seed=seed)
                return r.choices[0].message.content or ""

            same = [await sample(1234) for _ in range(2)]
            other = [await sample(seed) for seed in (1, 2, 3, 4)]
            return same, other

    same, other = asyncio.run(main())
    assert same[0] == same[1]
    assert any(t != same[0] for t in other), (same, other)


# -- tools and JSON -------------------------------------------------------------------------------


def check_call(call: Any, tools: list[dict[str, Any]], name: str | None = None) -> Any:
    assert call.type == "function" and isinstance(call.id, str) and call.id
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.function.name in by_name
    if name is not None:
        assert call.function.name == name
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, by_name[call.function.name])
    return args


def test_the_model_uses_a_chat_template_with_tool_calls(server: ServerProcess) -> None:
    """The tool tests below need a template with a call syntax (forced calls are refused
    otherwise), and /api/status is where a client finds out."""
    assert server.status()["model"]["tool_format"] == "llama3"


def test_a_required_tool_call_comes_back_in_openai_shape(client: openai.OpenAI,
                                                         model_id: str) -> None:
    messages = user("Switch on the kitchen light")
    r = client.chat.completions.create(model=model_id, messages=messages, tools=[ROOM_TOOL],
                                       tool_choice="required", max_tokens=256, temperature=0.7,
                                       seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls, choice
    for call in calls:
        check_call(call, [ROOM_TOOL], "light_on")

    # the call and its result go back, as a client running the tool sends them
    call = calls[0]
    messages = [*messages,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": call.id, "type": "function",
                    "function": {"name": call.function.name,
                                 "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "The kitchen light is on."}]
    answer = client.chat.completions.create(model=model_id, messages=messages, tools=[ROOM_TOOL],
                                            max_tokens=10, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert r.usage is not None and answer.usage.prompt_tokens > r.usage.prompt_tokens


def test_a_required_call_with_a_small_budget_is_still_one_valid_call(
        client: openai.OpenAI, model_id: str) -> None:
    """Random weights run a free-text argument on to the budget: the call is closed in time
    (its text shortened), never returned cut off as text with finish_reason "length"."""
    note = {"type": "function", "function": {
        "name": "add_note", "description": "Add a note",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                       "required": ["text"], "additionalProperties": False}}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=model_id, messages=user("Note that we need milk"), tools=[note],  # type: ignore[list-item]
            tool_choice="required", max_tokens=64, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and len(choice.message.tool_calls) == 1, choice
        check_call(choice.message.tool_calls[0], [note], "add_note")
        assert r.usage is not None and r.usage.completion_tokens <= 64


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI, model_id: str) -> None:
    tools = [ROOM_TOOL, TIMER_TOOL]
    r = client.chat.completions.create(
        model=model_id, messages=user("Ten minutes for the eggs"), tools=tools,
        tool_choice={"type": "function", "function": {"name": "start_timer"}}, max_tokens=256,
        temperature=0.9, seed=8)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert calls and len(calls) == 1
    args = check_call(calls[0], tools, "start_timer")
    assert 1 <= args["minutes"] <= 60


def test_a_streamed_tool_call_arrives_as_tool_call_deltas(server: ServerProcess,
                                                          model_id: str) -> None:
    async def main() -> list[Any]:
        async with aclient(server) as c:
            stream = await c.chat.completions.create(
                model=model_id, messages=user("Hall light please"), tools=[ROOM_TOOL],
                tool_choice="required", max_tokens=256, temperature=0.5, seed=4, stream=True)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas, chunks
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == "", text
    # put the deltas together as OpenAI's clients do: by index, arguments appended
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = call["id"] or (d.id or "")
        if d.function is not None:
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        assert d.type in (None, "function")
    assert sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        assert call["id"] and call["name"] == "light_on"
        jsonschema.validate(json.loads(call["arguments"]), ROOM_TOOL["function"]["parameters"])


DEVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "state": {"enum": ["on", "off"]},
                   "brightness": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["name", "state", "brightness"], "additionalProperties": False}


def test_json_schema_output_validates(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id, messages=user("Describe the porch lamp as JSON"), max_tokens=200,
        temperature=0.8, seed=21,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "device", "schema": DEVICE_SCHEMA,
                                         "strict": True}})
    content = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "stop", content
    jsonschema.validate(json.loads(content), DEVICE_SCHEMA)


def test_json_object_mode_gives_an_object(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id, messages=user("Reply in JSON"), max_tokens=200, temperature=0.8, seed=5,
        response_format={"type": "json_object"})
    content = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict), content


# -- errors ---------------------------------------------------------------------------------------


def test_an_unknown_field_is_refused_by_name(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=user("hi"),
                                       extra_body={"max_tokn": 5})
    err = info.value
    assert err.status_code == 400 and err.param == "max_tokn"
    assert "max_tokn" in err.message


def test_an_out_of_range_temperature_is_refused(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=user("hi"), temperature=5)
    err = info.value
    assert err.status_code == 400 and err.param == "temperature"
    assert "temperature" in err.message and "5" in err.message


def test_a_prompt_longer_than_the_context_is_refused_with_the_numbers(
        client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=user("lamp " * 3000),
                                       max_tokens=4)
    err = info.value
    assert err.status_code == 400 and err.code == "context_length_exceeded"
    assert err.param == "messages"
    numbers = [int(n) for n in re.findall(r"\d+", err.message)]
    assert CTX in numbers, err.message
    assert any(n > CTX for n in numbers), err.message  # the prompt's length
    # the node is still fine afterwards
    r = client.chat.completions.create(model=model_id, messages=user("hi"), max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens > 0


def test_the_api_key_is_required_except_for_health(guarded: ServerProcess,
                                                   model_id: str) -> None:
    with openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model=model_id, messages=user("hi"), max_tokens=2)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=guarded.base_url, api_key=API_KEY, max_retries=0) as good:
        r = good.chat.completions.create(model=model_id, messages=user("hi"), max_tokens=2)
        assert r.usage is not None and r.usage.completion_tokens > 0
        assert [m.id for m in good.models.list()] == [model_id]
    status, _, body = guarded.get("/health", auth=False)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    for path in ("/metrics", "/api/status"):
        status, _, body = guarded.get(path, auth=False)
        assert status == 401, (path, body)
        assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_health_says_loading_until_the_model_is_ready(guarded: ServerProcess) -> None:
    """How often ``loading`` is caught depends on timing; what was seen must be right."""
    seen = guarded.health_seen
    assert seen[-1] == (200, {"status": "ok"})
    for status, body in seen[:-1]:
        assert (status, body) == (503, {"status": "loading"}), seen


def test_a_full_queue_answers_429_and_loses_nothing(guarded: ServerProcess,
                                                    model_id: str) -> None:
    """Queue limit 1: one running, one waiting, the third is refused; the waiting one answers."""
    c = openai.OpenAI(base_url=guarded.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    rejected_before = guarded.metrics()["prima_queue_rejected_total"]
    started, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def long_stream() -> None:
        with c.chat.completions.create(model=model_id, messages=user("Go on and on"),
                                       max_tokens=GUARDED_CTX - 100, temperature=0,
                                       stream=True) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    started.set()
                    release.wait(30)
                    break  # leaving closes the stream: the client went away

    def waiting() -> None:
        try:
            results["waiting"] = c.chat.completions.create(
                model=model_id, messages=user("me next"), max_tokens=3)
        except Exception as exc:
            results["waiting"] = exc

    first = threading.Thread(target=long_stream)
    second = threading.Thread(target=waiting)
    first.start()
    try:
        assert started.wait(30), guarded.log()
        second.start()
        wait_for(lambda: guarded.status()["queue"]["waiting"] == 1, "a waiting request",
                 guarded)
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model=model_id, messages=user("me too"), max_tokens=3)
        err = info.value
        assert err.status_code == 429 and err.code == "queue_full"
        assert "1" in err.message and err.response.headers.get("retry-after") == "1"
        # the refusal came while one request ran and one waited, as intended
        assert guarded.status()["queue"] == {"running": 1, "waiting": 1, "limit": 1}
    finally:
        release.set()
        first.join(30)
        if second.ident is not None:  # started
            second.join(30)
        c.close()
    answer = results["waiting"]
    assert isinstance(answer, openai.types.chat.ChatCompletion), answer
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert guarded.metrics()["prima_queue_rejected_total"] == rejected_before + 1


# -- cancellation, concurrency, a responsive loop -------------------------------------------------


def test_a_client_that_goes_away_cancels_its_generation(client: openai.OpenAI,
                                                        server: ServerProcess,
                                                        model_id: str) -> None:
    key = 'prima_generations_total{reason="cancelled"}'
    cancelled_before = server.metrics().get(key, 0.0)
    stream = client.chat.completions.create(model=model_id, messages=user("Keep talking"),
                                            max_tokens=LONG, temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 2:
            break
    stream.close()

    wait_for(lambda: server.metrics().get(key, 0.0) == cancelled_before + 1,
             "the generation to end as cancelled", server)
    last = server.status()["last_request"]
    assert last["finish_reason"] == "cancelled"
    assert last["completion_tokens"] < LONG // 4, last  # stopped soon, not run to the end
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model_id, messages=user("hi"), max_tokens=3)
    assert time.perf_counter() - t0 < 5.0
    assert r.usage is not None and r.usage.completion_tokens > 0


def test_sixteen_concurrent_streams_all_complete(server: ServerProcess, model_id: str) -> None:
    before = settled_metrics(server)

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, Any]:
        stream = await c.chat.completions.create(
            model=model_id, messages=user(f"Request number {i}"), max_tokens=12,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
        ids, finish, usage = set(), None, None
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
        assert len(ids) == 1
        return ids.pop(), finish, usage

    async def main() -> list[tuple[str, str | None, Any]]:
        async with aclient(server) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    results = asyncio.run(main())
    assert len({rid for rid, _, _ in results}) == 16
    for _, finish, usage in results:
        assert finish in ("stop", "length")
        assert usage is not None and 0 < usage.completion_tokens <= 12
    ok = 'prima_requests_total{endpoint="/v1/chat/completions",status="200"}'
    # a stream is counted when its handler returns, just after the client has read the end
    wait_for(lambda: server.metrics()[ok] - before.get(ok, 0.0) >= 16, "16 requests counted",
             server)
    after = settled_metrics(server)
    assert after[ok] - before.get(ok, 0.0) == 16
    tokens = "prima_completion_tokens_total"
    assert after[tokens] - before[tokens] == sum(u.completion_tokens for _, _, u in results)


@pytest.fixture(scope="module")
def all_cores(model_path: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ServerProcess]:
    """A node as deployed: its kernels use every core, so the event loop competes for them."""
    yield from _run_server(ServerProcess(model_path, tmp_path_factory.mktemp("state"), ctx=CTX,
                                         threads=None))


def test_health_answers_within_100_ms_while_a_generation_runs(all_cores: ServerProcess,
                                                              model_id: str) -> None:
    server = all_cores
    started = threading.Event()
    ended: dict[str, Any] = {}

    def generate() -> None:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=60) as c:
            finish = None
            for chunk in c.chat.completions.create(
                    model=model_id, messages=user("A very long story"), max_tokens=LONG,
                    temperature=0, stream=True):
                started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            ended["at"], ended["finish"] = time.perf_counter(), finish

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        assert started.wait(30), server.log()
        latencies = []
        for _ in range(20):
            t0 = time.perf_counter()
            status, _, body = server.get("/health", auth=False)
            latencies.append(time.perf_counter() - t0)
            assert status == 200, body
        checked = time.perf_counter()
    finally:
        worker.join(60)
    assert ended.get("finish") == "length", ended
    assert ended["at"] > checked, "the generation ended before the checks: make it longer"
    assert max(latencies) < 0.1, [round(1e3 * t, 1) for t in latencies]


# -- models, status, events, metrics --------------------------------------------------------------


def test_a_request_is_counted_by_the_time_its_answer_arrives(client: openai.OpenAI,
                                                             server: ServerProcess,
                                                             model_id: str) -> None:
    """A scrape (or a status poll) right after an answer must include that answer.

    A monitor that checks the node after each request, or a test like this file's, would
    otherwise read counts that are one generation behind (a race: the count is made on the
    event loop after the answer may already have been sent).
    """
    key = "prima_completion_tokens_total"
    expected = settled_metrics(server)[key]
    behind = []
    for i in range(30):
        r = client.chat.completions.create(model=model_id, messages=user(f"n{i}"),
                                           max_tokens=2, temperature=0)
        assert r.usage is not None
        expected += r.usage.completion_tokens
        seen = server.metrics()[key]
        if seen != expected:
            behind.append((i, seen, expected))
    assert not behind, f"scrapes right after an answer missed it: {behind}"


def test_models_lists_the_served_model(client: openai.OpenAI, model_id: str) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == [model_id]
    assert models[0].object == "model"
    assert client.models.list().data[0].owned_by


def test_status_describes_the_model_and_context(server: ServerProcess, model_id: str,
                                                model_path: Path) -> None:
    doc = server.status()
    assert doc["state"] == "ready" and doc["error"] is None
    assert doc["model"]["id"] == model_id and doc["model"]["file"] == model_path.name
    assert doc["model"]["architecture"] == "llama"
    assert doc["context"]["n_ctx"] == CTX
    assert doc["context"]["kv_capacity_tokens"] >= CTX
    assert doc["queue"]["limit"] == 32 and doc["queue"]["running"] == 0
    node = doc["cluster"]["nodes"][0]
    assert node["role"] == "head" and node["online"] is True
    assert node["address"] == f"127.0.0.1:{server.port}"  # the port actually listened on


def test_events_push_the_status_at_once_and_after_a_request(server: ServerProcess,
                                                            model_id: str) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(server.url + "/api/events") as ws:
            first = await asyncio.wait_for(ws.receive_json(), 5)
            n0 = first["data"]["requests"]["requests"]
            async with aclient(server) as c:
                await c.completions.create(model=model_id, prompt="tick", max_tokens=2)
            while True:
                event = await asyncio.wait_for(ws.receive_json(), 5)
                data = event["data"]
                if data["requests"]["requests"] == n0 + 1 and data["last_request"] and \
                        data["last_request"]["endpoint"] == "/v1/completions":
                    return first, event

    first, later = asyncio.run(main())
    assert first["type"] == "status" and first["data"]["state"] == "ready"
    assert first["data"]["model"]["id"] == model_id
    assert later["type"] == "status"
    assert later["data"]["last_request"]["completion_tokens"] in (1, 2)


def test_metrics_are_prometheus_text_with_the_documented_names(
        client: openai.OpenAI, server: ServerProcess, model_id: str) -> None:
    client.completions.create(model=model_id, prompt="x", max_tokens=2)
    status, headers, body = server.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    exposed = dict(re.findall(r"^# TYPE (\S+) (counter|gauge|histogram)$", body.decode(), re.M))
    documented = dict(re.findall(r"^\| `(prima_\w+)` \| (counter|gauge|histogram) \|",
                                 API_DOC.read_text(encoding="utf-8"), re.M))
    # every metric documented as it is, and nothing else (prima_node_*: a cluster head's,
    # checked in test_cluster.py)
    assert exposed == {k: v for k, v in documented.items() if not k.startswith("prima_node_")}
    assert REQUIRED_METRICS.items() <= exposed.items()
    samples = settled_metrics(server)
    assert samples["prima_model_ready"] == 1
    assert samples["prima_kv_cache_capacity_tokens"] >= CTX
    inf_bucket = samples['prima_prefill_seconds_bucket{le="+Inf"}']
    assert inf_bucket == samples["prima_prefill_seconds_count"] > 0


def test_the_link_probe_measures_a_hop_to_a_node_with_its_key(guarded: ServerProcess) -> None:
    url = f"ws://127.0.0.1:{guarded.port}/api/link"
    prof = asyncio.run(measure_link(url, headers={"Authorization": f"Bearer {API_KEY}"},
                                    pings=5, bulk_bytes=2**20, bulk_repeats=1))
    assert 0 < prof.rtt_s < 1 and prof.bytes_per_s > 1e6
    with pytest.raises(ConnectionError, match="401"):
        asyncio.run(measure_link(url, pings=1))
