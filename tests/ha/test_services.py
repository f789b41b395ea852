"""The ``prima.generate`` action against a real head node."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import voluptuous as vol
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.prima.api import PrimaClient
from custom_components.prima.const import DOMAIN

#: a schema a random model completes quickly: an enum and a boolean
LIGHT_SCHEMA = {"type": "object",
                "properties": {"room": {"type": "string", "enum": ["kitchen", "hall"]},
                               "on": {"type": "boolean"}},
                "required": ["room", "on"], "additionalProperties": False}


async def generate(hass: HomeAssistant, **data: Any) -> dict[str, Any]:
    response = await hass.services.async_call(DOMAIN, "generate", data, blocking=True,
                                              return_response=True)
    assert isinstance(response, dict)
    return response


# Every test that samples gives a seed or samples greedily: a model with random weights then
# answers the same on every run, so no test passes or fails by chance.


async def test_text_and_timings(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    response = await generate(hass, prompt="Say hello", system_prompt="Be brief.",
                              max_tokens=8, temperature=0.5, seed=11,
                              config_entry_id=loaded_entry.entry_id)
    assert isinstance(response["text"], str) and response["text"]
    assert response["finish_reason"] in ("stop", "length")
    assert "data" not in response
    timings, usage = response["timings"], response["usage"]
    assert timings["predicted_n"] == usage["completion_tokens"] <= 8
    assert timings["prompt_n"] + timings["cache_n"] == usage["prompt_tokens"]


@pytest.mark.parametrize("as_text", [False, True], ids=["object", "json-text"])
async def test_json_schema_is_enforced(hass: HomeAssistant, loaded_entry: MockConfigEntry,
                                       as_text: bool) -> None:
    schema = json.dumps(LIGHT_SCHEMA) if as_text else LIGHT_SCHEMA
    response = await generate(hass, prompt="Which light?", json_schema=schema, max_tokens=512,
                              temperature=0)
    assert response["finish_reason"] == "stop"
    data = response["data"]
    assert data == json.loads(response["text"])
    assert set(data) == {"room", "on"}
    assert data["room"] in ("kitchen", "hall")
    assert isinstance(data["on"], bool)


async def test_seed_repeats_the_answer(hass: HomeAssistant, loaded_entry: MockConfigEntry
                                       ) -> None:
    # hot sampling: without the seed two answers of 16 tokens would all but never agree
    call = {"prompt": "Tell me something", "max_tokens": 16, "temperature": 1.5, "top_p": 1,
            "seed": 2**64 - 1}
    first, second = await generate(hass, **call), await generate(hass, **call)
    assert first["text"] and first["text"] == second["text"]
    assert first["usage"]["completion_tokens"] == second["usage"]["completion_tokens"]
    # the head's range of seeds, checked before the head is asked
    with pytest.raises(vol.Invalid):
        await generate(hass, prompt="x", seed=2**64)


async def test_invalid_schema_text(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    with pytest.raises(ServiceValidationError) as err:
        await generate(hass, prompt="x", json_schema='{"type": "object",')
    assert err.value.translation_key == "invalid_schema"
    with pytest.raises(ServiceValidationError) as err:
        await generate(hass, prompt="x", json_schema="[1, 2]")
    assert err.value.translation_key == "invalid_schema"


async def test_schema_the_head_refuses(hass: HomeAssistant, loaded_entry: MockConfigEntry
                                       ) -> None:
    with pytest.raises(ServiceValidationError) as err:
        await generate(hass, prompt="x", json_schema={"type": "nonsense"})
    assert err.value.translation_key == "request_refused"
    assert "nonsense" in err.value.translation_placeholders["error"]  # the head's own words


async def test_json_cut_short(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    with pytest.raises(HomeAssistantError) as err:
        await generate(hass, prompt="x", json_schema=LIGHT_SCHEMA, max_tokens=2)
    assert err.value.translation_key == "incomplete_data"
    assert err.value.translation_placeholders == {"reason": "length"}


async def test_no_loaded_cluster(hass: HomeAssistant) -> None:
    assert await async_setup_component(hass, DOMAIN, {})
    with pytest.raises(ServiceValidationError) as err:
        await generate(hass, prompt="x")
    assert err.value.translation_key == "no_entry"


async def test_unknown_entry(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    with pytest.raises(ServiceValidationError) as err:
        await generate(hass, prompt="x", config_entry_id="not-an-entry")
    assert err.value.translation_key == "no_entry"


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("fault", ["unreachable", "wrong-key", "wrong-path"])
async def test_head_failures(hass: HomeAssistant, loaded_entry: MockConfigEntry,
                             monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    # the action's client pointed at a head that is gone, refuses the key, or has no such
    # endpoint (the coordinator keeps its own, working client)
    client = loaded_entry.runtime_data.client
    url, key = client.url, client.api_key
    if fault == "unreachable":
        url = f"http://127.0.0.1:{closed_port()}"
    elif fault == "wrong-key":
        key = "not-the-key"
    else:
        url += "/nowhere"
    monkeypatch.setattr(loaded_entry.runtime_data, "client", PrimaClient(client.session, url, key))
    with pytest.raises(HomeAssistantError) as err:
        await generate(hass, prompt="x", max_tokens=1)
    # not the caller's fault: no validation error
    assert not isinstance(err.value, ServiceValidationError)
    assert err.value.translation_key == "generate_failed"
    assert err.value.translation_placeholders["error"]
