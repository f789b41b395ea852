"""gpt-oss's harmony answers: reasoning apart from the answer, calls from their headers.

The parser is fed what the detokeniser gives (harmony's markers are control tokens it shows as
text, tests/test_tokenizer.py); the generation ends at ``<|return|>`` or ``<|call|>``, which
are end-of-generation tokens and so usually never reach the parser.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from prima_node.generate import GenerationOptions, Generator, ReasoningDelta, TextDelta, ToolCall
from prima_node.text.harmony import MAX_HEADER, HarmonyParser
from prima_node.text.sampler import SamplingParams
from tests.conftest import ModelFactory

ANSWER = ("<|channel|>analysis<|message|>The user greets me. Reply briefly.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?")
CALL = ("<|channel|>analysis<|message|>Turn on the kitchen light.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.HassTurnOn <|constrain|>json"
        "<|message|>{\"name\": \"light\", \"area\": \"kitchen\"}")


def parse(text: str, chunk: int = 0, *, calls: bool = True) -> list[Any]:
    """Events for ``text`` fed whole, or in pieces of ``chunk`` characters, merged."""
    parser = HarmonyParser(calls=calls)
    pieces = [text] if not chunk else [text[i:i + chunk] for i in range(0, len(text), chunk)]
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    merged: list[Any] = []
    for e in events:
        if merged and type(e) is type(merged[-1]) and isinstance(e, (TextDelta, ReasoningDelta)):
            merged[-1] = type(e)(merged[-1].text + e.text)
        else:
            merged.append(e)
    return merged


@pytest.mark.parametrize("chunk", [0, 1, 3, 7])
def test_reasoning_and_answer_are_told_apart_however_the_output_is_split(chunk: int) -> None:
    assert parse(ANSWER, chunk) == [ReasoningDelta("The user greets me. Reply briefly."),
                                    TextDelta("Hello! How can I help?")]


@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_a_call_is_read_from_its_header_and_closed_by_the_end_of_the_output(chunk: int) -> None:
    events = parse(CALL, chunk)
    assert events[0] == ReasoningDelta("Turn on the kitchen light.")
    call = events[1]
    assert isinstance(call, ToolCall) and call.name == "HassTurnOn"
    assert json.loads(call.arguments) == {"name": "light", "area": "kitchen"}
    assert call.id.startswith("call_") and len(events) == 2


def test_the_recipient_may_come_before_the_channel_and_calls_may_follow_each_other() -> None:
    text = ("<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}"
            "<|call|><|start|>assistant<|channel|>commentary to=functions.get_date<|message|>"
            "{\"tz\": \"UTC\"}")
    calls = parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {}), ("get_date", {"tz": "UTC"})]
    assert len({c.id for c in calls}) == 2


def test_text_streams_as_it_comes_but_a_possible_marker_is_held() -> None:
    parser = HarmonyParser()
    assert parser.feed("<|channel|>final<|mess") == []  # the header is not complete
    assert parser.feed("age|>Hi th") == [TextDelta("Hi th")]
    assert parser.feed("ere<|e") == [TextDelta("ere")]  # "<|e" may be <|end|>
    assert parser.feed("h") == [TextDelta("<|eh")]
    assert parser.finish() == []


def test_a_commentary_preamble_without_a_recipient_is_spoken() -> None:
    text = ("<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant"
            "<|channel|>commentary to=functions.lookup<|message|>{\"q\": 1}")
    events = parse(text)
    assert events[0] == TextDelta("Let me check.") and isinstance(events[1], ToolCall)


def test_arguments_that_are_not_an_object_are_passed_on_as_text(
        caplog: pytest.LogCaptureFixture) -> None:
    text = "<|channel|>commentary to=functions.lookup<|message|>[1, 2"
    with caplog.at_level(logging.WARNING, logger="prima_node.text"):
        assert parse(text) == [TextDelta("[1, 2")]
    assert "not a JSON object" in caplog.text


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_call_the_request_did_not_offer_tools_for_is_dropped(
        chunk: int, caplog: pytest.LogCaptureFixture) -> None:
    """As llama.cpp's parser consumes it: a client that sent no tools never gets a call."""
    with caplog.at_level(logging.WARNING, logger="prima_node.text"):
        events = parse(CALL + "<|call|><|start|>assistant<|channel|>final<|message|>Done.",
                       chunk, calls=False)
    assert events == [ReasoningDelta("Turn on the kitchen light."), TextDelta("Done.")]
    assert "'HassTurnOn', but the request offered no tools" in caplog.text


