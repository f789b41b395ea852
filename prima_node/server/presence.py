"""A node's presence on the home network: it advertises itself over mDNS and, on the head,
browses for workers of its cluster so that nobody has to type their addresses.

Discovery is a convenience: where multicast does not reach, ``--peer`` still works, so nothing
here can stop a node from serving. It starts after the node listens (mDNS name probing takes a
second or two, which must not delay the API) and stops before the node exits, saying goodbye
so that browsers drop it at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cluster.discovery import (
    Advertiser,
    Browser,
    Change,
    DiscoveredNode,
    Mdns,
    NodeAnnouncement,
)

_LOG = logging.getLogger("prima.server")


@dataclass(frozen=True)
class Announcement:
    """How a node introduces itself on the network (its TXT record, with the model's file)."""

    node_id: str
    name: str
    role: str  # standalone, head or worker
    host: str  # the address it listens on: mDNS answers on the matching interfaces
    cluster: str | None = None  # the cluster id derived from the secret, if in a cluster


class Presence:
    def __init__(self, model_path: Path, announcement: Announcement,
                 on_change: Callable[[Change, DiscoveredNode], None] | None = None) -> None:
        a = announcement
        self.model_path, self.node_id, self.name = model_path, a.node_id, a.name
        self.role, self.host, self.cluster = a.role, a.host, a.cluster
        self.on_change = on_change  # set: browse as well (the head)
        self.mdns: Mdns | None = None
        self.advertiser: Advertiser | None = None
        self.browser: Browser | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, port: int) -> None:
        """Begin in the background: the node serves meanwhile."""
        self._task = asyncio.create_task(self._start(port), name="discovery")

    async def _start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            ann = await loop.run_in_executor(None, functools.partial(
                NodeAnnouncement.from_model, self.model_path, node_id=self.node_id,
                name=self.name, role=self.role, api_port=port, cluster=self.cluster))
        except (ValueError, OSError) as exc:
            _LOG.warning("not advertising this node: %s", exc)
            return
        self.mdns = await Mdns.open(self.host)
        if self.mdns is None:
            return  # Mdns.open said why
        self.advertiser = Advertiser(ann, port, mdns=self.mdns)
        if await self.advertiser.start():
            _LOG.info("advertised as %s on %s", ann.node_id,
                      ", ".join(self.advertiser.addresses))
        if self.on_change is not None:
            self.browser = Browser(own_id=self.node_id, on_change=self.on_change,
                                   mdns=self.mdns)
            await self.browser.start()

    def discovered(self) -> list[DiscoveredNode]:
        return [] if self.browser is None else list(self.browser.nodes.values())

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.browser is not None:
            await self.browser.stop()
        if self.advertiser is not None:
            await self.advertiser.stop()
        if self.mdns is not None:
            await self.mdns.close()
