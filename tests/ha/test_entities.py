"""The cluster's entities and devices against real nodes: one head alone, and a ring that a
worker joins, leaves, and after a long absence is removed from."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import entry_for, start_head
from freezegun.api import FrozenDateTimeFactory
from homeassistant.const import STATE_OFF, STATE_ON, STATE_UNAVAILABLE, STATE_UNKNOWN
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.entity_component import DATA_INSTANCES
from homeassistant.util import dt as dt_util
from homeassistant.util import slugify
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed
from server_process import ServerProcess
from syrupy.assertion import SnapshotAssertion

from custom_components.prima.const import DOMAIN, NODE_OFFLINE_ISSUE_S, STALE_NODE_S

SECRET = "ring-secret-for-home-assistant-tests"


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_until(hass: HomeAssistant, condition: Callable[[], bool], what: str,
                     freezer: FrozenDateTimeFactory | None = None, timeout: float = 30.0
                     ) -> None:
    """Let Home Assistant run until ``condition`` holds. The nodes are other processes and take
    real time: the pause is a thread's sleep, and a frozen clock moves on by as much."""
    step = 0.05
    for _ in range(int(timeout / step)):
        await hass.async_block_till_done()
        if condition():
            return
        await hass.async_add_executor_job(time.sleep, step)
        if freezer is not None:
            freezer.tick(step)
            async_fire_time_changed(hass)
    raise AssertionError(f"timed out waiting for {what}")


def entity_id_of(hass: HomeAssistant, platform: str, unique_id: str) -> str:
    entity_id = er.async_get(hass).async_get_entity_id(platform, DOMAIN, unique_id)
    assert entity_id is not None, unique_id
    return entity_id


#: the cluster's figures that only a ring has (its plan)
RING_SENSORS = ("predicted_token_time", "measured_token_time", "rounds")
#: a node's figures of the window it holds in a ring, by the field they show
WINDOW_SENSORS = {"window": "window", "compute_time": "measured_compute_ms"}


def registered(hass: HomeAssistant, platform: str, owner: str, keys: Any) -> set[str]:
    """Which of ``keys`` the registry holds for ``owner`` (a cluster or node id)."""
    registry = er.async_get(hass)
    return {k for k in keys
            if registry.async_get_entity_id(platform, DOMAIN, f"{owner}-{k}") is not None}


def state_of(hass: HomeAssistant, entity_id: str) -> str:
    state = hass.states.get(entity_id)
    assert state is not None, entity_id
    return state.state


def registry_content(hass: HomeAssistant, entry: MockConfigEntry) -> dict[str, Any]:
    """The entry's devices and entities, without what differs between runs and machines (ids,
    ports, host names, versions); a node's name is replaced by its role."""
    device_registry = dr.async_get(hass)
    devices = [d for d in dr.async_entries_for_config_entry(device_registry, entry.entry_id)
               if d.entry_type is None]  # not the conversation and AI Task services
    hub = next(d for d in devices if d.via_device_id is None)
    names = {d.id: "hub" if d is hub else str(d.model).split()[0] for d in devices}
    content: dict[str, Any] = {"devices": sorted(
        ({"device": names[d.id], "name": d.name if d is hub else None, "model": d.model,
          "manufacturer": d.manufacturer, "via": names.get(str(d.via_device_id)),
          "has_configuration_url": d.configuration_url is not None} for d in devices),
        key=lambda d: str(d["device"]))}
    entities = []
    for e in er.async_entries_for_config_entry(er.async_get(hass), entry.entry_id):
        device = device_registry.async_get(str(e.device_id))
        assert device is not None
        if device not in devices:
            continue  # conversation and AI Task are tested with their platforms
        object_id = e.entity_id.split(".", 1)[1]
        if device is not hub:  # <node name>_<entity name>[_2]: the node's name is its host's
            prefix = f"{slugify(str(device.name))}_"
            assert object_id.startswith(prefix), (object_id, prefix)
            object_id = f"<{names[device.id]}>_{re.sub(r'_\d+$', '', object_id[len(prefix):])}"
        entities.append({
            "entity_id": f"{e.domain}.{object_id}", "device": names[device.id],
            "translation_key": e.translation_key, "has_entity_name": e.has_entity_name,
            "device_class": e.original_device_class, "unit": e.unit_of_measurement,
            "capabilities": e.capabilities, "entity_category": e.entity_category,
            "disabled_by": e.disabled_by, "options": dict(e.options)})
    content["entities"] = sorted(entities, key=lambda e: str(e["entity_id"]))
    return content


