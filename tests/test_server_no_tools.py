"""A model that cannot call tools, as Home Assistant meets it: the real default model
(SmolLM2-135M-Instruct, whose chat template has no tool-call syntax) behind a real node.

Before, the tools were silently dropped by the template while the log claimed the model saw
them, and the model answered "you can turn on the light" while nothing happened. Now the head
says so everywhere a user looks: the status, the log, and the model itself is told it cannot
act.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from prima_node.default_model import default_model
from prima_node.server.prompting import NO_TOOLS_NOTE
from tests.server_process import ServerProcess
from tests.test_server import _run_server

LIGHT = {"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turns on a device",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}
OFF = {"type": "function", "function": {
    "name": "HassTurnOff", "description": "Turns off a device",
    "parameters": LIGHT["function"]["parameters"]}}  # type: ignore[index]
SYSTEM = "You are a voice assistant for a home."
ASK = "Turn on the kitchen light."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _run_server(ServerProcess(default_model(), tmp_path_factory.mktemp("state"),
                                         ctx=1024))


def _chat(srv: ServerProcess, messages: list[dict[str, Any]], **fields: Any
          ) -> tuple[int, dict[str, Any]]:
    status, raw = srv.post("/v1/chat/completions", {
        "messages": messages, "max_tokens": 24, "temperature": 0, **fields})
    return status, json.loads(raw)


def test_the_status_says_the_model_cannot_call_tools(server: ServerProcess) -> None:
    model = server.status()["model"]
    assert model["tool_format"] is None and model["can_call_tools"] is False


def test_offered_tools_become_an_honest_instruction_and_a_true_log_line(
        server: ServerProcess) -> None:
    """The request with tools is the request without them whose system message ends with the
    note: the same prompt tokens and, greedy, the same answer; the log says what happened
    (once as a warning)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]
    status, offered = _chat(server, messages, tools=[LIGHT, OFF])
    assert status == 200, offered
    told = [{"role": "system", "content": f"{SYSTEM}\n\n{NO_TOOLS_NOTE}"}, messages[1]]
    status, explicit = _chat(server, told)
    assert status == 200, explicit
    status, plain = _chat(server, messages)
    assert offered["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"] \
        > plain["usage"]["prompt_tokens"]
    answer = offered["choices"][0]["message"]
    assert answer["content"] == explicit["choices"][0]["message"]["content"]
    assert not answer.get("tool_calls")
    # without a system message of its own, the note is one
    status, bare = _chat(server, messages[1:], tools=[LIGHT])
    status2, alone = _chat(server, [{"role": "system", "content": NO_TOOLS_NOTE}, messages[1]])
    assert (status, status2) == (200, 200)
    assert bare["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    log = server.log()
    assert log.count("has no tool-call syntax: the request's 2 tool(s) were left out of the "
                     "prompt, and the model was told that it cannot act") == 1, log
    assert "tools are shown" not in log


def test_a_forced_call_is_refused_with_the_reason(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                       timeout=60) as client, pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": ASK}], max_tokens=8,
            tools=[LIGHT], tool_choice="required")  # type: ignore[list-item]
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "tools_unsupported", body
    assert "no tool-call syntax" in body["message"]
