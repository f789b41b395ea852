"""Streaming tool-call parsing: every family, every way of chunking the output.

Expected events are written out by hand from the model families' documented output formats;
each input is also fed split at every character boundary, one character at a time and in
random chunks, which must never change the outcome.
"""

from __future__ import annotations

import json
import logging
import random
import re
from typing import Any

import pytest

from prima_node.text.tool_calls import (
    Event,
    TextDelta,
    ToolCall,
    ToolCallParser,
    parse_tool_calls,
    tool_calls_possible,
)

Norm = tuple[Any, ...]


def _run(fmt: str | None, chunks: list[str]) -> list[Event]:
    parser = ToolCallParser(fmt)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def _norm(events: list[Event]) -> list[Norm]:
    """Adjacent text merged (chunking decides how text is cut), calls by name and value."""
    out: list[Norm] = []
    for e in events:
        if isinstance(e, TextDelta):
            assert e.text, "empty TextDelta"
            if out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + e.text)
            else:
                out.append(("text", e.text))
        else:
            assert isinstance(json.loads(e.arguments), dict)
            out.append(("call", e.name, json.loads(e.arguments)))
    return out


def _chunkings(text: str, seed: int = 0) -> list[list[str]]:
    ways = [[text], list(text)]
    ways += [[text[:i], text[i:]] for i in range(1, len(text))]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return ways


def _check(fmt: str, text: str, expected: list[Norm]) -> list[Event]:
    whole = _run(fmt, [text])
    assert _norm(whole) == expected
    for chunks in _chunkings(text):
        assert _norm(_run(fmt, chunks)) == expected, chunks
    return whole


def _call(name: str, args: dict[str, Any]) -> Norm:
    return ("call", name, args)


# -- Hermes / Qwen ----------------------------------------------------------------------------

HERMES_CASES = [
    pytest.param(
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"tz": "Europe/Paris"}}\n</tool_call>',
        [("text", "Let me check.\n"),
         _call("get_weather", {"city": "Paris", "unit": "celsius"}),
         _call("get_time", {"tz": "Europe/Paris"})],
        id="text-then-two-calls"),
    pytest.param(
        '<tool_call>\n{"name": "turn_on", "arguments": {}}\n</tool_call>\nDone, the lights are on.',
        [_call("turn_on", {}), ("text", "\nDone, the lights are on.")],
        id="call-then-text"),
    pytest.param(
        '<tool_call>{"name": "say", "arguments": {"text": "a } \\" <tool_call> [TOOL_CALLS] ü 😀",'
        ' "n": [1, -2.5e-3, true, false, null, {"k": []}]}}</tool_call>',
        [_call("say", {"text": 'a } " <tool_call> [TOOL_CALLS] ü 😀',
                       "n": [1, -2.5e-3, True, False, None, {"k": []}]})],
        id="tricky-json"),
    pytest.param(
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        [_call("f", {"a": 1})],
        id="arguments-as-json-string"),
    pytest.param(
        "x < y, <tooth> and <tool_call is not <tool_cal",
        [("text", "x < y, <tooth> and <tool_call is not <tool_cal")],
        id="marker-lookalikes"),
    pytest.param(
        '\n\n<tool_call>\n{"name": "f", "arguments": {"q": 1}}\n</tool_call>\n\n',
        [_call("f", {"q": 1})],
        id="whitespace-around-call-dropped"),
]


@pytest.mark.parametrize(("text", "expected"), HERMES_CASES)
def test_hermes(text: str, expected: list[Norm]) -> None:
    _check("hermes", text, expected)


# -- Llama 3.x ------------------------------------------------------------------------------