def offline_issues(hass: HomeAssistant, entry: MockConfigEntry) -> list[str]:
    """The ids of the entry's node_offline repair issues."""
    prefix = f"{entry.entry_id}_node_offline_"
    return sorted(issue_id for domain, issue_id in ir.async_get(hass).issues
                  if domain == DOMAIN and issue_id.startswith(prefix))


async def jump(hass: HomeAssistant, freezer: FrozenDateTimeFactory, seconds: float) -> None:
    """Move the clock on by ``seconds`` at once, then let the head answer what that started
    (the event stream's heartbeat ping): another jump before its pong came would time the
    stream out, which a real week of quiet never does."""
    freezer.tick(seconds)
    async_fire_time_changed(hass)
    await hass.async_block_till_done()
    await hass.async_add_executor_job(time.sleep, 0.2)
    await hass.async_block_till_done()


def device_ids(hass: HomeAssistant, entry: MockConfigEntry) -> set[str]:
    return {d.id for d in dr.async_entries_for_config_entry(dr.async_get(hass),
                                                             entry.entry_id)}


async def test_single_node(hass: HomeAssistant, head: ServerProcess,
                           loaded_entry: MockConfigEntry, snapshot: SnapshotAssertion) -> None:
    """A lone head: the hub and one node device; no ring, so no plan and no re-plan."""
    assert registry_content(hass, loaded_entry) == snapshot
    doc = head.status()
    cluster, node = doc["cluster_id"], doc["node_id"]

    def cluster_state(key: str) -> str:
        return state_of(hass, entity_id_of(hass, "sensor", f"{cluster}-{key}"))

    def node_state(platform: str, key: str) -> str:
        return state_of(hass, entity_id_of(hass, platform, f"{node}-{key}"))

    assert cluster_state("state") == "ready"
    assert cluster_state("model") == doc["model"]["id"]
    assert cluster_state("queue_waiting") == str(doc["queue"]["waiting"])
    # no ring, no plan: its figures and the re-plan button are not there at all (an entity that
    # could never have a value is not one), nor the node's window figures
    assert not registered(hass, "sensor", cluster, RING_SENSORS)
    assert not registered(hass, "button", cluster, ("replan",))
    assert not registered(hass, "sensor", node, WINDOW_SENSORS)
    assert node_state("binary_sensor", "online") == STATE_ON
    assert node_state("sensor", "role") == "head"
    assert node_state("sensor", "layers") == str(doc["model"]["n_layers"])
    # the figure of the document Home Assistant holds (the memory changes from one to the next)
    shown = loaded_entry.runtime_data.coordinator.data["cluster"]["nodes"][0]
    assert shown["node_id"] == node
    assert float(node_state("sensor", "memory_available")) == pytest.approx(
        shown["memory"]["available_bytes"] / 1e9)  # bytes, shown in GB
    pressure = shown["memory"]["pressure_some_avg10"]  # null without Linux's PSI
    if pressure is None:
        assert node_state("sensor", "memory_pressure") == STATE_UNKNOWN
    else:
        assert float(node_state("sensor", "memory_pressure")) == pytest.approx(pressure)


