"""Assist's conversation agent against a real head node (random weights: real, gibberish text).

Nothing between Home Assistant and the head is mocked. Where a test needs to see the requests,
it wraps the real client's ``chat_stream`` and passes every call through unchanged, except the
tool test, which steers its first request (said there).
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import voluptuous as vol
from conftest import entry_for, start_head
from homeassistant.components import conversation
from homeassistant.components.conversation import trace
from homeassistant.config_entries import ConfigEntry
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import chat_session, intent, llm
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.translation import async_get_translations
from pytest_homeassistant_custom_component.common import MockConfigEntry
from server_process import ServerProcess

from custom_components.prima.api import PrimaAuthError, PrimaConnectionError, PrimaResponseError
from custom_components.prima.const import (
    CONF_LLM_HASS_API,
    CONF_MAX_HISTORY,
    CONF_MAX_TOKENS,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    DOMAIN,
)
from custom_components.prima.llm_entity import (
    RoundStats,
    ThinkSplitter,
    convert_content,
    llm_error,
    repair_arguments,
    transform_stream,
    trim_history,
)


def subentry_id(entry: ConfigEntry, kind: str) -> str:
    return next(s.subentry_id for s in entry.subentries.values() if s.subentry_type == kind)


def agent_id(hass: HomeAssistant, entry: ConfigEntry) -> str:
    entity_id = er.async_get(hass).async_get_entity_id(
        "conversation", DOMAIN, subentry_id(entry, "conversation"))
    assert entity_id is not None
    return entity_id


def record_requests(entry: ConfigEntry, monkeypatch: pytest.MonkeyPatch,
                    steer: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None
                    ) -> list[dict[str, Any]]:
    """Every payload the entry's real client streams; ``steer`` may change one on its way."""
    client = entry.runtime_data.client
    real = client.chat_stream
    sent: list[dict[str, Any]] = []

    def chat_stream(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if steer is not None:
            payload = steer(len(sent), payload)
        sent.append(payload)
        return real(payload)

    monkeypatch.setattr(client, "chat_stream", chat_stream)
    return sent


def record_prepares(entry: ConfigEntry, monkeypatch: pytest.MonkeyPatch
                    ) -> list[dict[str, Any]]:
    """Every payload the entry's real client sends whole (``async_prepare``), passed on."""
    client = entry.runtime_data.client
    real = client.chat
    sent: list[dict[str, Any]] = []

    async def chat(payload: dict[str, Any]) -> dict[str, Any]:
        sent.append(payload)
        return await real(payload)

    monkeypatch.setattr(client, "chat", chat)
    return sent


async def setup_entry(hass: HomeAssistant, entry: MockConfigEntry) -> MockConfigEntry:
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return entry


def last_stats() -> dict[str, Any]:
    """What the agent recorded about its last request in the newest conversation trace."""
    events = trace.async_get_traces()[-1].as_dict()["events"]
    stats = [e["data"]["stats"] for e in events
             if e["event_type"] == trace.ConversationTraceEventType.AGENT_DETAIL
             and "stats" in (e["data"] or {})]
    assert stats, events
    return stats[-1]  # type: ignore[no-any-return]


async def test_answer_streams_into_the_chat_log(hass: HomeAssistant,
                                                head: ServerProcess) -> None:
    # greedy: at the default temperature a random model may end its answer at the first
    # token now and then, and this test needs an answer of several pieces
    loaded_entry = await setup_entry(hass, entry_for(head, **{CONF_TEMPERATURE: 0.0}))
    entity_id = agent_id(hass, loaded_entry)
    deltas: list[dict[str, Any]] = []
    with (chat_session.async_get_chat_session(hass) as session,
          conversation.async_get_chat_log(
              hass, session, chat_log_delta_listener=lambda _log, d: deltas.append(d))):
        result = await conversation.async_converse(
            hass, "hello", session.conversation_id, Context(), agent_id=entity_id)

    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    speech = result.response.speech["plain"]["speech"]
    assert speech
    # the answer arrived piece by piece as the head generated it: one role, then the text
    assert deltas[0] == {"role": "assistant"}
    pieces = [d["content"] for d in deltas[1:] if "content" in d]
    assert len(pieces) > 1
    assert "".join(pieces) == speech
    assert conversation.async_get_agent_info(hass, entity_id).supports_streaming  # type: ignore[union-attr]
    assert conversation.async_get_conversation_languages(hass, entity_id) == "*"

    # the agent is a service device under the cluster hub
    registry = dr.async_get(hass)
    device = registry.async_get_device_by_identifier(
        (DOMAIN, subentry_id(loaded_entry, "conversation")), loaded_entry.entry_id)
    hub = registry.async_get_device_by_identifier(
        (DOMAIN, f"cluster-{loaded_entry.runtime_data.coordinator.cluster_id}"),
        loaded_entry.entry_id)
    assert device is not None and hub is not None
    assert device.entry_type is dr.DeviceEntryType.SERVICE
    assert device.via_device_id == hub.id
    state = hass.states.get(entity_id)
    assert state is not None
    assert not state.attributes.get("supported_features")  # no LLM API: no CONTROL


async def test_second_turn_sends_the_first_exchange(hass: HomeAssistant, head: ServerProcess,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    entry = await setup_entry(hass, entry_for(head))
    sent = record_requests(entry, monkeypatch)
    entity_id = agent_id(hass, entry)

    first = await conversation.async_converse(hass, "hello", None, Context(),
                                              agent_id=entity_id)
    conversation_id = first.conversation_id
    second = await conversation.async_converse(hass, "and then?", conversation_id, Context(),
                                               agent_id=entity_id)
    assert second.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert second.conversation_id == conversation_id
    first_speech = first.response.speech["plain"]["speech"]

    assert len(sent) == 2
    messages = sent[1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("You are a helpful home assistant.")
    assert messages[1:] == [{"role": "user", "content": "hello"},
                            {"role": "assistant", "content": first_speech},
                            {"role": "user", "content": "and then?"}]
    # one cache slot per agent, the subentry's settings, a stream
    assert sent[1]["prompt_cache_key"] == subentry_id(entry, "conversation")
    assert sent[1]["max_tokens"] == 24
    assert sent[1]["chat_template_kwargs"] == {"enable_thinking": False,
                                               "reasoning_effort": "low"}
    assert "tools" not in sent[1]

    # the chat log kept both exchanges
    with (chat_session.async_get_chat_session(hass, conversation_id) as session,
          conversation.async_get_chat_log(hass, session) as chat_log):
        assert [c.role for c in chat_log.content] == [
            "system", "user", "assistant", "user", "assistant"]
        assert chat_log.content[2].content == first_speech
        assert chat_log.content[4].content == second.response.speech["plain"]["speech"]

    assert await hass.config_entries.async_unload(entry.entry_id)


def user_turns(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


async def test_history_is_trimmed_in_steps(hass: HomeAssistant, head: ServerProcess,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    entry = await setup_entry(hass, entry_for(head, **{CONF_MAX_HISTORY: 2}))
    sent = record_requests(entry, monkeypatch)
    entity_id = agent_id(hass, entry)
    conversation_id = None
    texts = ("one", "two", "three", "four", "five")
    for text in texts:
        result = await conversation.async_converse(hass, text, conversation_id, Context(),
                                                   agent_id=entity_id)
        assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
        conversation_id = result.conversation_id
    assert len(sent) == len(texts)
    for payload in sent:
        assert payload["messages"][0]["role"] == "system"
        assert len(user_turns(payload["messages"])) - 1 <= 2  # earlier turns, at most 2
    # the fourth request passed the limit: it went back to one earlier turn (2 // 2) ...
    assert user_turns(sent[3]["messages"]) == ["three", "four"]
    # ... and every other request only appended to the one before, so the head's prefix
    # cache keeps all of it (but the time Home Assistant writes at the end of the system
    # prompt without a GetDateTime tool, to the second)
    for before, after in (sent[0:2], sent[1:3], sent[3:5]):
        earlier, later = before["messages"], after["messages"]
        assert later[1:len(earlier)] == earlier[1:]
        assert (later[0]["content"].split("Current time is")[0]
                == earlier[0]["content"].split("Current time is")[0])
    assert user_turns(sent[4]["messages"]) == ["three", "four", "five"]
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_stopped_head_gives_a_spoken_error(hass: HomeAssistant, tiny_model: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="custom_components.prima")
    srv = await hass.async_add_executor_job(start_head, tiny_model, tmp_path)
    try:
        # room for a long answer: the head is told to stop while it streams
        entry = await setup_entry(hass, entry_for(srv, **{CONF_MAX_TOKENS: 1500}))
        # a fixed seed: the same (long) answer on every run
        sent = record_requests(entry, monkeypatch, steer=lambda _i, p: {**p, "seed": 7})
        entity_id = agent_id(hass, entry)
        assert srv.proc is not None
        proc = srv.proc
        deltas: list[dict[str, Any]] = []

        def stop_at_first_text(_log: conversation.ChatLog, delta: dict[str, Any]) -> None:
            if "content" in delta and not any("content" in d for d in deltas):
                proc.send_signal(signal.SIGTERM)  # the head stops the answer part-way
            deltas.append(delta)

        with (chat_session.async_get_chat_session(hass) as session,
              conversation.async_get_chat_log(hass, session,
                                              chat_log_delta_listener=stop_at_first_text)):
            broken = await conversation.async_converse(
                hass, "tell me a long story", session.conversation_id, Context(),
                agent_id=entity_id)
        # off the event loop: the head closes Home Assistant's event stream as it stops
        await hass.async_add_executor_job(srv.stop)
        # preparing against a stopped head is quietly given up: the real request reports it
        await conversation.async_prepare_agent(hass, entity_id, "en")
        result = await conversation.async_converse(hass, "hello", None, Context(),
                                                   agent_id=entity_id)
    finally:
        srv.kill()
    translations = await async_get_translations(hass, "en", "exceptions", [DOMAIN])
    message = translations.get(f"component.{DOMAIN}.exceptions.llm_unreachable.message")
    assert message, "translations/en.json lacks exceptions.llm_unreachable"

    # the answer had started, then the stream ended in the head's error event (the node was
    # stopping: a retry may get through), which the user hears as "cannot be reached"
    assert len(sent) == 2
    assert any("content" in d for d in deltas)
    assert broken.response.response_type is intent.IntentResponseType.ERROR
    # Home Assistant drops the final full stop of a translated exception message
    assert broken.response.speech["plain"]["speech"] == message.rstrip(".")
    assert "the node stopped this answer" in caplog.text
    assert "prefilling the prompt failed" in caplog.text

    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert result.response.speech["plain"]["speech"] == message.rstrip(".")
    assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.mark.parametrize("subentry", [{CONF_PROMPT: "{{ a template that does not close"},
                                      {CONF_LLM_HASS_API: ["prima_no_such_api"]}],
                         ids=["bad-template", "unknown-api"])
async def test_broken_settings_are_reported_not_sent(hass: HomeAssistant, head: ServerProcess,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     subentry: dict[str, Any]) -> None:
    entry = await setup_entry(hass, entry_for(head, **subentry))
    streamed = record_requests(entry, monkeypatch)
    prepared = record_prepares(entry, monkeypatch)
    entity_id = agent_id(hass, entry)

    # nothing to prefill: no request, and no error while the user speaks
    await conversation.async_prepare_agent(hass, entity_id, "en")
    assert prepared == []
    # the conversation says what is wrong instead of asking the head
    result = await conversation.async_converse(hass, "hello", None, Context(),
                                               agent_id=entity_id)
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert result.response.error_code is intent.IntentResponseErrorCode.UNKNOWN
    assert result.response.speech["plain"]["speech"]
    assert streamed == []
    assert await hass.config_entries.async_unload(entry.entry_id)


class SetLight(llm.Tool):
    """A tool whose arguments a random model can complete: an enum and a boolean."""

    name = "set_light"
    description = "Switch the light of a room on or off"
    parameters = vol.Schema({vol.Required("room"): vol.In(["kitchen", "hall"]),
                             vol.Required("on"): bool})
    integration = "test"

    def __init__(self) -> None:
        self.calls: list[tuple[llm.ToolInput, llm.LLMContext]] = []

    async def async_call(self, hass: HomeAssistant, tool_input: llm.ToolInput,
                         llm_context: llm.LLMContext) -> llm.ToolResult:
        self.calls.append((tool_input, llm_context))
        return llm.ToolResult(data={"switched": tool_input.tool_args["room"]})


class LightAPI(llm.API):
    def __init__(self, hass: HomeAssistant, tool: SetLight) -> None:
        super().__init__(hass=hass, id="prima_test_lights", name="Test lights")
        self.tool = tool

    async def async_get_api_instance(self, llm_context: llm.LLMContext) -> llm.APIInstance:
        return llm.APIInstance(api=self, api_prompt="You can switch lights.",
                               llm_context=llm_context, tools=[self.tool])


async def test_a_model_that_cannot_call_tools_is_told_and_the_log_says_so(
        hass: HomeAssistant, toolless_head: ServerProcess, caplog: pytest.LogCaptureFixture
        ) -> None:
    """SmolLM2 has no tool syntax: the agent still answers (the head tells the model it
    cannot act), nothing is called, and the log says once why the API does nothing."""
    tool = SetLight()
    unregister = llm.async_register_api(hass, LightAPI(hass, tool))
    entry = await setup_entry(hass, entry_for(
        toolless_head, **{CONF_LLM_HASS_API: ["prima_test_lights"], CONF_MAX_TOKENS: 16}))
    caplog.set_level(logging.WARNING, logger="custom_components.prima")
    entity_id = agent_id(hass, entry)
    for _ in range(2):
        result = await conversation.async_converse(hass, "switch on the kitchen light", None,
                                                   Context(), agent_id=entity_id)
        assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
        assert result.response.speech["plain"]["speech"]
    unregister()
    assert not tool.calls
    said = [r.getMessage() for r in caplog.records if "cannot call tools" in r.getMessage()]
    assert len(said) == 1 and "Test lights" in said[0], said
    assert "were left out of the prompt, and the model was told that it cannot act" \
        in toolless_head.log()


@pytest.mark.parametrize("family", ["llama3", "hermes", "harmony"])
async def test_tool_call_runs_against_the_head(hass: HomeAssistant, family: str,
                                               head: ServerProcess, moe_head: ServerProcess,
                                               oss_head: ServerProcess,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool call in each family's syntax: Llama 3's JSON (the session's head), Qwen's
    Hermes <tool_call> from a mixture of experts (qwen3moe), and gpt-oss's harmony channels
    (the function named in the message's header). The heads are session fixtures started
    before any test runs (the harness refuses threads a test leaves behind)."""
    head = {"llama3": head, "hermes": moe_head, "harmony": oss_head}[family]
    assert head.status()["model"]["tool_format"] == family
    tool = SetLight()
    unregister = llm.async_register_api(hass, LightAPI(hass, tool))
    # enough tokens for the constrained call: a random model pads JSON with whitespace
    entry = await setup_entry(hass, entry_for(
        head, **{CONF_LLM_HASS_API: ["prima_test_lights"], CONF_MAX_TOKENS: 1024}))

    def force_a_call(index: int, payload: dict[str, Any]) -> dict[str, Any]:
        # The head and its model are real; only this request is steered: a model with random
        # weights never chooses to call a tool by itself, so the first round requires a call
        # (the head then constrains generation to a call valid against the tool's schema).
        # The next round is the agent's own request, unchanged.
        return {**payload, "tool_choice": "required"} if index == 0 else payload

    sent = record_requests(entry, monkeypatch, steer=force_a_call)
    entity_id = agent_id(hass, entry)
    state = hass.states.get(entity_id)
    assert state is not None
    assert state.attributes["supported_features"] == conversation.ConversationEntityFeature.CONTROL

    # as Assist does when the user starts speaking
    prepared = record_prepares(entry, monkeypatch)
    await conversation.async_prepare_agent(hass, entity_id, "en")
    result = await conversation.async_converse(hass, "switch the light", None, Context(),
                                               agent_id=entity_id)
    unregister()

    # the prefill sent what the real request starts with, to the same cache slot: the tools
    # and the system prompt (all of it up to the time, which is rendered to the second)
    [prefill] = prepared
    assert prefill["max_tokens"] == 1
    assert prefill["prompt_cache_key"] == sent[0]["prompt_cache_key"]
    assert prefill["tools"] == sent[0]["tools"]
    system = prefill["messages"][0]["content"]
    assert "You can switch lights." in system
    stable = system[:system.index("Current time is")]
    assert sent[0]["messages"][0]["content"].startswith(stable)

    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE, result
    assert result.response.speech["plain"]["speech"]
    # the tool was offered in OpenAI's shape, its schema converted from voluptuous
    function = sent[0]["tools"][0]["function"]
    assert function["name"] == "set_light"
    assert function["parameters"]["properties"]["room"]["enum"] == ["kitchen", "hall"]

    # the head generated the call; Home Assistant ran it with the head's id and arguments
    assert len(tool.calls) == 1
    tool_input, llm_context = tool.calls[0]
    assert tool_input.tool_name == "set_light"
    assert tool.parameters(tool_input.tool_args) == tool_input.tool_args  # valid, whole
    assert tool_input.id.startswith("call_")
    assert llm_context.platform == DOMAIN
    assert llm_context.assistant == conversation.DOMAIN

    # the second round answered the call: the call and its result went back to the head
    assert len(sent) == 2
    call_message, result_message = sent[1]["messages"][-2:]
    assert call_message["role"] == "assistant"
    [call] = call_message["tool_calls"]
    assert (call["id"], call["type"], call["function"]["name"]) == (
        tool_input.id, "function", "set_light")
    assert json.loads(call["function"]["arguments"]) == tool_input.tool_args
    assert result_message["role"] == "tool"
    assert result_message["tool_call_id"] == tool_input.id
    assert json.loads(result_message["content"]) == {
        "data": {"switched": tool_input.tool_args["room"]}, "error": False}
    assert "tool_choice" not in sent[1]

    with (chat_session.async_get_chat_session(hass, result.conversation_id) as session,
          conversation.async_get_chat_log(hass, session) as chat_log):
        assert [c.role for c in chat_log.content] == [
            "system", "user", "assistant", "tool_result", "assistant"]
        final = chat_log.content[-1]
        assert isinstance(final, conversation.AssistantContent)
        assert final.content == result.response.speech["plain"]["speech"]
        assert not final.tool_calls
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_prepare_puts_the_prompt_in_the_cache(hass: HomeAssistant, head: ServerProcess
                                                    ) -> None:
    # two agents with prompts no other test uses; only the first one is prepared
    words = " ".join(f"rule{i} {uuid.uuid4().hex[:6]}" for i in range(40))
    prompts = [f"{uuid.uuid4().hex} You keep these house rules: {words}." for _ in range(2)]
    base = entry_for(head)  # the subentries' shape as the shared helper writes it
    conv = next(s for s in base.subentries.values() if s.subentry_type == "conversation")
    entry = MockConfigEntry(
        domain=DOMAIN, title="Prima cluster", data=dict(base.data),
        subentries_data=[{"data": {**conv.data, CONF_PROMPT: prompt},
                          "subentry_type": "conversation", "title": f"Agent {i}",
                          "unique_id": None} for i, prompt in enumerate(prompts)])
    await setup_entry(hass, entry)
    registry = er.async_get(hass)
    prepared, control = (
        registry.async_get_entity_id("conversation", DOMAIN, s.subentry_id)
        for s in entry.subentries.values())
    assert prepared is not None and control is not None

    await conversation.async_prepare_agent(hass, prepared, "en")
    cached = []
    for entity_id in (prepared, control):
        result = await conversation.async_converse(hass, "hello", None, Context(),
                                                   agent_id=entity_id, language="en")
        assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
        stats = last_stats()
        cached.append((stats["timings"]["cache_n"], stats["usage"]["prompt_tokens"]))
    (prepared_n, prepared_total), (control_n, control_total) = cached
    # the prepared agent's prompt was evaluated while "the user spoke": most of its request
    # came from the cache; the other agent's prompt had to be evaluated in full
    assert prepared_n > prepared_total / 2, cached
    assert control_n < control_total / 2, cached
    assert await hass.config_entries.async_unload(entry.entry_id)


# -- the pure parts --------------------------------------------------------------------------


def test_thinking_is_split_off() -> None:
    splitter = ThinkSplitter()
    pieces = []
    for text in ("  <thi", "nk>weigh", "ing</th", "ink>\n\n", "The answer", "."):
        pieces += splitter.feed(text)
    pieces += splitter.flush()
    thinking = "".join(t for k, t in pieces if k == "thinking_content")
    content = "".join(t for k, t in pieces if k == "content")
    assert (thinking, content) == ("weighing", "The answer.")

    plain = ThinkSplitter()
    assert plain.feed("<b>bold</b>") == [("content", "<b>bold</b>")]
    unfinished = ThinkSplitter()
    assert unfinished.feed("<think>still thin") + unfinished.flush() == [
        ("thinking_content", "still thin")]


def test_arguments_repaired() -> None:
    assert repair_arguments({"name": "x", "area": "", "floor": None, "ids": '["a", "b"]',
                             "obj": '{"k": 1}', "text": "[not json", "note": "[not, json]"}
                            ) == {"name": "x", "ids": ["a", "b"], "obj": {"k": 1},
                                  "text": "[not json", "note": "[not, json]"}


def test_head_errors_as_told_to_the_user() -> None:
    assert llm_error(PrimaAuthError("no")).translation_key == "llm_auth"
    assert llm_error(PrimaConnectionError("gone")).translation_key == "llm_unreachable"
    refused = llm_error(PrimaResponseError(500, "internal_error", "a bug"))
    assert refused.translation_key == "llm_refused"
    assert refused.translation_placeholders == {"message": "a bug"}


def test_chat_log_entries_as_messages() -> None:
    call = llm.ToolInput(id="call_1", tool_name="set_light", tool_args={"on": True})
    external = llm.ToolInput(tool_name="web_search", tool_args={}, external=True)
    assert convert_content(conversation.AssistantContent(
        agent_id="a", content=None, thinking_content="hm", tool_calls=[call, external])) == {
        "role": "assistant", "content": None, "reasoning_content": "hm",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "set_light", "arguments": '{"on":true}'}}]}
    # only a message with calls may go without content (the provider's own calls do not count)
    assert convert_content(conversation.AssistantContent(
        agent_id="a", content=None, tool_calls=[external])) == {
        "role": "assistant", "content": ""}
    assert convert_content(conversation.ToolResultContent(
        agent_id="a", tool_call_id="call_1", tool_name="set_light",
        result=llm.ToolResult(data={"ok": 1}))) == {
        "role": "tool", "tool_call_id": "call_1", "name": "set_light",
        "content": '{"data":{"ok":1},"error":false}'}
    # attachments are read first (off the event loop) and follow the user's words
    with_file = conversation.UserContent(content="sum up", attachments=[
        conversation.Attachment(media_content_id="media-source://x", mime_type="text/plain",
                                path=Path("x.txt"))])
    with pytest.raises(ValueError, match="read_attachments"):
        convert_content(with_file)
    assert convert_content(with_file, '<file name="x.txt">\nhi\n</file>') == {
        "role": "user", "content": 'sum up\n\n<file name="x.txt">\nhi\n</file>'}


def test_trim_keeps_whole_turns() -> None:
    messages = [{"role": "system"}, {"role": "user", "n": 1}, {"role": "assistant"},
                {"role": "user", "n": 2}, {"role": "assistant"},
                {"role": "user", "n": 3}, {"role": "assistant", "tool_calls": []},
                {"role": "tool"}, {"role": "assistant"}, {"role": "user", "n": 4}]
    assert trim_history(messages, 3) == messages
    # three earlier turns over a limit of two: back to one, the tool call with its result
    assert trim_history(messages, 2) == [messages[0], *messages[5:]]
    assert trim_history([*messages[:5], messages[-1]], 1) == [messages[0], messages[-1]]
    assert trim_history(messages, 0) == [messages[0], messages[-1]]


@pytest.mark.parametrize("max_history", [1, 2, 5, 10])
def test_trim_keeps_the_prefix_between_cuts(max_history: int) -> None:
    """Over a long conversation, each request only appends to the one before, except when a
    cut drops the oldest turns; a cut goes back to half the limit, so cuts are rare."""
    log: list[dict[str, Any]] = [{"role": "system", "content": "prompt"}]
    requests: list[list[dict[str, Any]]] = []
    turn_of: list[int] = []  # the turn each request belongs to

    def send(turn: int) -> list[dict[str, Any]]:
        request = trim_history(log, max_history)
        requests.append(request)
        turn_of.append(turn)
        return request

    for turn in range(4 * max_history + 6):
        log.append({"role": "user", "content": f"question {turn}"})
        if turn % 3 == 1:  # some turns call a tool: one more request, in the same turn
            send(turn)
            log += [{"role": "assistant", "content": "", "tool_calls": [{"id": f"c{turn}"}]},
                    {"role": "tool", "tool_call_id": f"c{turn}", "content": "{}"}]
        request = send(turn)
        # what is sent is the system prompt and an unbroken tail of the conversation
        assert request[0] is log[0]
        assert request[1:] == log[len(log) - len(request) + 1:]
        assert request[1]["role"] == "user"  # whole turns only
        assert len(user_turns(request)) - 1 <= max_history
        log.append({"role": "assistant", "content": f"answer {turn}"})

    # a cut: a request that does not start with the whole request before it
    cuts = [i + 1 for i, (before, after) in enumerate(itertools.pairwise(requests))
            if after[:len(before)] != before]
    assert cuts, "the conversation never passed the limit"
    for i in cuts:  # a cut goes back to half the limit of earlier turns
        assert len(user_turns(requests[i])) - 1 == max_history // 2
        assert turn_of[i] != turn_of[i - 1]  # never within a turn's tool rounds
    # so the turns from there up to the limit all reuse the cached prefix
    for first, second in itertools.pairwise(cuts):
        assert turn_of[second] - turn_of[first] == max_history + 1 - max_history // 2


# -- thinking, tool calls and stats from the head's chunks ---------------------------------


def split(splitter: ThinkSplitter, texts: list[str]) -> tuple[str, str]:
    pieces = []
    for text in texts:
        pieces += splitter.feed(text)
    pieces += splitter.flush()
    return ("".join(t for k, t in pieces if k == "thinking_content"),
            "".join(t for k, t in pieces if k == "content"))


def test_thinking_without_its_opening_tag() -> None:
    # a DeepSeek-R1 style template ends the prompt with "<think>\n": the answer only closes it
    splitter = ThinkSplitter(implicit_open=True)
    assert splitter.feed("Let me ") == []  # held back: thinking unless no closing tag comes
    assert splitter.feed("weigh it</th") == []
    assert splitter.feed("ink>\n\nThe answer") == [("thinking_content", "Let me weigh it"),
                                                   ("content", "The answer")]
    assert splitter.feed(".") == [("content", ".")]
    assert splitter.flush() == []
    # the stream ended without a closing tag: it was the answer, not thinking
    assert split(ThinkSplitter(implicit_open=True), ["The ", "answer."]) == ("", "The answer.")
    # an opening tag in the answer still works the same, in pieces or whole
    assert split(ThinkSplitter(implicit_open=True), ["<think>abc</think>\nx"]) == ("abc", "x")
    assert split(ThinkSplitter(implicit_open=True), ["<think>a", "</think>b"]) == ("a", "b")
    # an empty thought
    assert split(ThinkSplitter(implicit_open=True), ["\n</think>\n\nb"]) == ("", "b")
    # without thinking enabled, a closing tag alone is text
    assert split(ThinkSplitter(), ["a</think>b"]) == ("", "a</think>b")


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"choices": choices, **extra}


async def run_stream(chunks: list[dict[str, Any]], tools_offered: bool = True,
                     think: bool = False) -> tuple[list[dict[str, Any]], RoundStats]:
    async def source() -> AsyncIterator[dict[str, Any]]:
        for item in chunks:
            yield item

    stats = RoundStats()
    deltas = [dict(d) async for d in transform_stream(source(), stats, tools_offered, think)]
    return deltas, stats


async def test_streamed_call_pieces_are_joined_and_repaired() -> None:
    # OpenAI-style servers send a call in pieces; small models leave empty arguments and write
    # arrays as strings
    deltas, stats = await run_stream([
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {
            "name": "HassTurnOn", "arguments": '{"name": "lamp", "area": ""'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {
            "arguments": ', "domain": "[\\"light\\"]", "floor": null}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"name": "GetLiveContext"}}]}),
        chunk({}, "tool_calls", timings={"cache_n": 3}),
        chunk(usage={"prompt_tokens": 9}),
    ])
    assert deltas[0] == {"role": "assistant"}
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [(c.tool_name, c.tool_args) for c in calls] == [
        ("HassTurnOn", {"name": "lamp", "domain": ["light"]}),
        ("GetLiveContext", {})]  # a function without parameters
    # the server's id where it gave one, Home Assistant's own otherwise
    assert calls[0].id == "call_a"
    assert calls[1].id and calls[1].id != "call_a"
    assert not any("content" in d for d in deltas)
    assert (stats.finish_reason, stats.timings, stats.usage) == (
        "tool_calls", {"cache_n": 3}, {"prompt_tokens": 9})


async def test_call_cut_short_is_an_error() -> None:
    with pytest.raises(HomeAssistantError) as err:
        await run_stream([chunk({"role": "assistant"}),
                          chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {
                              "name": "HassTurnOn", "arguments": '{"name": "la'}}]}),
                          chunk({}, "length")])
    assert err.value.translation_key == "bad_tool_call"
    assert err.value.translation_placeholders == {"tool": "HassTurnOn", "reason": "length"}


async def test_calls_without_tools_offered_are_dropped() -> None:
    deltas, _stats = await run_stream([
        chunk({"role": "assistant", "content": "Done"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {
            "name": "HassTurnOn", "arguments": "{}"}}]}),
        chunk({}, "tool_calls")], tools_offered=False)
    assert deltas == [{"role": "assistant"}, {"content": "Done"}]


async def test_reasoning_the_head_separated_is_thinking_content() -> None:
    """gpt-oss's analysis channel arrives as reasoning_content: never part of the answer."""
    deltas, _stats = await run_stream([
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "The user wants "}), chunk({"reasoning_content": "light."}),
        chunk({"content": "Done."}), chunk({}, "stop")])
    assert deltas == [{"role": "assistant"}, {"thinking_content": "The user wants "},
                      {"thinking_content": "light."}, {"content": "Done."}]


async def test_stream_splits_thinking_when_enabled() -> None:
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "hm</think>"}),
              chunk({"content": "Yes."}), chunk({}, "stop")]
    deltas, _stats = await run_stream(chunks, think=True)
    assert deltas == [{"role": "assistant"}, {"thinking_content": "hm"}, {"content": "Yes."}]
    deltas, _stats = await run_stream(chunks)
    assert deltas == [{"role": "assistant"}, {"content": "hm</think>"}, {"content": "Yes."}]
    # thinking enabled, but the answer never closed it: all of it is the answer, at the end
    deltas, _stats = await run_stream([chunk({"role": "assistant", "content": ""}),
                                       chunk({"content": "Yes"}), chunk({"content": "."}),
                                       chunk({}, "stop")], think=True)
    assert deltas == [{"role": "assistant"}, {"content": "Yes."}]
