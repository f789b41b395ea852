"""Binary sensors: whether each node of the cluster is online.

The sensor stays available while the head answers, and is off while the head does not list
its node online (a worker that stopped, crashed or lost its network drops out of the list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from homeassistant.components.binary_sensor import (
    BinarySensorEntity,
    BinarySensorEntityDescription,
)
from homeassistant.components.binary_sensor.const import BinarySensorDeviceClass
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant

from .coordinator import PrimaCoordinator
from .entity import PrimaTrackedNodeEntity, async_track_nodes

if TYPE_CHECKING:
    from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

    from . import PrimaConfigEntry

PARALLEL_UPDATES = 0


@dataclass(frozen=True, kw_only=True)
class PrimaNodeBinarySensorDescription(BinarySensorEntityDescription):
    """A yes/no fact about one node; ``is_on_fn`` gets its entry (None: not listed)."""

    is_on_fn: Callable[[dict[str, Any] | None], bool]


NODE_BINARY_SENSORS: tuple[PrimaNodeBinarySensorDescription, ...] = (
    PrimaNodeBinarySensorDescription(
        key="online",
        device_class=BinarySensorDeviceClass.CONNECTIVITY,
        is_on_fn=lambda node: node is not None and bool(node.get("online", True)),
    ),
)


async def async_setup_entry(hass: HomeAssistant, entry: PrimaConfigEntry,
                            async_add_entities: AddConfigEntryEntitiesCallback) -> None:
    async_track_nodes(entry, async_add_entities, Platform.BINARY_SENSOR, NODE_BINARY_SENSORS,
                      PrimaNodeBinarySensor)


class PrimaNodeBinarySensor(PrimaTrackedNodeEntity, BinarySensorEntity):
    """A fact about one node, known whenever the head answers."""

    entity_description: PrimaNodeBinarySensorDescription

    def __init__(self, coordinator: PrimaCoordinator, node: dict[str, Any],
                 description: PrimaNodeBinarySensorDescription) -> None:
        super().__init__(coordinator, node, description.key)
        self.entity_description = description

    @property
    def available(self) -> bool:
        # a node missing from the list is a fact (off), not an unknown
        return self.coordinator.last_update_success

    @property
    def is_on(self) -> bool:
        return self.entity_description.is_on_fn(self.node)