async def test_plan_figures_come_with_a_ring_and_stay_when_it_is_gone(
        hass: HomeAssistant, tiny_model: Path, tmp_path: Path,
        freezer: FrozenDateTimeFactory) -> None:
    """One head restarted on the same state and port: alone (no plan figures), as the head of
    a ring (they are added while the entry runs), alone again (they stay, unavailable, rather
    than being left in the registry with nothing providing them)."""
    port = str(free_port())
    head = start_head(tiny_model, tmp_path / "head", extra=("--port", port))
    try:
        entry = await set_up(hass, head)
        coordinator = entry.runtime_data.coordinator
        cluster = node = head.status()["node_id"]
        assert not registered(hass, "sensor", cluster, RING_SENSORS)

        head.stop()
        head = start_head(tiny_model, tmp_path / "head",
                          extra=("--port", port, "--cluster-secret", SECRET, "--head",
                                 "--peer", f"127.0.0.1:{free_port()}"))
        await wait_until(hass, lambda: registered(hass, "sensor", cluster, RING_SENSORS)
                         == set(RING_SENSORS), "the plan's sensors", freezer)
        assert registered(hass, "button", cluster, ("replan",)) == {"replan"}
        plan = coordinator.data["cluster"]["plan"]
        await wait_until(hass, lambda: state_of(hass, entity_id_of(
            hass, "sensor", f"{cluster}-predicted_token_time")) != STATE_UNAVAILABLE,
            "the predicted time", freezer)
        assert float(state_of(hass, entity_id_of(
            hass, "sensor", f"{cluster}-predicted_token_time"))) == pytest.approx(
                plan["predicted_ms_per_token"])
        listed = coordinator.data["cluster"]["nodes"][0]
        assert all(field in listed for field in WINDOW_SENSORS.values())  # a ring's node
        assert registered(hass, "sensor", node, WINDOW_SENSORS) == set(WINDOW_SENSORS)

        head.stop()
        head = start_head(tiny_model, tmp_path / "head", extra=("--port", port))
        assert await hass.config_entries.async_reload(entry.entry_id)
        await hass.async_block_till_done()
        assert registered(hass, "sensor", cluster, RING_SENSORS) == set(RING_SENSORS)
        for key in ("predicted_token_time", "measured_token_time"):  # rounds: disabled
            assert state_of(hass, entity_id_of(hass, "sensor", f"{cluster}-{key}")
                            ) == STATE_UNAVAILABLE
        button_id = entity_id_of(hass, "button", f"{cluster}-replan")
        assert state_of(hass, button_id) == STATE_UNAVAILABLE
        button = hass.data[DATA_INSTANCES]["button"].get_entity(button_id)
        assert button is not None
        with pytest.raises(HomeAssistantError) as err:  # what a press would meet: no ring
            await button.async_press()
        assert err.value.translation_key == "replan_failed"
        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
    finally:
        head.stop()


