"""Prima Home Cluster: a language model running across the home's own devices.

The head node serves an OpenAI-compatible API and a status document; this integration
follows the status (a device per node, sensors), offers the model to Assist (conversation),
to AI Task and to automations (``prima.generate``), and never runs inference itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.typing import ConfigType

from .api import PrimaClient
from .const import CONF_API_KEY, CONF_URL, DOMAIN
from .coordinator import PrimaCoordinator, cluster_nodes
from .entity import cluster_device
from .services import async_setup_services

PLATFORMS = (Platform.AI_TASK, Platform.BINARY_SENSOR, Platform.BUTTON, Platform.CONVERSATION,
             Platform.SENSOR)
CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)


@dataclass
class PrimaData:
    """What a loaded entry holds: the head's client and the cluster's coordinator."""

    client: PrimaClient
    coordinator: PrimaCoordinator


type PrimaConfigEntry = ConfigEntry[PrimaData]


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    async_setup_services(hass)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: PrimaConfigEntry) -> bool:
    client = PrimaClient(async_get_clientsession(hass), entry.data[CONF_URL],
                         entry.data.get(CONF_API_KEY))
    coordinator = PrimaCoordinator(hass, entry, client)
    # a refused key starts re-authentication; an unreachable head retries the set-up
    await coordinator.async_config_entry_first_refresh()
    coordinator.seed_from_registry()
    # the hub first: node and assistant devices hang under it (via_device_id)
    coordinator.hub_device_id = dr.async_get(hass).async_get_or_create(
        config_entry_id=entry.entry_id, **cluster_device(coordinator)).id
    entry.runtime_data = PrimaData(client, coordinator)
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    coordinator.start_push()
    entry.async_on_unload(entry.add_update_listener(_async_update_listener))
    return True


async def _async_update_listener(hass: HomeAssistant, entry: PrimaConfigEntry) -> None:
    await hass.config_entries.async_reload(entry.entry_id)


async def async_remove_entry(hass: HomeAssistant, entry: PrimaConfigEntry) -> None:
    """The entry is deleted: its repair issues go with it."""
    registry = ir.async_get(hass)
    prefix = f"{entry.entry_id}_"
    for domain, issue_id in list(registry.issues):
        if domain == DOMAIN and issue_id.startswith(prefix):
            ir.async_delete_issue(hass, DOMAIN, issue_id)


async def async_remove_config_entry_device(hass: HomeAssistant, entry: PrimaConfigEntry,
                                           device: dr.DeviceEntry) -> bool:
    """A node's device may be deleted by hand once the head no longer lists the node (online
    or not: it would come back with the next status); the cluster hub and the assistants stay
    while the entry does."""
    coordinator = entry.runtime_data.coordinator
    listed = {n["node_id"] for n in cluster_nodes(coordinator.data)}
    for domain, ident in device.identifiers:
        if domain == DOMAIN and ident in coordinator.known_nodes:
            if ident in listed:
                return False
            coordinator.known_nodes.pop(ident, None)
            coordinator.last_seen.pop(ident, None)
            return True
    return False


async def async_unload_entry(hass: HomeAssistant, entry: PrimaConfigEntry) -> bool:
    unloaded = await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
    if unloaded:
        await entry.runtime_data.coordinator.async_shutdown()
    return unloaded
