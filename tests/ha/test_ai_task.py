"""AI Task against a real head node: structured data the head's JSON schema enforcement makes
parse, plain text, an answer cut short reported as such, and attachments as users attach them
(files of the local media source): text read into the prompt, the rest refused with a reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import voluptuous as vol
from conftest import entry_for
from homeassistant.components import ai_task
from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.translation import async_get_translations
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry
from server_process import ServerProcess

from custom_components.prima.attachments import MAX_ATTACHMENT_BYTES
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
    assert state.attributes["supported_features"] == (
        ai_task.AITaskEntityFeature.GENERATE_DATA
        | ai_task.AITaskEntityFeature.SUPPORT_ATTACHMENTS)
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


@pytest.fixture
async def media(hass: HomeAssistant, tmp_path: Path) -> Path:
    """The local media folder, as a user's attachments come from it."""
    folder = tmp_path / "media"
    folder.mkdir()
    hass.config.media_dirs = {"local": str(folder)}
    assert await async_setup_component(hass, "media_source", {})
    return folder


def attach(name: str, mime_type: str) -> dict[str, str]:
    return {"media_content_id": f"media-source://media_source/local/{name}",
            "media_content_type": mime_type}


async def test_text_attachments_reach_the_model(hass: HomeAssistant, head: ServerProcess,
                                                media: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (media / "shopping.txt").write_text("milk\nbread\neggs\n")
    (media / "rooms.json").write_text('{"kitchen": 2, "hall": 1}')
    entry, entity_id = await task_entry(hass, head, 24)
    sent = record_requests(entry, monkeypatch)
    result = await ai_task.async_generate_data(
        hass, task_name="Sum up", entity_id=entity_id, instructions="Sum up the files.",
        attachments=[attach("shopping.txt", "text/plain"),
                     attach("rooms.json", "application/json")])
    assert isinstance(result.data, str) and result.data  # the head took the longer prompt
    [payload] = sent
    user = payload["messages"][-1]
    assert user["role"] == "user"
    assert user["content"] == (
        "Sum up the files.\n\n"
        '<file name="shopping.txt" type="text/plain">\nmilk\nbread\neggs\n</file>\n\n'
        '<file name="rooms.json" type="application/json">\n{"kitchen": 2, "hall": 1}\n</file>')
    assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.mark.parametrize(("name", "mime_type", "content", "key"), [
    ("porch.png", "image/png", b"\x89PNG\r\n\x1a\n", "attachment_image"),
    ("manual.pdf", "application/pdf", b"%PDF-1.7", "attachment_unsupported"),
    ("latin1.txt", "text/plain", "caf\u00e9".encode("latin-1"), "attachment_not_text"),
    ("huge.txt", "text/plain", None, "attachment_too_large"),
], ids=["image", "pdf", "latin-1", "too-large"])
async def test_attachments_the_model_cannot_read_are_refused_with_the_reason(
        hass: HomeAssistant, head: ServerProcess, media: Path, monkeypatch: pytest.MonkeyPatch,
        name: str, mime_type: str, content: bytes | None, key: str) -> None:
    (media / name).write_bytes(b"x" * (MAX_ATTACHMENT_BYTES + 1) if content is None else content)
    entry, entity_id = await task_entry(hass, head, 24)
    sent = record_requests(entry, monkeypatch)
    with pytest.raises(HomeAssistantError) as err:
        await ai_task.async_generate_data(
            hass, task_name="Look", entity_id=entity_id, instructions="What is this?",
            attachments=[attach(name, mime_type)])
    assert err.value.translation_key == key
    placeholders = err.value.translation_placeholders or {}
    assert (placeholders["name"], placeholders["type"]) == (name, mime_type)
    assert not sent  # nothing went to the head
    # the message the user reads names the file and says what to do
    messages = await async_get_translations(hass, "en", "exceptions", [DOMAIN])
    text = messages[f"component.{DOMAIN}.exceptions.{key}.message"].format(**placeholders)
    assert name in text and "{" not in text
    assert await hass.config_entries.async_unload(entry.entry_id)
