"""Diagnostics: what a user attaches to a bug report must not carry the head's API key."""

from __future__ import annotations

import json

from conftest import API_KEY, head_url
from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator
from server_process import ServerProcess

from custom_components.prima.const import CONF_API_KEY, CONF_MAX_TOKENS, CONF_URL


async def test_diagnostics(hass: HomeAssistant, hass_client: ClientSessionGenerator,
                           head: ServerProcess, loaded_entry: MockConfigEntry) -> None:
    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, loaded_entry)

    assert API_KEY not in json.dumps(diagnostics)
    entry = diagnostics["entry"]
    assert isinstance(entry, dict)
    assert entry["data"] == {CONF_URL: head_url(head), CONF_API_KEY: "**REDACTED**"}
    subentries = diagnostics["subentries"]
    assert isinstance(subentries, list)
    assert sorted(s["subentry_type"] for s in subentries) == ["ai_task_data", "conversation"]
    ai_task = next(s for s in subentries if s["subentry_type"] == "ai_task_data")
    assert ai_task["data"][CONF_MAX_TOKENS] == 48
    status = diagnostics["status"]
    assert isinstance(status, dict)
    assert status["node_id"] == head.status()["node_id"]
    assert status["state"] == "ready"
