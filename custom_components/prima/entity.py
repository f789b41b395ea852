"""What every entity of a cluster shares: its device (the cluster hub or one node), the
coordinator's status document, and when it is added. The platforms only say which figure each
entity shows.

An entity is added once it can have a value: the plan's figures once the head runs a ring, a
node's figure once the node reports its field (a lone node has no window; an older node lacks
newer fields). One the registry already holds is added at once, so that a ring that became a
lone node shows its figures unavailable rather than as entities nobody provides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from homeassistant.core import callback
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.entity import Entity, EntityDescription
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .const import DOMAIN
from .coordinator import PrimaCoordinator, cluster_nodes

if TYPE_CHECKING:
    from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

    from . import PrimaConfigEntry


def hub_identifier(coordinator: PrimaCoordinator) -> tuple[str, str]:
    """The cluster hub's device identifier: its identity is the head's cluster id."""
    return (DOMAIN, f"cluster-{coordinator.cluster_id}")


def cluster_device(coordinator: PrimaCoordinator) -> DeviceInfo:
    """The cluster as a hub device."""
    doc = coordinator.data
    model = doc.get("model")
    model_id = model.get("id") if isinstance(model, dict) else None
    return DeviceInfo(
        identifiers={hub_identifier(coordinator)},
        name="Prima cluster",
        manufacturer="Prima Home Cluster",
        model=str(model_id or "language model"),
        sw_version=str(doc.get("version") or ""),
        configuration_url=coordinator.client.url,
    )


def node_device(coordinator: PrimaCoordinator, node: dict[str, Any]) -> DeviceInfo:
    """One node of the cluster, shown under the cluster hub."""
    return DeviceInfo(
        identifiers={(DOMAIN, node["node_id"])},
        name=str(node.get("name") or node["node_id"]),
        manufacturer="Prima Home Cluster",
        model="head node" if node.get("role") == "head" else "worker node",
        sw_version=str(node.get("version") or coordinator.data.get("version") or ""),
        via_device_id=coordinator.hub_device_id,
    )


class PrimaClusterEntity(CoordinatorEntity[PrimaCoordinator]):
    """An entity of the cluster as a whole."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: PrimaCoordinator, key: str) -> None:
        super().__init__(coordinator)
        self._attr_unique_id = f"{coordinator.cluster_id}-{key}"
        self._attr_translation_key = key
        self._attr_device_info = cluster_device(coordinator)


class PrimaNodeEntity(CoordinatorEntity[PrimaCoordinator]):
    """An entity of one node; unavailable while the head does not list the node online."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: PrimaCoordinator, node: dict[str, Any], key: str) -> None:
        super().__init__(coordinator)
        self.node_id: str = node["node_id"]
        self._attr_unique_id = f"{self.node_id}-{key}"
        self._attr_translation_key = key
        self._attr_device_info = node_device(coordinator, node)

    @property
    def node(self) -> dict[str, Any] | None:
        """This node's entry in the newest status document."""
        return next((n for n in cluster_nodes(self.coordinator.data)
                     if n["node_id"] == self.node_id), None)

    @property
    def available(self) -> bool:
        node = self.node
        return super().available and node is not None and bool(node.get("online", True))


class PrimaTrackedNodeEntity(PrimaNodeEntity):
    """A node's entity that lets its platform forget it once its device is removed."""

    forget_node: Callable[[], None] | None = None

    async def async_removed_from_registry(self) -> None:
        if self.forget_node is not None:
            self.forget_node()


def _registered(entry: PrimaConfigEntry, platform: str) -> Callable[[str], bool]:
    registry = er.async_get(entry.runtime_data.coordinator.hass)
    return lambda unique_id: registry.async_get_entity_id(platform, DOMAIN, unique_id) is not None


def async_add_cluster_entities[D: EntityDescription](
    entry: PrimaConfigEntry,
    add_entities: AddConfigEntryEntitiesCallback,
    platform: str,
    descriptions: Sequence[D],
    make: Callable[[PrimaCoordinator, D], Entity],
    exists: Callable[[D, dict[str, Any]], bool],
) -> None:
    """Add each cluster entity once ``exists(description, status)`` holds (or the registry
    has it), now or at a later status."""
    coordinator = entry.runtime_data.coordinator
    registered = _registered(entry, platform)
    added: set[str] = set()

    @callback
    def add_new() -> None:
        new = [d for d in descriptions if d.key not in added
               and (exists(d, coordinator.data)
                    or registered(f"{coordinator.cluster_id}-{d.key}"))]
        added.update(d.key for d in new)
        if new:
            add_entities(make(coordinator, d) for d in new)

    add_new()
    if len(added) < len(descriptions):
        entry.async_on_unload(coordinator.async_add_listener(add_new))


def async_track_nodes[D: EntityDescription](
    entry: PrimaConfigEntry,
    add_entities: AddConfigEntryEntitiesCallback,
    platform: str,
    descriptions: Sequence[D],
    make: Callable[[PrimaCoordinator, dict[str, Any], D], PrimaTrackedNodeEntity],
    exists: Callable[[D, dict[str, Any]], bool] = lambda _d, _node: True,
) -> None:
    """Add each node's entities for every node listed now and each that joins later, each
    entity once ``exists(description, node)`` holds (or the registry has it).

    When a node's device is removed (gone for long) its entities leave the registry and are
    forgotten, so that they come back should the node return.
    """
    coordinator = entry.runtime_data.coordinator
    registered = _registered(entry, platform)
    known: set[tuple[str, str]] = set()

    @callback
    def add_new() -> None:
        entities: list[Entity] = []
        for node in cluster_nodes(coordinator.data):
            node_id = node["node_id"]
            for d in descriptions:
                key = (node_id, d.key)
                if key in known or not (exists(d, node) or registered(f"{node_id}-{d.key}")):
                    continue
                known.add(key)
                entity = make(coordinator, node, d)
                entity.forget_node = partial(known.discard, key)
                entities.append(entity)
        if entities:
            add_entities(entities)

    add_new()
    entry.async_on_unload(coordinator.async_add_listener(add_new))

