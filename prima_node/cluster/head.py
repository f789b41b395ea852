"""The head of a cluster: admits the workers, plans the ring with Halda, hands out windows, and
runs each forward pass around the ring as a drop-in executor for the generation loop.

The generation loop (``generate.Generator``) neither knows nor cares that the transformer runs
on several machines: ``RingExecutor`` offers the same calls as the engine's ``Model`` (forward,
KV-cache truncate/clear/drop), and turns every forward into k rounds through the ring order, in
prefill chunks, on the model thread; the websocket traffic runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClusterError, ContextOverflowError, PrimaError
from ..planner.cluster_file import device_from_profile
from ..planner.halda import Link, Options, Plan, plan
from ..planner.model_profile import ModelProfile
from .auth import AuthError, cluster_id, connect
from .control import ControlLink, NodeError
from .frames import Frame, encode
from .node import RING_PATH, ClusterNode

_LOG = logging.getLogger("prima.cluster")
LIVENESS_POLL_S = 0.25
STALL_FLOOR_S = 3.0  # a round may take this long whatever the plan predicts
STALL_FACTOR = 4.0  # ... or this many times the predicted (or measured) time
BENCH_S = 60.0  # a node that stalled a round stays out of the ring this long
#: A node's measured compute this many times above or below its profile's prediction, after
#: ``STALE_AFTER_STEPS`` decode steps of a plan, gets its profile measured again.
STALE_RATIO = 2.0
STALE_AFTER_STEPS = 8
REPROFILE_EVERY_S = 600.0
LOAD_TIMEOUT_S = 300.0  # a first load reads its windows from a cold disk (slow on a Pi)


class RingError(ClusterError):
    """The ring could not finish a forward pass (a node failed or went away)."""


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


class ClusterHead:
    def __init__(self, node: ClusterNode, peers: list[str], address: str,
                 force_k: int | None = None, use_all: bool = False) -> None:
        self.node = node
        self.peers = peers
        self.force_k = force_k
        self.use_all = use_all
        self.members: list[Member] = [Member(node.config.node_id, node.config.name, address,
                                             scheme=node.config.scheme)]
        self.plan: Plan | None = None
        self.ring: list[Member] = []
        self.events: queue.Queue[tuple[int | None, Exception]] = queue.Queue()  # (step, error)
        self.needs_plan = False  # membership changed: plan again before the next forward
        # the plan's number, in every frame: nodes refuse other plans' frames (random start: a
        # second head of the same cluster must not reuse this one's numbers)
        self.epoch = secrets.randbits(32)
        self.planned_at: float | None = None
        self.measured_ms: dict[int, float] = {}  # ring position -> compute ms per token (EMA)
        self.measured_token_ms: float | None = None  # whole decode step, EMA
        # what a hop costs beyond its link (frame encode and decode, event loops, hand-off to
        # the model thread), learnt from decode steps and priced by the next plan (EMA)
        self.hop_overhead_s: float | None = None
        self.decode_steps = 0  # decode steps measured on this plan
        # nodes whose cached profile the ring contradicts: measured again by the next plan
        self.stale_profiles: set[str] = set()
        self.reprofiled_at: dict[str, float] = {}  # node id -> monotonic time last measured
        self.disk_speed: dict[str, float] = {}  # node id -> its profile's disk read bytes/s
        self._rejoin: asyncio.Task[None] | None = None
        self.benched: dict[str, float] = {}  # address -> monotonic time it may rejoin
        self.aliases: dict[str, str] = {}  # another address of a member -> its node id
        self.discovered_at: dict[str, str] = {}  # address from mDNS -> the node's id
        self.discovered: dict[str, dict[str, Any]] = {}  # node id -> what mDNS says of it
        self.links: dict[tuple[str, str], Link] = {}  # measured hops of the last plan
        #: called when nodes join, leave or go offline: the status document is pushed then
        self.on_change: Callable[[], None] = lambda: None

    # -- membership -------------------------------------------------------------------------------

    async def connect_peers(self) -> None:
        """Admit every configured peer. One that cannot be reached now is left for the
        membership watcher to bring in later; one that refuses our secret or holds another
        model is an error the user must fix, so it stops the head from starting."""
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
        mine = self.node.info()["model"]
        url = f"{self.node.config.scheme}://{address}{RING_PATH}"
        ws, peer_id = await connect(self.node.client, url, self.node.config.secret,
                                    self.node.config.node_id, "control",
                                    name=self.node.config.name)
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
            busy = info.get("busy")
            if busy and float(busy.get("for_s", 0)) > STALL_FLOOR_S:
                self.benched[address] = time.monotonic() + BENCH_S
                raise NodeError(f"node {peer_id} is still stuck in a window for "
                                f"{busy['for_s']:.0f} s")
            theirs = info["model"]
            if (theirs["size"], theirs["fingerprint"]) != (mine["size"], mine["fingerprint"]):
                raise PrimaError(
                    f"node {info['name']} ({address}) holds a different model file: "
                    f"{theirs['file']} ({theirs['size']} bytes) where the head has "
                    f"{mine['file']} ({mine['size']} bytes); copy the head's file there")
        except BaseException:
            await link.close()
            raise
        self.members.append(Member(peer_id, str(info["name"]), address, link, info,
                                   self.node.config.scheme))
        _LOG.info("node %s (%s at %s) joined with the same model", peer_id, info["name"],
                  address)

    def on_discovered(self, change: str, node: Any) -> None:
        """A node seen over mDNS (a ``DiscoveredNode``): a worker of this cluster with the
        head's model becomes a peer (taken in by the membership watcher within seconds);
        the others are only listed, with the reason."""
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

    @property
    def cluster(self) -> str:
        return cluster_id(self.node.config.secret)

    def _membership(self) -> list[tuple[str, bool]]:
        return [(m.node_id, m.control is None or m.control.alive) for m in self.members]

    async def watch_members(self, every_s: float = 2.0) -> None:
        """Bring back configured peers that went away, so the next plan can use them again;
        tell the status document's listeners when nodes joined, left or went offline."""
        seen = self._membership()
        while True:
            await asyncio.sleep(every_s)
            if self._membership() != seen:  # a worker's link broke (or one joined by mDNS)
                seen = self._membership()
                self.on_change()
            gone = [m for m in self.members[1:] if m.control is not None and not m.control.alive]
            if gone:
                self.members = [m for m in self.members if m not in gone]
                self.needs_plan = True
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
                self.needs_plan = True
            await self.refresh_info()
            if self._membership() != seen:  # nodes left or joined
                seen = self._membership()
                self.on_change()

    async def refresh_info(self) -> None:
        """Each worker's own figures (paging, busy state) for the status document."""
        for m in self.members[1:]:
            if m.control is None or not m.control.alive:
                continue
            try:
                m.info = await m.control.call("info", timeout=2.0)
            except NodeError as exc:
                _LOG.debug("no info from %s: %s", m.name, exc)

    async def replan(self, k: int | None = None) -> None:
        now = time.monotonic()
        self.members = [self.members[0], *(m for m in self.members[1:]
                                           if m.control is not None and m.control.alive
                                           and self.benched.get(m.address, 0.0) <= now)]
        self.needs_plan = False
        _LOG.info("planning again with %d node(s)", len(self.members))
        try:
            await self.apply(await self.make_plan(k))
        except BaseException:
            self.needs_plan = True  # half the nodes may hold the new plan: never run on that
            raise

    async def find_stall(self, step: int, r: int, waited_s: float) -> str:
        """Why round ``r`` of ``step`` has not come back: asks every ring node what it is
        doing, names the one holding the activations, and benches it (out of the next plans
        for a while) since a node that hangs but still answers pings would otherwise be
        planned in again at once."""
        async def ask(m: Member) -> dict[str, Any] | None:
            assert m.control is not None
            try:
                return await m.control.call("info", timeout=1.0)
            except NodeError:
                return None

        workers = [m for m in self.ring[1:] if m.control is not None]
        answers = await asyncio.gather(*(ask(m) for m in workers))
        culprit, why = None, "the activations did not come back"
        for m, info in zip(workers, answers, strict=True):
            if info is None:
                culprit, why = m, "it does not answer"
                break
            busy = info.get("busy")
            if busy and (busy.get("step"), busy.get("round")) == (step, r):
                culprit, why = m, f"it has been running its window for {busy['for_s']:.1f} s"
                break
            if info.get("last_out") != {"epoch": self.epoch, "step": step, "round": r}:
                culprit, why = m, "the activations reached it and went no further"
                break
        self.needs_plan = True
        if culprit is None:
            return f"the ring stalled: round {r + 1} did not come back within {waited_s:.1f} s"
        await self.bench(culprit, why)
        return (f"node {culprit.name} ({culprit.node_id}) stalled the ring: {why} "
                f"(waited {waited_s:.1f} s); the next request runs without it")

    def round_deadline_s(self, n_tokens: int) -> float:
        """How long one round of ``n_tokens`` may take before the ring counts as stalled:
        generous (prefill chunks are priced at the decode rate), but short enough that a hung
        node ends the request within seconds."""
        latency = compute = 0.0
        if self.plan is not None:
            latency = self.plan.latency_s
            # a prefill chunk costs each window's compute per token, not its disk streaming
            # (one pass over the weights serves the whole chunk)
            compute = sum(d.compute_s for d in self.plan.devices)
        if self.measured_token_ms is not None:
            latency = max(latency, self.measured_token_ms / 1e3)
        return max(STALL_FLOOR_S, STALL_FACTOR * (latency + compute * (n_tokens - 1)))

    def _on_event(self, node_id: str, event: dict[str, Any]) -> None:
        name = next((m.name for m in self.members if m.node_id == node_id), node_id)
        if event.get("event") == "error":
            step = event.get("step")
            self.events.put((step if isinstance(step, int) else None,
                             RingError(f"node {name} ({node_id}) failed: {event.get('message')}")))
        elif event.get("event") == "gone":
            in_ring = any(m.node_id == node_id for m in self.ring)
            if in_ring:
                self.events.put((None, RingError(f"node {name} ({node_id}) went away: "
                                                 f"{event.get('reason')}")))
            _LOG.warning("node %s (%s) went away: %s", name, node_id, event.get("reason"))

    # -- planning ---------------------------------------------------------------------------------

    async def make_plan(self, k: int | None = None) -> Plan:
        loop = asyncio.get_running_loop()
        stale, self.stale_profiles = self.stale_profiles, set()
        for node_id in stale:
            _LOG.info("measuring node %s again: its cached profile is far from what the ring "
                      "measured", self._name(node_id))
        try:
            profiles = [await loop.run_in_executor(None, self.node._profile,
                                                   self.members[0].node_id in stale)]
            for m in self.members[1:]:
                assert m.control is not None
                profiles.append((await m.control.call("profile", timeout=300,
                                                      refresh=m.node_id in stale))["profile"])
        except BaseException:
            self.stale_profiles |= stale  # not measured: the next plan tries again
            raise
        now = time.monotonic()
        for node_id in stale:
            self.reprofiled_at[node_id] = now
        for member, profile in zip(self.members, profiles, strict=True):
            disk = profile.get("disk")
            if isinstance(disk, dict) and isinstance(disk.get("sequential_bytes_per_s"),
                                                     (int, float)):
                self.disk_speed[member.node_id] = float(disk["sequential_bytes_per_s"])
        links: dict[tuple[str, str], Link] = {}
        for a in self.members:
            for b in self.members:
                if a is b:
                    continue
                if a.control is None:
                    hop = await self.node.measure_link(b.url)
                else:
                    hop = (await a.control.call("link", url=b.url))["link"]
                links[(a.node_id, b.node_id)] = Link(hop["latency_s"], hop["bytes_per_s"])
        self.links = links
        devices = [device_from_profile(p) for p in profiles]
        model = ModelProfile.load(self.node.config.model_path)
        result = plan(devices, model, Options(n_ctx=self.node.config.n_ctx,
                                              k=k if k is not None else self.force_k, head=0,
                                              use_all=self.use_all,
                                              hop_overhead_s=self.hop_overhead_s or 0.0,
                                              activation_bytes=self._wire_bytes()),
                      links)
        _LOG.info("plan: k=%d, ring %s, predicted %.1f ms/token", result.k,
                  " -> ".join(self._name(d) for d in result.ring), 1e3 * result.latency_s)
        return result

    def _wire_bytes(self) -> int:
        """Bytes per number of the activations on the ring links (``--link-dtype``)."""
        return 2 if self.node.config.link_dtype == "f16" else 4

    def _name(self, node_id: str) -> str:
        return next((m.name for m in self.members if m.node_id == node_id), node_id)

    async def apply(self, p: Plan) -> None:
        by_id = {m.node_id: m for m in self.members}
        ring = [by_id[node_id] for node_id in p.ring]
        self.epoch = (self.epoch + 1) % 2**32
        for i, (member, dp) in enumerate(zip(ring, p.devices, strict=True)):
            successor = ring[(i + 1) % len(ring)].url if len(ring) > 1 else None
            if member.control is None:
                await self.node.load(i, dp.ranges, successor, p.k, self.epoch,
                                     dp.streamed_bytes > 0)
            else:
                try:
                    await member.control.call("load", timeout=LOAD_TIMEOUT_S, index=i,
                                              ranges=dp.ranges, successor=successor, k=p.k,
                                              epoch=self.epoch, stream=dp.streamed_bytes > 0)
                except NodeError as exc:
                    if member.control.alive:  # it answers pings but cannot load: hung
                        await self.bench(member, f"it did not load its windows: {exc}")
                    raise RingError(f"node {member.name} ({member.node_id}) could not take "
                                    f"its windows: {exc}") from None
        self.plan, self.ring = p, ring
        self.planned_at = time.time()
        self.measured_ms, self.measured_token_ms = {}, None
        self.decode_steps = 0
        while not self.events.empty():  # what happened before this ring formed is over
            self.events.get_nowait()

    async def setup(self) -> None:
        await self.connect_peers()
        await self.apply(await self.make_plan())
        self._rejoin = asyncio.create_task(self.watch_members(), name="cluster membership")

    def record(self, marks: list[tuple[int, int]], token_s: float, output_s: float = 0.0
               ) -> None:
        """One decode step's per-node compute times (µs marks from the frames), its whole
        duration and the head's output projection, folded into moving averages for the status
        document; what is left once compute, output and the links' measured cost are taken
        off is what the nodes' handling of a hop costs, which the next plan prices."""
        per_node: dict[int, float] = {}
        for index, us in marks:
            per_node[index] = per_node.get(index, 0.0) + us / 1e3
        for index, ms in per_node.items():
            old = self.measured_ms.get(index)
            self.measured_ms[index] = ms if old is None else 0.8 * old + 0.2 * ms
        ms = 1e3 * token_s
        old_t = self.measured_token_ms
        self.measured_token_ms = ms if old_t is None else 0.8 * old_t + 0.2 * ms
        p = self.plan
        if p is None:
            return
        self.decode_steps += 1
        if self.decode_steps == STALE_AFTER_STEPS:
            self._check_profiles(p)
        if len(self.ring) < 2:
            return
        nbytes = (self.node.model.config.n_embd * self._wire_bytes()
                  if self.node.model is not None else 0)
        ids = [m.node_id for m in self.ring]
        links = [self.links.get((a, b)) for a, b in zip(ids, ids[1:] + ids[:1], strict=True)]
        if any(link is None for link in links):
            return
        network = p.k * sum(link.hop_s(nbytes) for link in links if link is not None)
        residual = token_s - sum(us for _, us in marks) / 1e6 - output_s - network
        per_hop = min(max(0.0, residual / (p.k * len(ids))), token_s)
        old_h = self.hop_overhead_s
        self.hop_overhead_s = per_hop if old_h is None else 0.8 * old_h + 0.2 * per_hop

    def _check_profiles(self, p: Plan) -> None:
        """Compare each node's measured compute with what its profile predicted. A profile is
        cached per device and model; one taken while the device was busy (or before a
        change of hardware or power mode) can be several times off, and a plan built on it
        gives that node too few or too many layers. Such a node is measured again, at most
        once per ``REPROFILE_EVERY_S``, by a plan made before the next request. Only nodes
        that hold their windows in memory are judged: a streaming node's compute time includes
        its waits for the disk."""
        now = time.monotonic()
        for index, ms in self.measured_ms.items():
            if index >= len(self.ring) or index >= len(p.devices):
                continue
            member, planned = self.ring[index], p.devices[index]
            if planned.streamed_bytes > 0 or planned.regime != "M4":
                continue  # its measured compute includes waiting for the disk
            predicted = 1e3 * planned.compute_s
            if predicted <= 0 or 1 / STALE_RATIO <= ms / predicted <= STALE_RATIO:
                continue
            if now - self.reprofiled_at.get(member.node_id, -REPROFILE_EVERY_S) \
                    < REPROFILE_EVERY_S:
                continue
            _LOG.warning("node %s computes its windows in %.1f ms a token, its profile said "
                         "%.1f ms: it will be measured again before the next request",
                         member.name, ms, predicted)
            self.stale_profiles.add(member.node_id)
            self.needs_plan = True

    def view(self) -> dict[str, Any]:
        """The cluster part of the head's status document."""
        p = self.plan
        positions = {m.node_id: i for i, m in enumerate(self.ring)}
        devices = {d.name: d for d in p.devices} if p is not None else {}
        nodes = []
        for m in self.members:
            d = devices.get(m.node_id)
            pos = positions.get(m.node_id)
            measured = self.measured_ms.get(pos) if pos is not None else None
            info = self.node.info() if m.control is None else m.info
            paging = info.get("paging") or {}
            nodes.append({
                "node_id": m.node_id, "name": m.name,
                "role": "head" if m.control is None else "worker",
                "online": m.control is None or m.control.alive,
                "address": m.address, "layers": None,
                "ranges": [list(r) for r in d.ranges] if d else [],
                "layer_count": d.layers if d else 0,
                "window": d.window if d else 0, "gpu_layers": d.gpu_layers if d else 0,
                "regime": d.regime if d else None,
                "predicted_compute_ms": round(1e3 * d.compute_s, 3) if d else None,
                "predicted_disk_ms": round(1e3 * d.disk_s, 3) if d else None,
                "measured_compute_ms": round(measured, 3) if measured is not None else None,
                "version": info.get("version"), "memory": info.get("memory"),
                "disk_read_bytes_per_s": self.disk_speed.get(m.node_id),
                "paging": {key: paging.get(key) for key in (
                    "enabled", "mode", "tail_layers", "mode_changes", "held_bytes",
                    "capacity_bytes", "uses", "hit_rate", "mean_residency", "prefetches",
                    "releases", "bytes_prefetched", "bytes_released")} if paging else None,
            })
        plan_doc = None
        if p is not None:
            plan_doc = {
                "k": p.k, "ring": list(p.ring),
                "predicted_ms_per_token": round(1e3 * p.latency_s, 3), "bound": p.bound,
                "measured_ms_per_token": None if self.measured_token_ms is None
                else round(self.measured_token_ms, 3),
                "hop_overhead_ms": None if self.hop_overhead_s is None
                else round(1e3 * self.hop_overhead_s, 3),
                "planned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
                    self.planned_at or 0)),
                "dropped": dict(p.dropped)}
        hops = [{"from": a, "to": b, "latency_ms": round(1e3 * link.latency_s, 3),
                 "mbit_per_s": round(8e-6 * link.bytes_per_s, 1)}
                for (a, b), link in sorted(self.links.items())]
        return {"mode": "ring", "nodes": nodes, "plan": plan_doc, "links": hops,
                "discovered": sorted(self.discovered.values(), key=lambda d: d["name"])}

    async def kv_everywhere(self, action: str, session: str, n: int = 0) -> None:
        """A KV-cache operation on every ring node. A node that does not answer in time holds
        a cache nobody can trust: it is benched like a node that stalls a round."""
        limit = self.round_deadline_s(1)
        for m in self.ring[1:]:
            if m.control is None or not m.control.alive:
                continue  # gone: it will not be in the next ring
            try:
                await m.control.call("kv", timeout=limit, action=action, session=session, n=n)
            except NodeError as exc:
                if not m.control.alive:
                    continue  # it went away meanwhile: the forward reports that
                _LOG.warning("KV %s on %s failed: %s", action, m.name, exc)
                await self.bench(m, "it did not carry out a KV-cache operation in time")
                raise RingError(f"node {m.name} ({m.node_id}) stalled the ring: {exc}; the "
                                "next request runs without it") from None

    async def bench(self, m: Member, why: str) -> None:
        """Keep a node that hangs (but still answers pings) out of the plans for a while."""
        self.needs_plan = True
        self.benched[m.address] = time.monotonic() + BENCH_S
        if m.control is not None:
            await m.control.close()
        _LOG.warning("node %s (%s) stalled the ring (%s); it stays out of the plan for %d s",
                     m.name, m.node_id, why, BENCH_S)

    async def close(self) -> None:
        if self._rejoin is not None:
            self._rejoin.cancel()
        for m in self.members[1:]:
            if m.control is not None:
                await m.control.close()


