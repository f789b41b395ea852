"""The cluster's state in Home Assistant: the head's status document, pushed and polled.

The head pushes its status document over ``/api/events`` whenever it changes (a request
taking its turn, a node joining, a plan); the coordinator listens there and polls
``/api/status`` only while that stream is down. It also keeps what the document alone cannot
say: since when each node has been missing, so that a node away for long raises a repair issue
and one gone for good loses its device.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from homeassistant.core import callback
from homeassistant.exceptions import ConfigEntryAuthFailed
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator, UpdateFailed
from homeassistant.util import dt as dt_util

from .api import PrimaAuthError, PrimaClient, PrimaError
from .const import (
    DOMAIN,
    LOGGER,
    NODE_OFFLINE_ISSUE_S,
    POLL_INTERVAL_S,
    STALE_NODE_S,
    SUPPORTED_API_VERSIONS,
)

if TYPE_CHECKING:
    from homeassistant.config_entries import ConfigEntry
    from homeassistant.core import HomeAssistant

#: seconds between reconnection attempts of the event stream (doubling up to the poll interval)
RECONNECT_MIN_S = 1.0
#: seconds between checks of how long nodes have been away, also while the status is quiet
HOUSEKEEPING_S = 60


def cluster_nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes of a status document (a lone node lists itself)."""
    cluster = doc.get("cluster")
    nodes = cluster.get("nodes") if isinstance(cluster, dict) else None
    return [n for n in nodes or [] if isinstance(n, dict) and isinstance(n.get("node_id"), str)]


