"""Sensors: what the cluster does (its state, speed, queue) and what each node holds and has.

Cluster sensors read the head's status document; node sensors read the node's entry in its
``cluster.nodes``. A sensor is added once it can have a value (see ``entity``): a node that joins
later gets its device and sensors when it first appears, a lone head its plan's figures once it
runs a ring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import (
    PERCENTAGE,
    EntityCategory,
    Platform,
    UnitOfDataRate,
    UnitOfInformation,
    UnitOfTime,
)
from homeassistant.core import HomeAssistant
from homeassistant.util import dt as dt_util

from .coordinator import PrimaCoordinator, cluster_nodes
from .entity import (
    PrimaClusterEntity,
    PrimaTrackedNodeEntity,
    async_add_cluster_entities,
    async_track_nodes,
)

if TYPE_CHECKING:
    from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
    from homeassistant.helpers.typing import StateType

    from . import PrimaConfigEntry

PARALLEL_UPDATES = 0

#: the head's load states, and ``degraded``: ready, but a node of the cluster is missing
CLUSTER_STATES = ["loading", "ready", "failed", "stopping", "degraded"]
NODE_ROLES = ["head", "worker"]


# -- reading the status document ------------------------------------------------------------------

def _part(doc: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """``doc[key]`` when it is an object, else an empty one (fields may be null or absent)."""
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _is_ring(doc: dict[str, Any]) -> bool:
    return _part(doc, "cluster").get("mode") == "ring"


def cluster_state(coordinator: PrimaCoordinator) -> str | None:
    """The head's load state; ``degraded`` while it is ready but a known node is not online."""
    doc = coordinator.data
    state = doc.get("state")
    if state not in CLUSTER_STATES:
        return None
    online = {n["node_id"] for n in cluster_nodes(doc) if n.get("online", True)}
    if state == "ready" and set(coordinator.known_nodes) - online:
        return "degraded"
    return str(state)


def _timestamp(value: Any) -> datetime | None:
    return dt_util.parse_datetime(value) if isinstance(value, str) else None


def _layer_count(node: dict[str, Any]) -> int | None:
    """Layers the node holds: ``layer_count`` in a ring, the span of ``layers`` when alone."""
    count = node.get("layer_count")
    if isinstance(count, int):
        return count
    layers = node.get("layers")
    if isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers):
        return int(layers[1] - layers[0])
    return None


def _hit_rate(node: dict[str, Any]) -> float | None:
    rate = _number(_part(node, "paging").get("hit_rate"))
    return None if rate is None else round(100 * rate, 1)


# -- descriptions ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PrimaClusterSensorDescription(SensorEntityDescription):
    """A figure of the cluster as a whole."""

    value_fn: Callable[[PrimaCoordinator], StateType | datetime]
    #: whether the figure can have a value for this head (a lone node has no plan)
    exists_fn: Callable[[dict[str, Any]], bool] = lambda _doc: True


@dataclass(frozen=True, kw_only=True)
class PrimaNodeSensorDescription(SensorEntityDescription):
    """A figure of one node, from its entry in the cluster's node list."""

    value_fn: Callable[[dict[str, Any]], StateType]
    #: whether the node reports the figure (a lone node has no window, older nodes lack
    #: newer fields)
    exists_fn: Callable[[dict[str, Any]], bool] = lambda _node: True
    #: whether the entity starts enabled, by what the node reported when it was first seen
    #: (None: ``entity_registry_enabled_default``)
    enabled_fn: Callable[[dict[str, Any]], bool] | None = None


CLUSTER_SENSORS: tuple[PrimaClusterSensorDescription, ...] = (
    PrimaClusterSensorDescription(
        key="state",
        device_class=SensorDeviceClass.ENUM,
        options=CLUSTER_STATES,
        value_fn=cluster_state,
    ),
    PrimaClusterSensorDescription(
        key="model",
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda c: _part(c.data, "model").get("id"),
    ),
    PrimaClusterSensorDescription(
        key="decode_speed",
        native_unit_of_measurement="tok/s",
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        value_fn=lambda c: _number(_part(c.data, "last_request").get("decode_tokens_per_s")),
    ),
    PrimaClusterSensorDescription(
        key="first_token_time",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.SECONDS,
        suggested_unit_of_measurement=UnitOfTime.MILLISECONDS,
        suggested_display_precision=0,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda c: _number(_part(c.data, "last_request").get("first_token_s")),
    ),
    PrimaClusterSensorDescription(
        key="last_request",
        device_class=SensorDeviceClass.TIMESTAMP,
        value_fn=lambda c: _timestamp(_part(c.data, "last_request").get("at")),
    ),
    PrimaClusterSensorDescription(
        key="requests",
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda c: _number(_part(c.data, "requests").get("requests")),
    ),
    PrimaClusterSensorDescription(
        key="queue_waiting",
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda c: _number(_part(c.data, "queue").get("waiting")),
    ),
    PrimaClusterSensorDescription(
        key="predicted_token_time",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        suggested_display_precision=1,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda c: _number(
            _part(_part(c.data, "cluster"), "plan").get("predicted_ms_per_token")),
        exists_fn=_is_ring,
    ),
    PrimaClusterSensorDescription(
        key="measured_token_time",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        suggested_display_precision=1,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda c: _number(
            _part(_part(c.data, "cluster"), "plan").get("measured_ms_per_token")),
        exists_fn=_is_ring,
    ),
    PrimaClusterSensorDescription(
        key="rounds",
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=lambda c: _number(_part(_part(c.data, "cluster"), "plan").get("k")),
        exists_fn=_is_ring,
    ),
)

