"""Diagnostics: the entry's settings (without its key) and the head's newest status document."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from homeassistant.components.diagnostics import async_redact_data

from .const import CONF_API_KEY

if TYPE_CHECKING:
    from homeassistant.core import HomeAssistant

    from . import PrimaConfigEntry

TO_REDACT = {CONF_API_KEY}


async def async_get_config_entry_diagnostics(hass: HomeAssistant, entry: PrimaConfigEntry
                                             ) -> dict[str, Any]:
    coordinator = entry.runtime_data.coordinator
    return {
        "entry": {
            "title": entry.title,
            "version": f"{entry.version}.{entry.minor_version}",
            "data": async_redact_data(entry.data, TO_REDACT),
            "options": async_redact_data(entry.options, TO_REDACT),
        },
        "subentries": [
            {"subentry_type": subentry.subentry_type, "title": subentry.title,
             "data": async_redact_data(subentry.data, TO_REDACT)}
            for subentry in entry.subentries.values()
        ],
        "event_stream_connected": coordinator.pushing,
        "last_update_success": coordinator.last_update_success,
        "nodes_missing_for_s": {node_id: round(coordinator.missing_for(node_id), 1)
                                for node_id in coordinator.known_nodes},
        "status": coordinator.data,
    }