class RingExecutor:
    """The generation loop's executor for a ring (runs on the model thread)."""

    def __init__(self, head: ClusterHead, loop: asyncio.AbstractEventLoop) -> None:
        self.head, self.loop = head, loop
        self.node = head.node
        self.model = head.node.model
        self._frames: queue.Queue[Frame] = queue.Queue()
        self.node.on_round_done = self._frames.put
        self._step = 0
        self.last_marks: list[tuple[int, int]] = []

    # properties the loop reads
    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    @property
    def n_vocab(self) -> int:
        return int(self.model.n_vocab)

    @property
    def path(self) -> Path:
        return Path(self.model.path)

    def describe(self) -> dict[str, Any]:
        """The model, as the status document shows it (every node holds the same file)."""
        return dict(self.model.describe())

    def _windows(self) -> list[Any]:
        a = self.node.assignment
        if a is None:
            raise RingError("the cluster has no plan yet")
        return list(a.windows)

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def forward(self, token_ids: Any, session: str = "default") -> np.ndarray:
        from ..engine.model import DEFAULT_BATCH

        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no tokens to evaluate")
        broken = self._broken()
        if broken:  # mid-request: fail now; the next request's n_cached plans a new ring
            self.head.needs_plan = True
            raise RingError(broken)
        pos0 = int(self._windows()[0].n_cached(session))
        if pos0 + ids.size > self.n_ctx:
            raise ContextOverflowError(
                f"{ids.size} tokens from position {pos0} go beyond the context of "
                f"{self.n_ctx} tokens (start the cluster with a larger --ctx, or shorten the "
                "prompt)")
        h = None
        t0 = time.perf_counter()
        marks: list[tuple[int, int]] = []
        for a in range(0, ids.size, DEFAULT_BATCH):
            chunk = ids[a:a + DEFAULT_BATCH]
            pos = np.arange(pos0 + a, pos0 + a + chunk.size, dtype=np.int64)
            h = self.model.embed(chunk)
            for r in range(len(self._windows())):
                try:
                    h = self._round(h, r, pos, session)
                except RingError:
                    self.head.needs_plan = True  # a broken link or node: a new ring next time
                    raise
                marks += self.last_marks
        assert h is not None
        t1 = time.perf_counter()
        logits = np.asarray(self.model.head(h[-1:])[0])
        if ids.size == 1:  # a decode step: what the status shows per node
            t2 = time.perf_counter()
            self.head.record(marks, t2 - t0, t2 - t1)
        return logits

    def replan_now(self, k: int | None = None) -> dict[str, Any]:
        """Plan again at once (model thread, between answers): ``POST /api/plan``."""
        try:
            self._call(self.head.replan(k), timeout=600)
        except PrimaError as exc:
            raise ClusterError(f"no plan: {exc}") from exc
        except ValueError as exc:  # PlanError
            raise ClusterError(f"no plan: {exc}") from exc
        return self.head.view()

    def _round(self, h: np.ndarray, r: int, pos: np.ndarray, session: str) -> np.ndarray:
        windows = self._windows()
        pager = self.node.pager
        if pager is not None:
            pager.before_use(r)
        t0 = time.perf_counter()
        h = windows[r].forward(h, pos, session)
        mark = (0, int(1e6 * (time.perf_counter() - t0)))
        out_ws = self.node.out_ws
        if out_ws is None:  # a ring of one
            self.last_marks = [mark]
            return h
        self._step = (self._step + 1) % 2**32
        step = self._step
        epoch = self.head.epoch
        frame = Frame(session, epoch, step, r, len(windows), int(pos[0]), h, [mark])
        data = encode(frame, self.node.config.link_dtype)
        self._check_events()
        try:
            self._call(out_ws.send_bytes(data))
        except (ConnectionError, RuntimeError) as exc:
            raise RingError(f"cannot send to the next node: {exc}") from None
        if pager is not None:
            pager.after_use(r)
        t_sent = time.monotonic()
        deadline = self.head.round_deadline_s(int(pos.size))
        while True:
            self._check_events()
            try:
                back = self._frames.get(timeout=LIVENESS_POLL_S)
            except queue.Empty:
                waited = time.monotonic() - t_sent
                if waited > deadline:
                    raise RingError(self._call(self.head.find_stall(step, r, waited))) from None
                continue
            if (back.epoch, back.step, back.round) == (epoch, step, r):
                self.last_marks = back.marks
                return back.hidden
            _LOG.debug("dropped a stale frame (step %d, round %d)", back.step, back.round)

    def _broken(self) -> str | None:
        for m in self.head.ring[1:]:
            if m.control is not None and not m.control.alive:
                return f"node {m.name} ({m.node_id}) went away: {m.control.closed_reason}"
        if self.node.out_ws is not None and self.node.out_ws.closed:
            return "the ring link to the next node closed"
        if self.node.assignment is None:
            return "the cluster has no complete plan"
        return None

    def ensure_ring(self) -> None:
        """Plan again when a ring member went away, a plan failed half-way or a node came
        back. Only between requests (the loop asks ``n_cached`` before deciding what to
        evaluate), since every KV cache starts empty in the new ring."""
        if self._broken() or self.head.needs_plan:
            try:
                self._call(self.head.replan(), timeout=600)
            except Exception as exc:
                raise RingError(f"the ring could not be planned again: {exc}") from exc
            while True:  # frames of the old ring
                try:
                    self._frames.get_nowait()
                except queue.Empty:
                    break

    def _check_events(self) -> None:
        while True:
            try:
                step, error = self.head.events.get_nowait()
            except queue.Empty:
                break
            if step is None or step == self._step:  # not an abandoned step's
                raise error
        for m in self.head.ring[1:]:
            if m.control is not None and not m.control.alive:
                raise RingError(f"node {m.name} ({m.node_id}) went away: "
                                f"{m.control.closed_reason}")

    # KV-cache operations reach every node of the ring
    def n_cached(self, session: str = "default") -> int:
        """Positions the ring holds for the session; a pending re-plan happens here, where
        the loop learns what it must evaluate (a new ring holds nothing)."""
        try:
            self.ensure_ring()
        except RingError as exc:
            _LOG.warning("%s", exc)
            return 0  # the next forward reports the broken ring to the request
        return int(self._windows()[0].n_cached(session))

    def _kv(self, action: str, session: str, n: int = 0) -> None:
        for w in self._windows():
            getattr(w, action)(session, *([n] if action == "truncate" else []))
        self._call(self.head.kv_everywhere(action, session, n))

    def truncate(self, session: str, n: int) -> None:
        self._kv("truncate", session, n)

    def clear(self, session: str = "default") -> None:
        self._kv("clear", session)

    def drop(self, session: str) -> None:
        self._kv("drop", session)

    def warm_up(self) -> None:
        """The ring's windows were warmed when they were loaded; here only the head's own
        steps (embedding lookup and output head), without building the whole model's window
        that ``Model.warm_up`` would."""
        self.model.head(self.model.embed([1]))

    def close(self) -> None:
        self.node.on_round_done = None
