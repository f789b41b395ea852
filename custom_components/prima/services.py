"""The ``prima.generate`` action: one answer from the cluster's model, for automations.

For ordinary automations ``ai_task.generate_data`` is the portable choice; this action adds
what only this cluster has: a raw system prompt, a JSON schema the head enforces while it
generates, sampling overrides, and the head's timings in the response.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import probatio as vol
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant, ServiceCall, ServiceResponse, SupportsResponse
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import config_validation as cv

from .api import PrimaError, PrimaResponseError
from .const import DOMAIN

if TYPE_CHECKING:
    from . import PrimaConfigEntry

SERVICE_GENERATE = "generate"
ATTR_CONFIG_ENTRY = "config_entry_id"
ATTR_PROMPT = "prompt"
ATTR_SYSTEM_PROMPT = "system_prompt"
ATTR_SCHEMA = "json_schema"
ATTR_TEMPERATURE = "temperature"
ATTR_TOP_P = "top_p"
ATTR_MAX_TOKENS = "max_tokens"
ATTR_SEED = "seed"
#: the seeds the head accepts (docs/api.md, request fields)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

GENERATE_SCHEMA = vol.Schema({
    vol.Optional(ATTR_CONFIG_ENTRY): cv.string,
    vol.Required(ATTR_PROMPT): cv.string,
    vol.Optional(ATTR_SYSTEM_PROMPT): cv.string,
    vol.Optional(ATTR_SCHEMA): vol.Any(dict, cv.string),
    vol.Optional(ATTR_TEMPERATURE): vol.All(vol.Coerce(float), vol.Range(min=0, max=2)),
    vol.Optional(ATTR_TOP_P): vol.All(vol.Coerce(float), vol.Range(min=0, max=1)),
    vol.Optional(ATTR_MAX_TOKENS): vol.All(vol.Coerce(int), vol.Range(min=1, max=32768)),
    vol.Optional(ATTR_SEED): vol.All(vol.Coerce(int), vol.Range(min=SEED_MIN, max=SEED_MAX)),
})


def _entry(hass: HomeAssistant, entry_id: str | None) -> PrimaConfigEntry:
    """The loaded cluster entry the call names, or the only one there is."""
    entries = [e for e in hass.config_entries.async_entries(DOMAIN)
               if e.state is ConfigEntryState.LOADED]
    if entry_id is not None:
        entries = [e for e in entries if e.entry_id == entry_id]
    if len(entries) != 1:
        raise ServiceValidationError(
            translation_domain=DOMAIN,
            translation_key="no_entry" if not entries else "several_entries")
    entry: PrimaConfigEntry = entries[0]
    return entry


def _schema(value: Any) -> dict[str, Any]:
    """The JSON schema of the call: an object, given as one or as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ServiceValidationError(translation_domain=DOMAIN,
                                         translation_key="invalid_schema",
                                         translation_placeholders={"error": str(exc)}) from exc
    if not isinstance(value, dict):
        raise ServiceValidationError(translation_domain=DOMAIN, translation_key="invalid_schema",
                                     translation_placeholders={"error": "not an object"})
    return value


async def _generate(call: ServiceCall) -> ServiceResponse:
    # everything the call can get wrong is checked before the head is asked
    schema = _schema(call.data[ATTR_SCHEMA]) if ATTR_SCHEMA in call.data else None
    entry = _entry(call.hass, call.data.get(ATTR_CONFIG_ENTRY))
    messages = []
    if ATTR_SYSTEM_PROMPT in call.data:
        messages.append({"role": "system", "content": call.data[ATTR_SYSTEM_PROMPT]})
    messages.append({"role": "user", "content": call.data[ATTR_PROMPT]})
    payload: dict[str, Any] = {"model": "prima", "messages": messages}
    for key in (ATTR_TEMPERATURE, ATTR_TOP_P, ATTR_MAX_TOKENS, ATTR_SEED):
        if key in call.data:
            payload[key] = call.data[key]
    if schema is not None:
        payload["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "result", "schema": schema}}
    try:
        answer = await entry.runtime_data.client.chat(payload)
    except PrimaResponseError as exc:
        if exc.status == 400:  # the call asked for something the head cannot do
            raise ServiceValidationError(
                translation_domain=DOMAIN, translation_key="request_refused",
                translation_placeholders={"error": str(exc)}) from exc
        raise HomeAssistantError(translation_domain=DOMAIN, translation_key="generate_failed",
                                 translation_placeholders={"error": str(exc)}) from exc
    except PrimaError as exc:
        raise HomeAssistantError(translation_domain=DOMAIN, translation_key="generate_failed",
                                 translation_placeholders={"error": str(exc)}) from exc
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise HomeAssistantError(translation_domain=DOMAIN, translation_key="generate_failed",
                                 translation_placeholders={"error": "an answer without choices"})
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    result: dict[str, Any] = {"text": text, "finish_reason": choice.get("finish_reason"),
                              "usage": answer.get("usage"), "timings": answer.get("timings")}
    if schema is not None:
        try:
            # Python's parser, not orjson: a schema's integer may exceed 64 bits
            result["data"] = json.loads(text)
        except ValueError as exc:  # cut short by max_tokens: the JSON is not whole
            raise HomeAssistantError(
                translation_domain=DOMAIN, translation_key="incomplete_data",
                translation_placeholders={"reason": str(choice.get("finish_reason"))}) from exc
    return result


def async_setup_services(hass: HomeAssistant) -> None:
    """Register the integration's actions (once, whatever entries are loaded)."""
    hass.services.async_register(DOMAIN, SERVICE_GENERATE, _generate, schema=GENERATE_SCHEMA,
                                 supports_response=SupportsResponse.ONLY)