NODE_SENSORS: tuple[PrimaNodeSensorDescription, ...] = (
    PrimaNodeSensorDescription(
        key="role",
        device_class=SensorDeviceClass.ENUM,
        options=NODE_ROLES,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda n: n.get("role") if n.get("role") in NODE_ROLES else None,
    ),
    PrimaNodeSensorDescription(
        key="layers",
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=_layer_count,
    ),
    PrimaNodeSensorDescription(
        key="window",
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=lambda n: _number(n.get("window")),
        exists_fn=lambda n: "window" in n,
    ),
    PrimaNodeSensorDescription(
        key="compute_time",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        suggested_display_precision=1,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda n: _number(n.get("measured_compute_ms")),
        exists_fn=lambda n: "measured_compute_ms" in n,
    ),
    PrimaNodeSensorDescription(
        key="prefetch_hit_rate",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        entity_registry_enabled_default=False,
        value_fn=_hit_rate,
        exists_fn=lambda n: "paging" in n,
    ),
    PrimaNodeSensorDescription(
        key="memory_available",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.GIGABYTES,
        suggested_display_precision=2,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda n: _number(_part(n, "memory").get("available_bytes")),
        exists_fn=lambda n: "memory" in n,
    ),
    PrimaNodeSensorDescription(
        key="memory_pressure",
        native_unit_of_measurement=PERCENTAGE,
        suggested_display_precision=1,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda n: _number(_part(n, "memory").get("pressure_some_avg10")),
        exists_fn=lambda n: "memory" in n,
    ),
    PrimaNodeSensorDescription(
        key="gpu_memory_used",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.GIGABYTES,
        suggested_display_precision=2,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda n: _number(_part(n, "gpu").get("used_by_model")),
        exists_fn=lambda n: "gpu" in n,
        # a node without a GPU says so (the sensor is unknown), but does not clutter the device
        enabled_fn=lambda n: bool(_part(n, "gpu")),
    ),
    PrimaNodeSensorDescription(
        key="gpu_layers",
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda n: _number(n.get("gpu_layers")),
        exists_fn=lambda n: "gpu_layers" in n,
        enabled_fn=lambda n: bool(_part(n, "gpu")),
    ),
    PrimaNodeSensorDescription(
        key="disk_read_speed",
        device_class=SensorDeviceClass.DATA_RATE,
        native_unit_of_measurement=UnitOfDataRate.BYTES_PER_SECOND,
        suggested_unit_of_measurement=UnitOfDataRate.MEGABYTES_PER_SECOND,
        suggested_display_precision=1,
        state_class=SensorStateClass.MEASUREMENT,
        entity_registry_enabled_default=False,
        value_fn=lambda n: _number(n.get("disk_read_bytes_per_s")),
        exists_fn=lambda n: "disk_read_bytes_per_s" in n,
    ),
)


async def async_setup_entry(hass: HomeAssistant, entry: PrimaConfigEntry,
                            async_add_entities: AddConfigEntryEntitiesCallback) -> None:
    coordinator = entry.runtime_data.coordinator
    async_add_cluster_entities(entry, async_add_entities, Platform.SENSOR, CLUSTER_SENSORS,
                               PrimaClusterSensor, lambda d, doc: d.exists_fn(doc))
    async_track_nodes(entry, async_add_entities, Platform.SENSOR, NODE_SENSORS, PrimaNodeSensor,
                      lambda d, node: d.exists_fn(node))
    # nodes gone for long lose their devices (checked whenever the status changes)
    entry.async_on_unload(coordinator.async_add_listener(coordinator.remove_stale_devices))


class PrimaClusterSensor(PrimaClusterEntity, SensorEntity):
    """One figure of the cluster."""

    entity_description: PrimaClusterSensorDescription

    def __init__(self, coordinator: PrimaCoordinator,
                 description: PrimaClusterSensorDescription) -> None:
        super().__init__(coordinator, description.key)
        self.entity_description = description

    @property
    def available(self) -> bool:
        return super().available and self.entity_description.exists_fn(self.coordinator.data)

    @property
    def native_value(self) -> StateType | datetime:
        return self.entity_description.value_fn(self.coordinator)


class PrimaNodeSensor(PrimaTrackedNodeEntity, SensorEntity):
    """One figure of one node."""

    entity_description: PrimaNodeSensorDescription

    def __init__(self, coordinator: PrimaCoordinator, node: dict[str, Any],
                 description: PrimaNodeSensorDescription) -> None:
        super().__init__(coordinator, node, description.key)
        self.entity_description = description
        if description.enabled_fn is not None:
            self._attr_entity_registry_enabled_default = description.enabled_fn(node)

    @property
    def available(self) -> bool:
        node = self.node
        return (super().available and node is not None
                and self.entity_description.exists_fn(node))

    @property
    def native_value(self) -> StateType:
        node = self.node
        return None if node is None else self.entity_description.value_fn(node)
