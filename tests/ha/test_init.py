"""Setting the integration up and down against a real head, and following the head's state:
the pushed status, a head that stops and comes back, a head that refuses the key or is not
there at all."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from conftest import API_KEY, entry_for, head_url, start_head
from homeassistant.config_entries import SOURCE_REAUTH, ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er
from homeassistant.util import dt as dt_util
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed
from server_process import ServerProcess

from custom_components.prima.const import CONF_API_KEY, CONF_URL, DOMAIN, POLL_INTERVAL_S


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def cluster_entity(hass: HomeAssistant, entry: MockConfigEntry, platform: str, key: str) -> str:
    """The entity id of one of the cluster's entities, by its unique id."""
    coordinator = entry.runtime_data.coordinator
    entity_id = er.async_get(hass).async_get_entity_id(platform, DOMAIN,
                                                       f"{coordinator.cluster_id}-{key}")
    assert entity_id is not None, key
    return entity_id


async def wait_until(hass: HomeAssistant, condition: Callable[[], bool], what: str,
                     timeout: float = 20.0) -> None:
    """Let the event loop run (real time: the head is another process) until ``condition``."""
    for _ in range(int(timeout / 0.05)):
        await hass.async_block_till_done()
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def state_of(hass: HomeAssistant, entity_id: str) -> str:
    state = hass.states.get(entity_id)
    assert state is not None, entity_id
    return state.state


def prima_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(f"{DOMAIN} ")
            and not t.done()]


async def test_setup_and_unload(hass: HomeAssistant, head: ServerProcess) -> None:
    entry = entry_for(head)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    coordinator = entry.runtime_data.coordinator
    assert coordinator.data["node_id"] == head.status()["node_id"]
    state_id = cluster_entity(hass, entry, "sensor", "state")
    assert state_of(hass, state_id) == "ready"
    await wait_until(hass, lambda: coordinator.pushing, "the event stream")
    assert prima_tasks(), "the event stream runs as a task of the entry"

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    await wait_until(hass, lambda: not prima_tasks(), "the event stream to stop")
    assert state_of(hass, state_id) == STATE_UNAVAILABLE


async def test_head_unreachable_retries(hass: HomeAssistant) -> None:
    entry = MockConfigEntry(domain=DOMAIN, title="Prima cluster",
                            data={CONF_URL: f"http://127.0.0.1:{free_port()}",
                                  CONF_API_KEY: API_KEY})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert "Cannot reach the head node" in (entry.reason or "")


async def test_wrong_key_starts_reauth(hass: HomeAssistant, head: ServerProcess) -> None:
    entry = MockConfigEntry(domain=DOMAIN, title="Prima cluster",
                            data={CONF_URL: head_url(head), CONF_API_KEY: "not-the-key"})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR
    flows = list(entry.async_get_active_flows(hass, {SOURCE_REAUTH}))
    assert len(flows) == 1
    assert flows[0]["context"]["entry_id"] == entry.entry_id


async def test_event_stream_pushes_updates(hass: HomeAssistant, head: ServerProcess,
                                           loaded_entry: MockConfigEntry) -> None:
    """A request answered by the head shows up at once: no poll, no time advanced."""
    coordinator = loaded_entry.runtime_data.coordinator
    await wait_until(hass, lambda: coordinator.pushing, "the event stream")
    requests_id = cluster_entity(hass, loaded_entry, "sensor", "requests")
    speed_id = cluster_entity(hass, loaded_entry, "sensor", "decode_speed")
    before = int(state_of(hass, requests_id))

    async with aiohttp.ClientSession() as session, session.post(
            f"{head_url(head)}/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": "prima", "max_tokens": 4,
                  "messages": [{"role": "user", "content": "Hello"}]}) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()

    def counted() -> bool:
        state = hass.states.get(requests_id)
        return state is not None and state.state == str(before + 1)

    await wait_until(hass, counted, "the pushed request count")
    assert coordinator.pushing
    last = head.status()["last_request"]
    assert last["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert float(state_of(hass, speed_id)) == pytest.approx(
        last["decode_tokens_per_s"])


