"""AI Task against a real head node: structured data the head's JSON schema enforcement makes
parse, plain text, and an answer cut short reported as such."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import voluptuous as vol
from conftest import entry_for
from homeassistant.components import ai_task
from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry
from server_process import ServerProcess

from custom_components.prima.const import CONF_MAX_TOKENS, CONF_TEMPERATURE, DOMAIN


async def task_entry(hass: HomeAssistant, head: ServerProcess, max_tokens: int
                     ) -> tuple[MockConfigEntry, str]:
    """An entry whose AI Task subentry may generate ``max_tokens``; and the entity's id.

    The subentry samples greedily (temperature 0): a model with random weights then gives the
    same answer on every run, so a test cannot pass or fail by chance.
    """
    entry = entry_for(head)
    entry.add_to_hass(hass)
    subentry = next(s for s in entry.subentries.values() if s.subentry_type == "ai_task_data")
    hass.config_entries.async_update_subentry(
        entry, subentry, data={**subentry.data, CONF_MAX_TOKENS: max_tokens,
                               CONF_TEMPERATURE: 0})
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    entity_id = er.async_get(hass).async_get_entity_id("ai_task", DOMAIN, subentry.subentry_id)
    assert entity_id is not None
    return entry, entity_id


def record_requests(entry: ConfigEntry, monkeypatch: pytest.MonkeyPatch
                    ) -> list[dict[str, Any]]:
    """Every payload the entry's real client streams, passed on unchanged."""
    client = entry.runtime_data.client
    real = client.chat_stream
    sent: list[dict[str, Any]] = []

    def chat_stream(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        sent.append(payload)
        return real(payload)

    monkeypatch.setattr(client, "chat_stream", chat_stream)
    return sent


async def test_structured_data_follows_the_schema(hass: HomeAssistant, head: ServerProcess,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # bounded values: a random model would otherwise write strings and numbers as long as the
    # token budget allows; the head enforces the bounds while it generates
    entry, entity_id = await task_entry(hass, head, 512)
    sent = record_requests(entry, monkeypatch)
    result = await ai_task.async_generate_data(
        hass, task_name="Count things", entity_id=entity_id,
        instructions="Name a thing in the house and how many there are.",
        structure=vol.Schema({vol.Required("name"): vol.All(str, vol.Length(min=1, max=12)),
                              vol.Required("count"): vol.All(int, vol.Range(min=0, max=99))}))

    # the head constrained the answer to the schema, so it parsed to the right types
    assert isinstance(result.data, dict), result.data
    assert set(result.data) == {"name", "count"}
    assert isinstance(result.data["name"], str) and 1 <= len(result.data["name"]) <= 12
    count = result.data["count"]
    assert isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= 99
    [payload] = sent
    fmt = payload["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "count_things"
    assert fmt["json_schema"]["schema"]["properties"] == {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 99}}
    assert fmt["json_schema"]["schema"]["additionalProperties"] is False
    assert (payload["max_tokens"], payload["temperature"]) == (512, 0)
    assert [m["role"] for m in payload["messages"]] == ["system", "user"]
    assert payload["messages"][1]["content"] == (
        "Name a thing in the house and how many there are.")
    state = hass.states.get(entity_id)
    assert state is not None
    assert state.attributes["supported_features"] == ai_task.AITaskEntityFeature.GENERATE_DATA
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_text_without_structure(hass: HomeAssistant, head: ServerProcess) -> None:
    entry, entity_id = await task_entry(hass, head, 48)
    result = await ai_task.async_generate_data(
        hass, task_name="Note", entity_id=entity_id, instructions="Write a note.")
    assert isinstance(result.data, str) and result.data
    assert result.conversation_id
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_answer_cut_short_is_an_error(hass: HomeAssistant, head: ServerProcess) -> None:
    # no JSON document of this schema fits in 3 tokens: the head stops with "length"
    entry, entity_id = await task_entry(hass, head, 3)
    with pytest.raises(HomeAssistantError) as err:
        await ai_task.async_generate_data(
            hass, task_name="Count", entity_id=entity_id, instructions="Count.",
            structure=vol.Schema({vol.Required("name"): str, vol.Required("count"): int}))
    assert err.value.translation_key == "incomplete_data"
    assert err.value.translation_placeholders == {"reason": "length"}
    assert await hass.config_entries.async_unload(entry.entry_id)
