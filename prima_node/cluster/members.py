"""Who is in the cluster: admitting workers, finding them over mDNS, benching the ones that hang.

The head's node is the first member (it has no control link: it is this process). Every other
member was admitted over a control link (the cluster secret's challenge-response, then the same
model file). A member whose link breaks is dropped by the watch loop, which also brings back
configured peers that return and takes in workers discovered over mDNS. A member that stalled
the ring is benched: kept out of the plans for ``BENCH_S``, since a node that hangs but still
answers pings would otherwise be planned in again at once.

Runs on the event loop. Errors and departures reported by the control links are queued in
``events`` for the ring executor, which runs on the model thread and checks them while it waits
for a round; any change of membership is announced to ``listeners`` (the status document's
push channel) and through ``on_stale`` to the planning, which plans again before the next
request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import PrimaError
from .auth import AuthError, cluster_id, connect
from .control import ControlLink, NodeError
from .node import RING_PATH, ClusterNode
from .ring import RingError

_LOG = logging.getLogger("prima.cluster")
STALL_FLOOR_S = 3.0  # a round may take this long whatever the plan predicts
BENCH_S = 60.0  # a node that stalled a round stays out of the ring this long


@dataclass
class Member:
    node_id: str
    name: str
    address: str  # host:port
    control: ControlLink | None = None  # None for the head itself
    info: dict[str, Any] = field(default_factory=dict)
    scheme: str = "ws"  # wss on a TLS cluster

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}{RING_PATH}"

    @property
    def alive(self) -> bool:
        return self.control is None or self.control.alive


class Membership:
    """The members, the configured and discovered peers, and the benched addresses."""

    def __init__(self, node: ClusterNode, address: str, peers: list[str],
                 on_stale: Callable[[], None]) -> None:
        self.node = node
        self.peers = peers
        self.on_stale = on_stale  # membership changed: the ring must be planned again
        self.members: list[Member] = [Member(node.config.node_id, node.config.name, address,
                                             scheme=node.config.scheme)]
        #: (node id, step or None, error) from the control links, for the ring executor
        self.events: queue.Queue[tuple[str, int | None, Exception]] = queue.Queue()
        self.listeners: list[Callable[[], None]] = []  # told when nodes join, leave or fail
        self.benched: dict[str, float] = {}  # address -> monotonic time it may rejoin
        self.aliases: dict[str, str] = {}  # another address of a member -> its node id
        self.discovered_at: dict[str, str] = {}  # address from mDNS -> the node's id
        self.discovered: dict[str, dict[str, Any]] = {}  # node id -> what mDNS says of it
        self._watch: asyncio.Task[None] | None = None

    @property
    def workers(self) -> list[Member]:
        return self.members[1:]

    @property
    def cluster(self) -> str:
        return cluster_id(self.node.config.secret)

    def name(self, node_id: str) -> str:
        return next((m.name for m in self.members if m.node_id == node_id), node_id)

    def usable(self) -> list[Member]:
        """The head and every worker that is connected and not benched: who a plan may use."""
        now = time.monotonic()
        return [self.members[0], *(m for m in self.workers
                                   if m.alive and self.benched.get(m.address, 0.0) <= now)]

    # -- admission ----------------------------------------------------------------------------

    async def connect_peers(self) -> None:
        """Admit every configured peer. One that cannot be reached now is left for the watch
        loop to bring in later; one that refuses our secret or holds another model is an error
        the user must fix, so it stops the head from starting."""
        for address in self.peers:
            try:
                await self._join(address)
            except AuthError:
                raise
            except (ConnectionError, NodeError) as exc:
                _LOG.warning("peer %s is not reachable now (%s); the ring forms without it "
                             "and takes it in when it answers", address, exc)

    async def _join(self, address: str) -> None:
        assert self.node.client is not None
        config = self.node.config
        url = f"{config.scheme}://{address}{RING_PATH}"
        ws, peer_id = await connect(self.node.client, url, config.secret, config.node_id,
                                    "control", name=config.name)
        link = ControlLink(ws, peer_id, url, on_event=self._on_event)
        try:
            known = next((m for m in self.members if m.node_id == peer_id), None)
            if known is not None:  # one machine under two addresses (--peer and mDNS, ...)
                self.aliases[address] = peer_id
                _LOG.info("%s is node %s, already in the cluster at %s", address, peer_id,
                          known.address)
                await link.close()
                return
            info = await link.call("info")
            self._check_admissible(address, peer_id, info)
        except BaseException:
            await link.close()
            raise
        self.members.append(Member(peer_id, str(info["name"]), address, link, info,
                                   config.scheme))
        _LOG.info("node %s (%s at %s) joined with the same model", peer_id, info["name"],
                  address)

    def _check_admissible(self, address: str, peer_id: str, info: dict[str, Any]) -> None:
        busy = info.get("busy")
        if busy and float(busy.get("for_s", 0)) > STALL_FLOOR_S:
            self.benched[address] = time.monotonic() + BENCH_S
            raise NodeError(f"node {peer_id} is still stuck in a window for "
                            f"{busy['for_s']:.0f} s")
        mine, theirs = self.node.info()["model"], info["model"]
        if (theirs["size"], theirs["fingerprint"]) != (mine["size"], mine["fingerprint"]):
            raise PrimaError(
                f"node {info['name']} ({address}) holds a different model file: "
                f"{theirs['file']} ({theirs['size']} bytes) where the head has "
                f"{mine['file']} ({mine['size']} bytes); copy the head's file there")

    def _on_event(self, node_id: str, event: dict[str, Any]) -> None:
        name = self.name(node_id)
        if event.get("event") == "error":
            step = event.get("step")
            self.events.put((node_id, step if isinstance(step, int) else None,
                             RingError(f"node {name} ({node_id}) failed: {event.get('message')}")))
        elif event.get("event") == "gone":
            self.events.put((node_id, None, RingError(f"node {name} ({node_id}) went away: "
                                                      f"{event.get('reason')}")))
            _LOG.warning("node %s (%s) went away: %s", name, node_id, event.get("reason"))

    # -- discovery ----------------------------------------------------------------------------

    def on_discovered(self, change: str, node: Any) -> None:
        """A node seen over mDNS (a ``DiscoveredNode``): a worker of this cluster with the
        head's model becomes a peer (taken in by the watch loop within seconds); the others are
        only listed, with the reason."""
        if change == "removed":
            self.discovered.pop(node.node_id, None)
            self._forget(node.node_id)
            return
        mine = self.node.info()["model"]
        why = None
        if node.role != "worker":
            why = f"a {node.role}, not a worker"
        elif node.cluster != self.cluster:
            why = "another cluster (its secret differs)"
        elif (node.size, node.hash) != (mine["size"], mine["fingerprint"]):
            why = f"holds another model file ({node.model}, {node.size} bytes)"
        self.discovered[node.node_id] = {
            "node_id": node.node_id, "name": node.name, "address": node.address,
            "role": node.role, "model": node.model, "version": node.version,
            "adopted": why is None, "reason": why}
        self._forget(node.node_id)  # its addresses may have changed
        if why is None:
            # every address it advertises is a candidate (a Docker bridge may come first);
            # the first that answers joins, the others are skipped while it is a member
            addresses = [f"[{a}]:{node.port}" if ":" in a else f"{a}:{node.port}"
                         for a in node.addresses]
            fresh = [a for a in addresses if a not in self.peers]
            for a in fresh:
                self.peers.append(a)
                self.discovered_at[a] = node.node_id
            if fresh and not any(m.node_id == node.node_id for m in self.members):
                _LOG.info("discovered worker %s (%s) at %s: taking it in", node.name,
                          node.node_id, " or ".join(addresses))

    def _forget(self, node_id: str) -> None:
        """Drop the addresses mDNS gave for a node (never those given with --peer)."""
        gone = {a for a, n in self.discovered_at.items() if n == node_id}
        self.peers = [a for a in self.peers if a not in gone]
        for a in gone:
            del self.discovered_at[a]

    # -- the watch loop -----------------------------------------------------------------------

    def start(self, every_s: float = 2.0) -> None:
        self._watch = asyncio.create_task(self.watch(every_s), name="cluster membership")

    def _snapshot(self) -> list[tuple[str, bool]]:
        return [(m.node_id, m.alive) for m in self.members]

    def _announce(self) -> None:
        for listener in self.listeners:
            listener()

    async def watch(self, every_s: float = 2.0) -> None:
        """Drop members whose link broke, bring back configured peers that returned (so the
        next plan can use them again), refresh each worker's figures, and tell the listeners
        when nodes joined, left or went offline."""
        seen = self._snapshot()
        while True:
            await asyncio.sleep(every_s)
            if self._snapshot() != seen:  # a worker's link broke (or one joined by mDNS)
                seen = self._snapshot()
                self._announce()
            gone = [m for m in self.workers if not m.alive]
            if gone:
                self.members = [m for m in self.members if m not in gone]
                self.on_stale()
            await self._rejoin_peers()
            await self.refresh_info()
            if self._snapshot() != seen:  # nodes left or joined
                seen = self._snapshot()
                self._announce()

    async def _rejoin_peers(self) -> None:
        ids = {m.node_id for m in self.members}
        present = {m.address for m in self.members} | {
            a for a, node_id in (*self.aliases.items(), *self.discovered_at.items())
            if node_id in ids}
        now = time.monotonic()
        for address in self.peers:
            if address in present or self.benched.get(address, 0.0) > now:
                continue
            try:
                await self._join(address)
            except (ConnectionError, PrimaError, NodeError) as exc:
                _LOG.debug("peer %s still away: %s", address, exc)
                continue
            self.on_stale()

    async def refresh_info(self) -> None:
        """Each worker's own figures (paging, busy state) for the status document."""
        for m in self.workers:
            if m.control is None or not m.control.alive:
                continue
            try:
                m.info = await m.control.call("info", timeout=2.0)
            except NodeError as exc:
                _LOG.debug("no info from %s: %s", m.name, exc)

    async def bench(self, m: Member, why: str) -> None:
        """Keep a node that hangs (but still answers pings) out of the plans for a while."""
        self.on_stale()
        self.benched[m.address] = time.monotonic() + BENCH_S
        if m.control is not None:
            await m.control.close()
        _LOG.warning("node %s (%s) stalled the ring (%s); it stays out of the plan for %d s",
                     m.name, m.node_id, why, BENCH_S)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for m in self.workers:
            if m.control is not None:
                await m.control.close()