async def test_ring(hass: HomeAssistant, tiny_model: Path, tmp_path: Path,
                    freezer: FrozenDateTimeFactory) -> None:
    """A worker joins the head's ring (a device appears), the ring is planned again from the
    button, the worker stops (offline, a repair issue after a while) and is finally removed."""
    worker_port = free_port()
    head = start_head(tiny_model, tmp_path / "head",
                      extra=("--cluster-secret", SECRET, "--head",
                             "--peer", f"127.0.0.1:{worker_port}"))
    worker: ServerProcess | None = None
    try:
        entry = entry_for(head)
        entry.add_to_hass(hass)
        assert await hass.config_entries.async_setup(entry.entry_id)
        await hass.async_block_till_done()
        coordinator = entry.runtime_data.coordinator
        device_registry = dr.async_get(hass)
        issue_registry = ir.async_get(hass)
        cluster, head_id = head.status()["cluster_id"], head.status()["node_id"]
        hub = device_registry.async_get_device_by_identifier((DOMAIN, f"cluster-{cluster}"),
                                                             entry.entry_id)
        assert hub is not None

        def nodes() -> list[dr.DeviceEntry]:
            return [d for d in dr.async_entries_for_config_entry(device_registry, entry.entry_id)
                    if d.via_device_id == hub.id and d.entry_type is None]

        assert [next(iter(d.identifiers))[1] for d in nodes()] == [head_id]
        button_id = entity_id_of(hass, "button", f"{cluster}-replan")
        assert state_of(hass, button_id) != STATE_UNAVAILABLE

        # a worker joins: its device and entities appear while the entry is loaded
        worker = start_head(tiny_model, tmp_path / "worker",
                            extra=("--cluster-secret", SECRET, "--port", str(worker_port)))
        await wait_until(hass, lambda: len(nodes()) == 2, "the worker's device", freezer)
        listed = {n["node_id"]: n for n in coordinator.data["cluster"]["nodes"]}
        worker_id = next(i for i, n in listed.items() if n["role"] == "worker")
        for device in nodes():  # each node's device: its name, role and version
            node = listed[next(iter(device.identifiers))[1]]
            assert device.name == node["name"]
            assert device.model == f"{node['role']} node"
            assert device.sw_version == node["version"]
        # the worker's entities are the head's
        content = registry_content(hass, entry)
        by_device = {role: sorted(e["entity_id"].split(">", 1)[1] for e in content["entities"]
                                  if e["device"] == role) for role in ("head", "worker")}
        assert by_device["worker"] == by_device["head"]
        online = entity_id_of(hass, "binary_sensor", f"{worker_id}-online")
        role = entity_id_of(hass, "sensor", f"{worker_id}-role")
        state = entity_id_of(hass, "sensor", f"{cluster}-state")
        assert state_of(hass, online) == STATE_ON
        assert state_of(hass, role) == "worker"
        assert state_of(hass, entity_id_of(hass, "sensor", f"{head_id}-role")) == "head"
        assert state_of(hass, state) == "ready"
        assert state_of(hass, entity_id_of(hass, "sensor", f"{cluster}-predicted_token_time")
                        ) == str(coordinator.data["cluster"]["plan"]["predicted_ms_per_token"])

        # the button plans the two-node ring again
        plans = head.log().count("plan: k=")
        await hass.services.async_call("button", "press", {"entity_id": button_id},
                                       blocking=True)
        await wait_until(hass, lambda: head.log().count("plan: k=") == plans + 1,
                         "the head's log of the new plan", freezer)

        # the worker stops: offline, its figures unavailable, the cluster degraded
        assert await hass.async_add_executor_job(worker.stop) == 0
        await wait_until(hass, lambda: state_of(hass, online) == STATE_OFF, "the worker offline",
                         freezer)
        assert state_of(hass, role) == STATE_UNAVAILABLE
        assert state_of(hass, state) == "degraded"
        issue_id = f"{entry.entry_id}_node_offline_{worker_id}"
        assert issue_registry.async_get_issue(DOMAIN, issue_id) is None
        head_device = device_registry.async_get_device_by_identifier((DOMAIN, head_id),
                                                                     entry.entry_id)
        assert head_device is not None

        # gone for long: a repair issue for the worker, none for the head that keeps answering
        # (however quiet it was meanwhile)
        freezer.tick(NODE_OFFLINE_ISSUE_S + 60)
        async_fire_time_changed(hass)
        await hass.async_block_till_done()
        issue = issue_registry.async_get_issue(DOMAIN, issue_id)
        assert issue is not None
        assert issue.translation_key == "node_offline"
        assert issue.translation_placeholders is not None
        since = dt_util.parse_datetime(issue.translation_placeholders["since"] + ":00")
        assert since is not None
        gone_for = dt_util.now().replace(tzinfo=None) - since.replace(tzinfo=None)
        assert gone_for.total_seconds() >= NODE_OFFLINE_ISSUE_S
        assert offline_issues(hass, entry) == [issue_id]
        # a minute later the text is the same (it names a time, not a count of minutes)
        freezer.tick(60)
        async_fire_time_changed(hass)
        await hass.async_block_till_done()
        again = issue_registry.async_get_issue(DOMAIN, issue_id)
        assert again is not None
        assert again.translation_placeholders == issue.translation_placeholders

        # gone for good (the head planned without it and no longer lists it): the device and
        # its entities are removed, the issue with them; the head's device stays the same
        freezer.tick(STALE_NODE_S)
        async_fire_time_changed(hass)
        await hass.async_block_till_done()
        assert [next(iter(d.identifiers))[1] for d in nodes()] == [head_id]
        kept = device_registry.async_get_device_by_identifier((DOMAIN, head_id), entry.entry_id)
        assert kept is not None and kept.id == head_device.id
        assert not offline_issues(hass, entry)
        assert er.async_get(hass).async_get_entity_id("binary_sensor", DOMAIN,
                                                      f"{worker_id}-online") is None
        assert hass.states.get(online) is None
        assert issue_registry.async_get_issue(DOMAIN, issue_id) is None
        assert state_of(hass, state) == "ready"

        # back after all: a new device, new entities
        worker = start_head(tiny_model, tmp_path / "worker",
                            extra=("--cluster-secret", SECRET, "--port", str(worker_port)))
        await wait_until(hass, lambda: len(nodes()) == 2, "the worker's device again",
                         freezer)
        online = entity_id_of(hass, "binary_sensor", f"{worker_id}-online")
        await wait_until(hass, lambda: state_of(hass, online) == STATE_ON, "the worker online",
                         freezer)
        assert state_of(hass, entity_id_of(hass, "sensor", f"{worker_id}-role")) == "worker"

        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
    finally:
        if worker is not None:
            worker.stop()
        head.stop()