def test_a_call_of_a_built_in_tool_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Only ``functions.*`` are the request's tools; gpt-oss's own (browser, python) are never
    offered, so a call of one is not passed on as if it were."""
    text = ("<|channel|>analysis<|message|>Search the web.<|end|>"
            "<|start|>assistant<|channel|>commentary to=browser.search <|constrain|>json"
            "<|message|>{\"query\": \"weather\"}<|call|>"
            "<|start|>assistant<|channel|>commentary to=functions.HassTurnOn json"
            "<|message|>{\"name\": \"light\"}")
    with caplog.at_level(logging.WARNING, logger="prima_node.text"):
        events = parse(text)
    assert events[0] == ReasoningDelta("Search the web.")
    assert [(e.name, json.loads(e.arguments)) for e in events[1:]] == [
        ("HassTurnOn", {"name": "light"})]
    assert "built-in tool 'browser.search'" in caplog.text


def test_output_that_is_not_harmony_is_text() -> None:
    assert parse("Just words, no channels.") == [TextDelta("Just words, no channels.")]
    long = "word " * (MAX_HEADER // 5 + 10)
    parser = HarmonyParser()
    first = parser.feed(long)  # beyond a header's length: released without waiting for the end
    assert first == [TextDelta(long)]
    assert parser.feed("more") == [TextDelta("more")]


LIGHT = {"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turns on a device",
    "parameters": {"type": "object", "properties": {
        "name": {"type": "string", "description": "The device"},
        "area": {"type": "string", "enum": ["kitchen", "hall"]}},
        "required": ["name"]}}}


def test_the_built_in_template_renders_tools_calls_results_and_reasoning(
        make_model: ModelFactory) -> None:
    with Generator.open(make_model("gpt-oss", "tiny", "MXFP4_MOE"), threads=1, n_ctx=512) as g:
        assert g.template.tool_format == "harmony"
        messages = [
            {"role": "system", "content": "You control a home."},
            {"role": "user", "content": "Kitchen light on"},
            {"role": "assistant", "content": None, "reasoning_content": "Call the tool.",
             "tool_calls": [{"id": "call_1", "type": "function", "function": {
                 "name": "HassTurnOn", "arguments": "{\"name\": \"light\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"ok\": true}"},
        ]
        text = g.template.render(messages, tools=[LIGHT], add_generation_prompt=True,
                                 reasoning_effort="low")
    assert "Reasoning: low" in text
    assert ("<|start|>developer<|message|># Instructions\n\nYou control a home.\n\n"
            "# Tools\n\n## functions\n\nnamespace functions {\n\n// Turns on a device\n"
            "type HassTurnOn = (_: {\n// The device\nname: string,\narea?: \"kitchen\" | "
            "\"hall\",\n}) => any;\n\n} // namespace functions<|end|>") in text
    # the reasoning of the turn still in progress is kept, as OpenAI's renderer does
    assert ("<|start|>assistant<|channel|>analysis<|message|>Call the tool.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.HassTurnOn <|constrain|>json"
            "<|message|>{\"name\": \"light\"}<|call|>"
            "<|start|>functions.HassTurnOn to=assistant<|channel|>commentary<|message|>"
            "{\"ok\": true}<|end|><|start|>assistant") in text
    assert text.endswith("<|start|>assistant")


def test_a_forced_call_and_a_plain_answer_through_the_generation_loop(
        make_model: ModelFactory) -> None:
    """Random weights write no channels: their plain answer arrives as text, and a forced
    call in harmony's syntax is one structured call."""
    from prima_node.text.tool_grammar import tool_call_grammar

    with Generator.open(make_model("gpt-oss", "tiny", "MXFP4_MOE"), threads=1,
                        n_ctx=1024) as g:
        ids = g.chat_prompt([{"role": "user", "content": "Kitchen light on"}], tools=[LIGHT])
        grammar = tool_call_grammar("harmony", [LIGHT], g.tokenizer)
        opts = GenerationOptions(sampling=SamplingParams(temperature=0.9, seed=5),
                                 max_tokens=200, grammar=grammar, tool_format="harmony")
        events = list(g.generate(ids, opts))
        plain = list(g.generate(ids, GenerationOptions(max_tokens=12, tool_format="harmony")))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 1 and calls[0].name == "HassTurnOn"
    assert set(json.loads(calls[0].arguments)) <= {"name", "area"}
    assert events[-1].finish_reason == "tool_calls"  # type: ignore[union-attr]
    assert not any(isinstance(e, TextDelta) and e.text.strip() for e in events)
    assert any(isinstance(e, TextDelta) for e in plain)


def test_the_generation_loop_drops_calls_where_no_tools_were_offered(
        make_model: ModelFactory) -> None:
    """The same forced call, for a request without tools: no call, and the answer ends as a
    plain one (never finish_reason "tool_calls" for a client that offered none)."""
    from prima_node.text.tool_grammar import tool_call_grammar

    with Generator.open(make_model("gpt-oss", "tiny", "MXFP4_MOE"), threads=1,
                        n_ctx=1024) as g:
        ids = g.chat_prompt([{"role": "user", "content": "Kitchen light on"}], tools=[LIGHT])
        grammar = tool_call_grammar("harmony", [LIGHT], g.tokenizer)
        opts = GenerationOptions(sampling=SamplingParams(temperature=0.9, seed=5),
                                 max_tokens=200, grammar=grammar, tool_format="harmony",
                                 tools_offered=False)
        events = list(g.generate(ids, opts))
    assert not any(isinstance(e, ToolCall) for e in events)
    assert events[-1].finish_reason == "stop"  # type: ignore[union-attr]


def test_the_server_offers_calls_only_where_the_request_has_tools(
        make_model: ModelFactory) -> None:
    """What the head's prompting tells the generation loop: harmony's channels are parsed
    for every request, calls only kept where tools were offered and not refused."""
    from prima_node.server.prompting import chat_prompt
    from prima_node.server.protocol import parse_chat_request

    messages = [{"role": "user", "content": "Kitchen light on"}]
    with Generator.open(make_model("gpt-oss", "tiny", "MXFP4_MOE"), threads=1,
                        n_ctx=1024) as g:
        def options(**fields: Any) -> GenerationOptions:
            return chat_prompt(g, parse_chat_request({"messages": messages, **fields}))[1]

        assert [(o.tool_format, o.tools_offered) for o in (
            options(), options(tools=[LIGHT], tool_choice="none"), options(tools=[LIGHT]))] \
            == [("harmony", False), ("harmony", False), ("harmony", True)]
