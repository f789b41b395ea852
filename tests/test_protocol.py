"""OpenAI request bodies: what is accepted, what it becomes, and refusals that name the field.

The live-server tests (test_server.py) check the same refusals through the official client; these
cover the whole table of fields quickly, without a model.
"""

from __future__ import annotations

from typing import Any

import pytest

from prima_node.server.protocol import (
    RequestError,
    parse_chat_request,
    parse_completion_request,
)
from prima_node.text.sampler import SamplingParams

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "light_on", "parameters": {
    "type": "object", "properties": {"room": {"type": "string"}}}}}


def chat(**fields: Any) -> Any:
    return parse_chat_request({"model": "m", "messages": USER, **fields})


def refused(fn: Any, body: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(body)
    return info.value


def test_defaults_are_llama_cpp_sampling_and_no_token_limit() -> None:
    req = chat()
    assert req.sampling == SamplingParams()
    assert req.max_tokens is None and not req.stream and req.stop == ()
    assert req.tool_choice == "auto" and req.cache_prompt


def test_fields_map_onto_the_text_layer() -> None:
    req = chat(temperature=0.2, top_p=0.5, top_k=7, min_p=0.1, repeat_penalty=1.1,
               repeat_last_n=32, presence_penalty=0.5, frequency_penalty=-0.5, seed=9,
               logit_bias={"5": -100, "6": 2.5}, stop="END", max_tokens=10,
               max_completion_tokens=12, stream=True, stream_options={"include_usage": True},
               user="u", metadata={"a": "b"}, prompt_cache_key="ha-conversation")
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.repeat_last_n,
            s.presence_penalty, s.frequency_penalty, s.seed) == (
        0.2, 0.5, 7, 0.1, 1.1, 32, 0.5, -0.5, 9)
    assert dict(s.logit_bias) == {5: -100.0, 6: 2.5}
    assert req.stop == ("END",)
    assert req.max_tokens == 12  # max_completion_tokens wins over the deprecated max_tokens
    assert req.include_usage and req.cache_key == "ha-conversation"


def test_developer_messages_are_system_messages() -> None:
    req = chat(messages=[{"role": "developer", "content": "be brief"}, *USER])
    assert req.messages[0]["role"] == "system"


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokn": 5}, "max_tokn"),
    ({"temperature": 5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": True}, "max_completion_tokens"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 500}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "yes"}, "stream"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    ({"tools": [TOOL, TOOL]}, "tools[1]"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
     "response_format.json_schema.schema"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    err = refused(parse_chat_request, {"messages": USER, **fields})
    assert err.status == 400 and err.param == param
    assert err.body()["error"]["param"] == param and err.message


def test_an_unknown_field_is_refused_not_ignored() -> None:
    err = refused(parse_chat_request, {"messages": USER, "max_tokn": 5})
    assert err.code == "unknown_field" and "max_tokn" in err.message


def test_tool_choice_forms() -> None:
    named = chat(tools=[TOOL], tool_choice={"type": "function",
                                            "function": {"name": "light_on"}})
    assert (named.tool_choice, named.forced_tool) == ("function", "light_on")
    assert chat(tools=[TOOL], tool_choice="required").tool_choice == "required"
    assert chat(tools=[TOOL], tool_choice="none").tool_choice == "none"


def test_response_formats() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                        "schema": schema}})
    assert req.json_schema == schema and not req.json_mode
    assert chat(response_format={"type": "json_object"}).json_mode
    assert chat(response_format={"type": "text"}).json_schema is None


def test_text_completions_follow_openai_defaults_and_refuse_what_they_cannot_do() -> None:
    req = parse_completion_request({"prompt": "Once"})
    assert req.prompt == "Once" and req.max_tokens == 16  # OpenAI's default for this endpoint
    assert parse_completion_request({"prompt": "x", "max_tokens": None}).max_tokens is None
    assert parse_completion_request({"prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]
    assert parse_completion_request({"prompt": ["one"]}).prompt == "one"
    for body, param in [({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                        ({"prompt": "x", "echo": True}, "echo"),
                        ({"prompt": "x", "suffix": "y"}, "suffix"),
                        ({"prompt": "x", "best_of": 3}, "best_of"),
                        ({"prompt": "x", "messages": USER}, "messages")]:
        assert refused(parse_completion_request, body).param == param
