"""What every entity of a cluster shares: its device (the cluster hub or one node) and the
coordinator's status document. The platforms only say which figure each entity shows."""

from __future__ import annotations

from typing import Any

from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .const import DOMAIN
from .coordinator import PrimaCoordinator, cluster_nodes


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