LLAMA3_CASES = [
    pytest.param('{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 [_call("get_weather", {"city": "Paris"})], id="bare-json"),
    pytest.param('\n {"type": "function", "name": "f", "arguments": {"x": [1, 2]}}',
                 [_call("f", {"x": [1, 2]})], id="type-function-and-arguments-key"),
    pytest.param('{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {"k": "v"}}',
                 [_call("a", {}), _call("b", {"k": "v"})], id="two-bare-calls"),
    pytest.param('{"name": "a", "parameters": {}} That is all.',
                 [_call("a", {}), ("text", " That is all.")], id="call-then-text"),
    pytest.param('{"answer": 42, "name": "x"}', [("text", '{"answer": 42, "name": "x"}')],
                 id="json-answer-is-text"),
    pytest.param('Sure: {"name": "f", "parameters": {}}',
                 [("text", 'Sure: {"name": "f", "parameters": {}}')],
                 id="json-after-text-is-text"),
    pytest.param('Searching.<|python_tag|>brave_search.call(query="weather in Paris")',
                 [("text", "Searching."), _call("brave_search", {"query": "weather in Paris"})],
                 id="builtin-tool"),
    pytest.param('<|python_tag|>wolfram_alpha.call(query="2+2", n=3)\n',
                 [_call("wolfram_alpha", {"query": "2+2", "n": 3})], id="builtin-two-args"),
    pytest.param('<|python_tag|>brave_search.call(query="x")<|eom_id|>',
                 [_call("brave_search", {"query": "x"})], id="builtin-with-eom"),
    pytest.param("<|python_tag|>import math\nprint(math.pi)",
                 [_call("python", {"code": "import math\nprint(math.pi)"})], id="raw-code"),
    pytest.param('<|python_tag|>{"name": "f", "parameters": {"a": "<|python_tag|>"}}',
                 [_call("f", {"a": "<|python_tag|>"})], id="python-tag-json"),
    pytest.param("<|python_ta is not a tag", [("text", "<|python_ta is not a tag")],
                 id="tag-lookalike"),
]


@pytest.mark.parametrize(("text", "expected"), LLAMA3_CASES)
def test_llama3(text: str, expected: list[Norm]) -> None:
    _check("llama3", text, expected)


def test_llama3_json_answer_released_as_soon_as_its_first_key_shows() -> None:
    parser = ToolCallParser("llama3")
    assert parser.feed('{"name"') == []  # could still be a call
    assert parser.feed(': "f", "parameters": {"a"') == []
    other = ToolCallParser("llama3")
    assert other.feed('  {"na') == []  # "name" or "narrative"?
    assert _norm(other.feed('rrative": ')) == [("text", '  {"narrative": ')]
    assert _norm(other.feed("1}")) == [("text", "1}")]
    assert other.finish() == []


# -- Mistral ----------------------------------------------------------------------------------

NEMO = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1B2c3D4e"},'
        ' {"name": "get_time", "arguments": {}}]')
WITH_CALL_ID = '[TOOL_CALLS]f[CALL_ID]Zz9Yy8Xx7[ARGS]{"a": [1]}'

MISTRAL_CASES = [
    pytest.param(
        NEMO,
        [_call("get_weather", {"city": "Paris"}), _call("get_time", {})],
        id="nemo-array"),
    pytest.param(
        'Checking both.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
        [("text", "Checking both."), _call("get_weather", {"city": "Paris"}),
         _call("get_time", {"tz": "CET"})],
        id="name-args"),
    pytest.param(WITH_CALL_ID, [_call("f", {"a": [1]})], id="call-id"),
    pytest.param("[TOOL_CALL] and [TOOL_ and [ARGS]",
                 [("text", "[TOOL_CALL] and [TOOL_ and [ARGS]")], id="marker-lookalikes"),
]


@pytest.mark.parametrize(("text", "expected"), MISTRAL_CASES)
def test_mistral(text: str, expected: list[Norm]) -> None:
    _check("mistral", text, expected)


def test_mistral_ids_are_kept_when_valid_and_otherwise_nine_characters() -> None:
    events = _run("mistral", [NEMO])
    ids = [e.id for e in events if isinstance(e, ToolCall)]
    assert ids[0] == "a1B2c3D4e"
    assert re.fullmatch(r"[A-Za-z0-9]{9}", ids[1])
    events = _run("mistral", [WITH_CALL_ID])
    assert [e.id for e in events if isinstance(e, ToolCall)] == ["Zz9Yy8Xx7"]


# -- malformed calls come back as text, with a warning ---------------------------------------

MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": }}\n</tool_call>', "invalid JSON"),
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>', "no function name"),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', "not a JSON object"),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}', "not complete"),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool>', "no </tool_call>"),
    ("hermes", "<tool_call> sure, here it is", "no JSON object"),
    ("llama3", '{"name": "f", "parameters": {"a": 1}', "not complete"),
    ("llama3", '{"name": "f", "parameters": {"a": tru}}', "invalid JSON"),
    ("llama3", '{"name": "f", "value": 1}', "no 'parameters' or 'arguments'"),
    ("llama3", "<|python_tag|>", "nothing follows"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {]', "invalid JSON"),
    ("mistral", "[TOOL_CALLS]f [ARGS]{}", "no [ARGS]"),
    ("mistral", "[TOOL_CALLS]f[ARGS]not json", "not a JSON object"),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1', "not complete"),
]