async def set_up(hass: HomeAssistant, head: ServerProcess) -> MockConfigEntry:
    """The entry, set up once the test's clock is frozen (the ``loaded_entry`` fixture sets it
    up before: freezing the clock afterwards jumps every timer of the event stream at once)."""
    entry = entry_for(head)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    coordinator = entry.runtime_data.coordinator
    await wait_until(hass, lambda: coordinator.pushing, "the head's event stream")
    return entry


async def test_quiet_lone_head_keeps_its_devices(
        hass: HomeAssistant, head: ServerProcess, freezer: FrozenDateTimeFactory) -> None:
    """A lone head with nothing to do pushes nothing for hours; it still answers, so it is not
    missing: no repair issue, and after a week its devices are all still there."""
    entry = await set_up(hass, head)
    devices = device_ids(hass, entry)
    node = head.status()["node_id"]
    assert dr.async_get(hass).async_get_device_by_identifier((DOMAIN, node),
                                                             entry.entry_id) is not None
    online = entity_id_of(hass, "binary_sensor", f"{node}-online")
    coordinator = entry.runtime_data.coordinator
    for tick in (NODE_OFFLINE_ISSUE_S + 60, STALE_NODE_S):
        await jump(hass, freezer, tick)
        # the head answered all along, so the housekeeping ran (it skips while it does not)
        assert coordinator.pushing and coordinator.last_update_success, tick
        assert not offline_issues(hass, entry), tick
        assert device_ids(hass, entry) == devices, tick
        assert state_of(hass, online) == STATE_ON
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()


async def test_reload_keeps_a_lone_head_ready(
        hass: HomeAssistant, head: ServerProcess, freezer: FrozenDateTimeFactory) -> None:
    """Set up again (as after a reconfigure or reauth), a lone head is still ``ready``: the
    devices the entry already has (the assistants' among them) are not missing nodes."""
    entry = await set_up(hass, head)
    cluster = head.status()["cluster_id"]
    state = entity_id_of(hass, "sensor", f"{cluster}-state")
    assert state_of(hass, state) == "ready"
    devices = device_ids(hass, entry)
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert state_of(hass, state) == "ready"
    coordinator = entry.runtime_data.coordinator
    await wait_until(hass, lambda: coordinator.pushing, "the head's event stream")
    await jump(hass, freezer, NODE_OFFLINE_ISSUE_S + 60)
    assert coordinator.pushing and coordinator.last_update_success
    assert not offline_issues(hass, entry)
    assert device_ids(hass, entry) == devices
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()


async def test_gpu_sensors_are_enabled_where_a_node_has_a_gpu(
        hass: HomeAssistant, head: ServerProcess, tiny_model: Path, tmp_path: Path) -> None:
    """A node without a GPU has the GPU memory sensor, disabled (it could only say
    "unknown"); a node with one (here the CPU standing in: ``--gpu CPU``) has it enabled,
    showing what its layers hold there."""
    registry = er.async_get(hass)
    entry = await set_up(hass, head)
    node = head.status()["node_id"]
    plain = registry.async_get(entity_id_of(hass, "sensor", f"{node}-gpu_memory_used"))
    assert plain is not None and plain.disabled_by is er.RegistryEntryDisabler.INTEGRATION
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()

    gpu_head = start_head(tiny_model, tmp_path / "gpu", extra=("--gpu", "CPU",
                                                               "--gpu-layers", "all"))
    try:
        entry = await set_up(hass, gpu_head)
        doc = gpu_head.status()
        used = doc["cluster"]["nodes"][0]["gpu"]["used_by_model"]
        assert used > 0
        entity_id = entity_id_of(hass, "sensor", f"{doc['node_id']}-gpu_memory_used")
        entity = registry.async_get(entity_id)
        assert entity is not None and entity.disabled_by is None
        shown = entry.runtime_data.coordinator.data["cluster"]["nodes"][0]["gpu"]
        assert float(state_of(hass, entity_id)) == pytest.approx(
            shown["used_by_model"] / 1e9, abs=0.005)  # bytes, shown in GB to 2 places
        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
    finally:
        gpu_head.stop()