class PrimaCoordinator(DataUpdateCoordinator[dict[str, Any]]):
    """The head's status document; ``data`` is the newest one."""

    config_entry: ConfigEntry

    def __init__(self, hass: HomeAssistant, entry: ConfigEntry, client: PrimaClient) -> None:
        super().__init__(hass, LOGGER, config_entry=entry, name=DOMAIN,
                         update_interval=timedelta(seconds=POLL_INTERVAL_S))
        self.client = client
        self.pushing = False  # the event stream is connected
        self.last_seen: dict[str, float] = {}  # node id -> monotonic time last listed online
        self.known_nodes: dict[str, dict[str, Any]] = {}  # node id -> its last entry
        self._push_task: asyncio.Task[None] | None = None
        self.hub_device_id = ""  # the cluster hub's device registry id, once registered

    @property
    def cluster_id(self) -> str:
        return str(self.data.get("cluster_id") or self.data["node_id"])

    async def _async_update_data(self) -> dict[str, Any]:
        try:
            doc = await self.client.status()
        except PrimaAuthError as exc:
            raise ConfigEntryAuthFailed(translation_domain=DOMAIN,
                                        translation_key="invalid_auth") from exc
        except PrimaError as exc:
            raise UpdateFailed(translation_domain=DOMAIN, translation_key="cannot_connect",
                               translation_placeholders={"url": self.client.url,
                                                         "error": str(exc)}) from exc
        self._track(doc)
        return doc

    # -- the pushed status -----------------------------------------------------------------------

    def start_push(self) -> None:
        """Listen to the head's event stream for as long as the entry is loaded."""
        self._push_task = self.config_entry.async_create_background_task(
            self.hass, self._push(), f"{DOMAIN} events from {self.client.url}")
        self.config_entry.async_on_unload(async_track_time_interval(
            self.hass, self._housekeeping, timedelta(seconds=HOUSEKEEPING_S)))

    @callback
    def _housekeeping(self, _now: datetime) -> None:
        """Repair issues and stale devices follow the time a node is away, not only the
        documents: a quiet head pushes nothing while its worker stays away. Nodes age only
        while the head answers (a cluster switched off for a week keeps its devices), and the
        nodes the newest document lists online are seen now."""
        if self.data is None or not self.last_update_success:
            return
        now = time.monotonic()
        for node in cluster_nodes(self.data):
            if node.get("online", True):
                self.last_seen[node["node_id"]] = now
        self._issues(self.data, now)
        self.remove_stale_devices()

    async def _push(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                async for doc in self.client.events():
                    if not self.pushing:
                        self.pushing = True
                        self.update_interval = None  # no polling while the head pushes
                        LOGGER.debug("receiving the status from %s as it changes",
                                     self.client.url)
                    delay = RECONNECT_MIN_S
                    if not self.last_update_success:
                        # Home Assistant's "recovered" line is the poller's; a return through
                        # the stream would otherwise pass unsaid after the failure was logged
                        LOGGER.info("The head node at %s is back", self.client.url)
                    self._track(doc)
                    self.async_set_updated_data(doc)
            except PrimaAuthError:
                self._stop_pushing()
                await self.async_request_refresh()  # raises the reauth flow through polling
                return
            except PrimaError as exc:
                LOGGER.debug("event stream from %s: %s", self.client.url, exc)
            self._stop_pushing()
            await asyncio.sleep(delay)
            delay = min(2 * delay, POLL_INTERVAL_S)

    def _stop_pushing(self) -> None:
        if self.pushing:
            self.pushing = False
            self.update_interval = timedelta(seconds=POLL_INTERVAL_S)
            self.config_entry.async_create_task(self.hass, self.async_request_refresh())

    async def async_shutdown(self) -> None:
        if self._push_task is not None:
            self._push_task.cancel()
            self._push_task = None
        await super().async_shutdown()

    # -- membership, repairs ---------------------------------------------------------------------

    def seed_from_registry(self) -> None:
        """Know the nodes this entry has devices for, also those that left while Home
        Assistant was stopped: they then age (and are removed in time) like the others."""
        now = time.monotonic()
        hub = f"cluster-{self.cluster_id}"
        for device in dr.async_entries_for_config_entry(dr.async_get(self.hass),
                                                        self.config_entry.entry_id):
            if device.entry_type is dr.DeviceEntryType.SERVICE:
                continue  # a conversation agent or AI Task entity, not a node
            for domain, ident in device.identifiers:
                if domain == DOMAIN and ident != hub and ident not in self.known_nodes:
                    self.known_nodes[ident] = {"node_id": ident, "name": device.name}
                    self.last_seen.setdefault(ident, now)

    def issue_id(self, kind: str, node_id: str | None = None) -> str:
        """A repair issue's id, scoped to this entry (and node)."""
        entry = self.config_entry.entry_id
        return f"{entry}_{kind}" if node_id is None else f"{entry}_{kind}_{node_id}"

    def _track(self, doc: dict[str, Any]) -> None:
        """Note which nodes are there; raise or clear the repair issues the document implies."""
        now = time.monotonic()
        for node in cluster_nodes(doc):
            node_id = node["node_id"]
            self.known_nodes[node_id] = node
            if node.get("online", True):
                self.last_seen[node_id] = now
            else:
                self.last_seen.setdefault(node_id, now)
        listed = {n["node_id"] for n in cluster_nodes(doc)}
        for node_id in list(self.known_nodes):
            if node_id not in listed:
                self.last_seen.setdefault(node_id, now)
        self._issues(doc, now)

    def missing_for(self, node_id: str) -> float:
        """Seconds since a node was last listed online (0 while it is)."""
        node = self.known_nodes.get(node_id)
        listed = self.data is not None and any(
            n["node_id"] == node_id and n.get("online", True) for n in cluster_nodes(self.data))
        if node is None or listed:
            return 0.0
        return time.monotonic() - self.last_seen.get(node_id, time.monotonic())

    def _issues(self, doc: dict[str, Any], now: float) -> None:
        version = doc.get("api_version")
        self._set_issue(
            "api_version", "incompatible_version", ir.IssueSeverity.ERROR,
            None if version in SUPPORTED_API_VERSIONS else {
                "url": self.client.url, "version": str(version),
                "node_version": str(doc.get("version"))})
        online = {n["node_id"] for n in cluster_nodes(doc) if n.get("online", True)}
        for node_id, node in self.known_nodes.items():
            self._node_issues(node_id, node, now, doc.get("version"), node_id in online)
        error = doc.get("error")
        no_fit = doc.get("state") == "failed" and isinstance(error, str) and "fits" in error
        self._set_issue("model_does_not_fit", "model_does_not_fit", ir.IssueSeverity.ERROR,
                        {"error": str(error)} if no_fit else None)

    def _node_issues(self, node_id: str, node: dict[str, Any], now: float,
                     head_version: Any, online: bool) -> None:
        """A node's own repair issues: away too long, another version than the head's, a GPU
        its build cannot use (the user bought a GPU build; every layer runs on the CPU: said
        while the node is there, an offline one has its own issue)."""
        name = str(node.get("name") or node_id)
        away = now - self.last_seen.get(node_id, now)
        since = None
        if away >= NODE_OFFLINE_ISSUE_S:  # (until its device goes: remove_stale_devices)
            # when it was last seen, to the minute: the same text at every check
            since = dt_util.as_local(dt_util.utc_from_timestamp(
                (time.time() - away) // 60 * 60)).strftime("%Y-%m-%d %H:%M")
        self._set_issue("node_offline", "node_offline", ir.IssueSeverity.WARNING,
                        None if since is None else {"name": name, "since": since}, node_id)
        version = node.get("version")
        self._set_issue("node_version", "node_version", ir.IssueSeverity.ERROR,
                        None if version in (None, head_version) else {
                            "name": name, "version": str(version),
                            "head_version": str(head_version)}, node_id)
        reason = node.get("gpu_unavailable")
        self._set_issue("gpu_unused", "gpu_unused", ir.IssueSeverity.WARNING,
                        {"name": name, "reason": reason}
                        if online and isinstance(reason, str) and reason else None, node_id)

    def _set_issue(self, kind: str, key: str, severity: ir.IssueSeverity,
                   placeholders: dict[str, str] | None, node_id: str | None = None) -> None:
        """Raise a repair issue with these placeholders, or clear it (None: the cause is
        gone); raising it again only updates it."""
        issue_id = self.issue_id(kind, node_id)
        if placeholders is None:
            ir.async_delete_issue(self.hass, DOMAIN, issue_id)
        else:
            ir.async_create_issue(self.hass, DOMAIN, issue_id, is_fixable=False,
                                  severity=severity, translation_key=key,
                                  translation_placeholders=placeholders)

    def remove_stale_devices(self) -> None:
        """Remove the devices of nodes gone for longer than ``STALE_NODE_S`` that the head
        no longer lists."""
        now = time.monotonic()
        registry = dr.async_get(self.hass)
        listed = {n["node_id"] for n in cluster_nodes(self.data)} if self.data else set()
        removed = False
        for node_id, seen in list(self.last_seen.items()):
            if now - seen < STALE_NODE_S or node_id in listed:
                continue  # a node the head lists would come straight back
            device = registry.async_get_device_by_identifier((DOMAIN, node_id),
                                                             self.config_entry.entry_id)
            if device is not None:
                registry.async_remove_device(device.id)
            self.last_seen.pop(node_id, None)
            self.known_nodes.pop(node_id, None)
            for kind in ("node_offline", "node_version", "gpu_unused"):
                ir.async_delete_issue(self.hass, DOMAIN, self.issue_id(kind, node_id))
            removed = True
        if removed:
            self.async_update_listeners()  # the cluster is no longer degraded by it