@pytest.mark.parametrize(("fmt", "text", "reason"), MALFORMED)
def test_malformed_call_is_text_with_warning(fmt: str, text: str, reason: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    for chunks in _chunkings(text):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prima_node.text"):
            events = _run(fmt, chunks)
        assert _norm(events) == [("text", text)], chunks
        assert any(reason in r.getMessage() for r in caplog.records), caplog.text


def test_a_good_call_after_a_malformed_one_is_still_found(caplog: pytest.LogCaptureFixture) -> None:
    text = ('<tool_call>{oops}</tool_call> then\n<tool_call>\n{"name": "f", "arguments": '
            '{"a": 1}}\n</tool_call>')
    with caplog.at_level(logging.WARNING, logger="prima_node.text"):
        _check("hermes", text, [("text", "<tool_call>{oops}</tool_call> then\n"),
                                _call("f", {"a": 1})])
    assert "malformed" in caplog.text


def test_whitespace_before_a_failed_call_is_not_lost() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n\n<tool_call>{bad'
    _check("hermes", text, [_call("a", {}), ("text", "\n\n<tool_call>{bad")])


# -- streaming behaviour ------------------------------------------------------------------------

def test_text_streams_at_once_and_marker_prefixes_are_held_only_while_possible() -> None:
    parser = ToolCallParser("hermes")
    assert parser.feed("Hello") == [TextDelta("Hello")]
    assert parser.feed(" <too") == [TextDelta(" ")]
    assert parser.feed("th") == [TextDelta("<tooth")]
    assert parser.feed(" <tool_") == [TextDelta(" ")]
    assert parser.feed("call>{") == []
    assert parser.feed('"name": "f", "arguments": {}}') == []
    assert parser.feed("</tool_ca") == []
    [call] = parser.feed("ll>")
    assert isinstance(call, ToolCall)
    assert (call.name, call.arguments) == ("f", "{}")
    assert parser.feed(" ok") == [TextDelta(" ok")]
    assert parser.finish() == []


def test_held_prefix_is_released_at_finish() -> None:
    parser = ToolCallParser("mistral")
    assert parser.feed("see [TOOL") == [TextDelta("see ")]
    assert parser.finish() == [TextDelta("[TOOL")]


def test_passthrough_changes_nothing() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    parser = ToolCallParser(None)
    assert parser.feed(text[:5]) == [TextDelta(text[:5])]
    assert parser.feed(text[5:]) == [TextDelta(text[5:])]
    assert parser.finish() == []


def test_ids_are_unique_and_openai_shaped() -> None:
    text = "".join(f'<tool_call>{{"name": "f{i}", "arguments": {{}}}}</tool_call>'
                   for i in range(200))
    content, calls = parse_tool_calls(text, "hermes")
    assert content == ""
    assert [c.name for c in calls] == [f"f{i}" for i in range(200)]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 200


def test_feed_after_finish_is_an_error() -> None:
    parser = ToolCallParser("hermes")
    parser.finish()
    with pytest.raises(ValueError, match="after finish"):
        parser.feed("x")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tool-call format"):
        ToolCallParser("xml")


def test_tool_calls_possible() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert tool_calls_possible("hermes", tools)
    assert not tool_calls_possible("hermes", [])
    assert not tool_calls_possible("hermes", None)
    assert not tool_calls_possible(None, tools)


# -- nothing lost: random documents of text and calls ------------------------------------------

def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 2 else 4)
    if kind == 0:
        return rng.choice([0, -7, 12345678901234, 3.25, -1e-5])
    if kind == 1:
        return rng.choice([True, False, None])
    if kind in (2, 3):
        return "".join(rng.choice('ab "\\{}[]<>/_\nü😀') for _ in range(rng.randrange(8)))
    if kind == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(3))}


def _random_text(rng: random.Random, marker: str) -> str:
    pieces = [marker[: rng.randrange(1, len(marker))], "<", "[", "{", "}", "x", " ", "\n",
              "tool", "_call", "ü", "word"]
    while True:
        text = "x" + "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        if marker not in text:
            return text


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_random_documents_keep_all_text_and_calls(fmt: str) -> None:
    rng = random.Random(1234)
    marker = "<tool_call>" if fmt == "hermes" else "[TOOL_CALLS]"
    for _ in range(40):
        parts: list[str] = []
        expected: list[Norm] = []
        for _ in range(rng.randrange(1, 5)):
            if rng.random() < 0.5:
                text = _random_text(rng, marker)
                parts.append(text)
                if expected and expected[-1][0] == "text":
                    expected[-1] = ("text", expected[-1][1] + text)
                else:
                    expected.append(("text", text))
            else:
                name = rng.choice(["get_weather", "turn_on", "f"])
                args = {f"a{i}": _random_value(rng) for i in range(rng.randrange(3))}
                dumped = json.dumps(args, ensure_ascii=rng.random() < 0.5)
                if fmt == "hermes":
                    parts.append(f'<tool_call>\n{{"name": "{name}", "arguments": {dumped}}}'
                                 "\n</tool_call>")
                else:
                    parts.append(f"[TOOL_CALLS]{name}[ARGS]{dumped}")
                expected.append(_call(name, args))
        text = "".join(parts)
        events = _check(fmt, text, expected)
        # the text events plus the calls account for the whole input
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "".join(
            p for p in parts if not p.startswith(marker))
