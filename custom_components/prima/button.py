"""Buttons: plan the ring again (measure the nodes and links, hand out the layers anew).

The head plans by itself when nodes join or leave; the button is for after a change it cannot
see, such as a node whose load changed for good. A lone node has no ring: the button is added
once the head runs one (and is unavailable while a ring that had it is down to one node).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from homeassistant.components.button import ButtonEntity, ButtonEntityDescription
from homeassistant.const import EntityCategory, Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError

from .api import PrimaClient, PrimaError
from .const import DOMAIN
from .coordinator import PrimaCoordinator
from .entity import PrimaClusterEntity, async_add_cluster_entities

if TYPE_CHECKING:
    from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

    from . import PrimaConfigEntry

PARALLEL_UPDATES = 0


def _is_ring(doc: dict[str, Any]) -> bool:
    cluster = doc.get("cluster")
    return isinstance(cluster, dict) and cluster.get("mode") == "ring"


async def _replan(client: PrimaClient) -> None:
    await client.plan()


@dataclass(frozen=True, kw_only=True)
class PrimaButtonDescription(ButtonEntityDescription):
    """An action on the cluster: what it calls, when it applies, the error it raises."""

    press_fn: Callable[[PrimaClient], Awaitable[None]]
    available_fn: Callable[[dict[str, Any]], bool]
    error_key: str


CLUSTER_BUTTONS: tuple[PrimaButtonDescription, ...] = (
    PrimaButtonDescription(
        key="replan",
        entity_category=EntityCategory.CONFIG,
        press_fn=_replan,
        available_fn=_is_ring,
        error_key="replan_failed",
    ),
)


async def async_setup_entry(hass: HomeAssistant, entry: PrimaConfigEntry,
                            async_add_entities: AddConfigEntryEntitiesCallback) -> None:
    async_add_cluster_entities(entry, async_add_entities, Platform.BUTTON, CLUSTER_BUTTONS,
                               PrimaClusterButton, lambda d, doc: d.available_fn(doc))


class PrimaClusterButton(PrimaClusterEntity, ButtonEntity):
    """An action on the whole cluster."""

    entity_description: PrimaButtonDescription

    def __init__(self, coordinator: PrimaCoordinator,
                 description: PrimaButtonDescription) -> None:
        super().__init__(coordinator, description.key)
        self.entity_description = description

    @property
    def available(self) -> bool:
        return super().available and self.entity_description.available_fn(self.coordinator.data)

    async def async_press(self) -> None:
        try:
            await self.entity_description.press_fn(self.coordinator.client)
        except PrimaError as exc:
            raise HomeAssistantError(
                translation_domain=DOMAIN, translation_key=self.entity_description.error_key,
                translation_placeholders={"error": str(exc)}) from exc
        if not self.coordinator.pushing:  # the head pushes the new plan otherwise
            await self.coordinator.async_request_refresh()