async def test_head_stops_and_returns(hass: HomeAssistant, tiny_model: Path, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Unavailable while the head is gone (logged once), available again when it is back."""
    srv = start_head(tiny_model, tmp_path / "state")
    port = srv.port
    try:
        entry = entry_for(srv)
        entry.add_to_hass(hass)
        assert await hass.config_entries.async_setup(entry.entry_id)
        await hass.async_block_till_done()
        coordinator = entry.runtime_data.coordinator
        await wait_until(hass, lambda: coordinator.pushing, "the event stream")
        state_id = cluster_entity(hass, entry, "sensor", "state")
        assert state_of(hass, state_id) == "ready"
        # the sensors, binary sensors and buttons that have a value now (the head's too),
        # and the assistants: an agent that can only say "cannot reach" is unavailable
        ours = {e.entity_id for e in er.async_entries_for_config_entry(er.async_get(hass),
                                                                       entry.entry_id)}
        shown = [s.entity_id for s in hass.states.async_all()
                 if s.entity_id in ours and s.state != STATE_UNAVAILABLE]
        assert len(shown) > 5
        assert {"conversation", "ai_task"} <= {e.split(".")[0] for e in shown}

        caplog.set_level(logging.INFO, logger="custom_components.prima")
        # stopped from a thread, so that Home Assistant's end of the event stream closes at once
        assert await hass.async_add_executor_job(srv.stop) == 0
        now = dt_util.utcnow()
        for step in range(1, 4):  # the stream ends; polls fail, again and again
            async_fire_time_changed(hass, now + timedelta(seconds=step * (POLL_INTERVAL_S + 1)))
            await hass.async_block_till_done()
        assert not coordinator.last_update_success
        assert state_of(hass, state_id) == STATE_UNAVAILABLE
        for entity_id in shown:
            assert state_of(hass, entity_id) == STATE_UNAVAILABLE, entity_id
        down = [r for r in caplog.records if r.name.startswith("custom_components.prima")
                and r.levelno >= logging.WARNING]
        assert len(down) == 1, [r.getMessage() for r in down]
        assert head_url(srv).split("//")[1] in down[0].getMessage()

        srv = start_head(tiny_model, tmp_path / "state", extra=("--port", str(port)))
        assert srv.port == port
        async_fire_time_changed(hass, now + timedelta(seconds=5 * (POLL_INTERVAL_S + 1)))
        await wait_until(hass, lambda: coordinator.last_update_success, "the head again")
        assert state_of(hass, state_id) == "ready"
        for entity_id in shown:
            assert state_of(hass, entity_id) != STATE_UNAVAILABLE, entity_id
        down = [r for r in caplog.records if r.name.startswith("custom_components.prima")
                and r.levelno >= logging.WARNING]
        assert len(down) == 1, "logged once while down, not again"
        # and once that it is back, whichever saw it first: the poller or the event stream
        back = [r.getMessage() for r in caplog.records
                if r.name.startswith("custom_components.prima") and r.levelno == logging.INFO
                and ("is back" in r.getMessage() or "recovered" in r.getMessage())]
        assert len(back) == 1, back
        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
    finally:
        srv.stop()


async def test_nodes_left_while_stopped_age_and_removal_cleans_up(
        hass: HomeAssistant, head: ServerProcess) -> None:
    """A node whose device exists but which the head no longer lists (it left while Home
    Assistant was stopped) is known again at setup, may be deleted by hand, while a node the
    head lists online may not; deleting the entry removes its repair issues."""
    from homeassistant.helpers import device_registry as dr
    from homeassistant.helpers import issue_registry as ir

    from custom_components.prima import async_remove_config_entry_device

    entry = entry_for(head)
    entry.add_to_hass(hass)
    registry = dr.async_get(hass)
    gone = registry.async_get_or_create(config_entry_id=entry.entry_id,
                                        identifiers={(DOMAIN, "left-while-stopped")},
                                        name="old worker")
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    coordinator = entry.runtime_data.coordinator
    assert "left-while-stopped" in coordinator.known_nodes
    assert coordinator.missing_for("left-while-stopped") >= 0
    head_id = head.status()["node_id"]
    head_device = registry.async_get_device_by_identifier((DOMAIN, head_id), entry.entry_id)
    assert head_device is not None
    assert not await async_remove_config_entry_device(hass, entry, head_device)
    assert await async_remove_config_entry_device(hass, entry, gone)
    assert "left-while-stopped" not in coordinator.known_nodes

    # a node the head still lists, even offline, would come back with the next status: it
    # stays, by hand and through the week's clean-up (the head's real document, with its own
    # node entry copied as a worker that is offline)
    doc = head.status()
    me = doc["cluster"]["nodes"][0]
    listed = {**me, "node_id": "listed-offline", "name": "w", "role": "worker",
              "online": False}
    with_listed = {**doc, "cluster": {**doc["cluster"], "nodes": [me, listed]}}
    coordinator.async_set_updated_data(with_listed)
    await hass.async_block_till_done()
    device = registry.async_get_device_by_identifier((DOMAIN, "listed-offline"),
                                                     entry.entry_id)
    assert device is not None
    # the real head may have pushed its own status while the device was being added: the
    # document listing the node is the one the checks below are about (no await from here on
    # lets another push in)
    coordinator.async_set_updated_data(with_listed)
    assert not await async_remove_config_entry_device(hass, entry, device)
    coordinator.last_seen["listed-offline"] = time.monotonic() - 8 * 24 * 3600
    coordinator.remove_stale_devices()
    assert registry.async_get_device_by_identifier((DOMAIN, "listed-offline"),
                                                   entry.entry_id) is not None

    ir.async_create_issue(hass, DOMAIN, coordinator.issue_id("node_offline", "x"),
                          is_fixable=False, severity=ir.IssueSeverity.WARNING,
                          translation_key="node_offline",
                          translation_placeholders={"name": "x", "since": "2026-12-01 07:00"})
    assert await hass.config_entries.async_remove(entry.entry_id)
    await hass.async_block_till_done()
    assert not [i for (d, i) in ir.async_get(hass).issues if d == DOMAIN]


async def test_a_node_whose_gpu_goes_unused_raises_a_repair_issue(
        hass: HomeAssistant, head: ServerProcess) -> None:
    """A node built for a GPU that finds none (its driver missing or too old) runs every layer
    on the CPU: Home Assistant says so, with the node's reason, while the node is online and
    until it finds its GPU or leaves. The head here is a CPU build, which expects no GPU and
    says nothing; the document of a driverless GPU build is the head's own with the reason
    such a build gives."""
    from homeassistant.helpers import issue_registry as ir

    entry = entry_for(head)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    coordinator = entry.runtime_data.coordinator
    doc = head.status()
    me = doc["cluster"]["nodes"][0]
    assert me["gpu_unavailable"] is None  # a CPU build: nothing the user expects is missing
    issues = ir.async_get(hass)
    issue_id = coordinator.issue_id("gpu_unused", me["node_id"])
    assert issues.async_get_issue(DOMAIN, issue_id) is None

    reason = ("this build's CUDA backend found no GPU: its driver is missing or too old for "
              "the CUDA version it was built with")
    driverless = {**doc, "cluster": {**doc["cluster"],
                                     "nodes": [{**me, "gpu_unavailable": reason}]}}
    coordinator._track(driverless)  # what a pushed or polled document goes through
    coordinator.async_set_updated_data(driverless)
    issue = issues.async_get_issue(DOMAIN, issue_id)
    assert issue is not None
    assert issue.translation_key == "gpu_unused"
    assert issue.severity == ir.IssueSeverity.WARNING
    assert issue.translation_placeholders == {"name": me["name"], "reason": reason}

    # the node's next document has its GPU (the driver was installed): the issue goes
    coordinator._track(doc)
    coordinator.async_set_updated_data(doc)
    assert issues.async_get_issue(DOMAIN, issue_id) is None

    # a node that goes offline has that issue instead (its GPU is no news until it is back)
    coordinator._track(driverless)
    assert issues.async_get_issue(DOMAIN, issue_id) is not None
    offline = {**driverless, "cluster": {**doc["cluster"], "nodes": [
        {**me, "gpu_unavailable": reason, "online": False}]}}
    coordinator._track(offline)
    assert issues.async_get_issue(DOMAIN, issue_id) is None
    coordinator._track(driverless)
    assert issues.async_get_issue(DOMAIN, issue_id) is not None

    # a node that leaves for good takes its issue along
    coordinator.last_seen[me["node_id"]] = time.monotonic() - 8 * 24 * 3600
    coordinator.data = {**doc, "cluster": {**doc["cluster"], "nodes": []}}
    coordinator.remove_stale_devices()
    assert issues.async_get_issue(DOMAIN, issue_id) is None
    assert await hass.config_entries.async_unload(entry.entry_id)
