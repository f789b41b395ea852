"""The ring's plan: measuring the members, solving Halda, handing out windows, learning from
what the ring then measures.

A plan is made from every member's profile (cached per device; measured again when the ring
contradicts it) and the measured links between every pair of members, then applied: each member
loads its windows and opens its ring link to the next one. Every plan gets a new number (the
epoch, carried by every frame) so that no node runs a frame of an older plan.

While the ring runs, each decode step's per-node compute times and its total are folded into
moving averages (the status document shows them), and what a hop costs beyond its link's
measured time is learnt and priced by the next plan. A node whose compute is far from what its
profile predicted has its figures scaled by what the ring measured, and the ring is planned
again (the node measured again) once the cluster is idle: never between a user and an answer.
A plan that gives every node the windows it holds changes nothing on the nodes: their caches
stay.

``make`` and ``apply`` run on the event loop; ``record`` and ``round_deadline_s`` are called
from the model thread (plain figures, no awaiting).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from ..planner.cluster_file import device_from_profile
from ..planner.halda import Device, Link, Options, Plan, plan
from ..planner.model_profile import ModelProfile
from .control import NodeError
from .members import STALL_FLOOR_S, Member
from .node import ClusterNode

_LOG = logging.getLogger("prima.cluster")
STALL_FACTOR = 4.0  # a round may take this many times the predicted (or measured) time
#: A node's measured compute this many times above or below its profile's prediction, after
#: ``STALE_AFTER_STEPS`` decode steps of a plan, is calibrated and measured again when idle.
STALE_RATIO = 2.0
STALE_AFTER_STEPS = 8
REPROFILE_EVERY_S = 600.0
LOAD_TIMEOUT_S = 300.0  # a first load reads its windows from a cold disk (slow on a Pi)


class WindowLoadError(Exception):
    """A member could not take its windows (the head benches it if it still answers)."""

    def __init__(self, member: Member, error: NodeError) -> None:
        super().__init__(f"node {member.name} ({member.node_id}) could not take its windows: "
                         f"{error}")
        self.member = member


class Planning:
    """The current plan and ring, and what the ring measured of it."""

    def __init__(self, node: ClusterNode, force_k: int | None = None,
                 use_all: bool = False) -> None:
        self.node = node
        self.force_k = force_k
        self.use_all = use_all
        self.plan: Plan | None = None
        self.ring: list[Member] = []
        self.needs_plan = False  # membership or a profile changed: plan before the next forward
        # the plan's number, in every frame: nodes refuse other plans' frames (random start: a
        # second head of the same cluster must not reuse this one's numbers)
        self.epoch = secrets.randbits(32)
        self.planned_at: float | None = None
        self.links: dict[tuple[str, str], Link] = {}  # measured hops of the last plan
        self.measured_ms: dict[int, float] = {}  # ring position -> compute ms per token (EMA)
        self.measured_token_ms: float | None = None  # whole decode step, EMA
        # what a hop costs beyond its link (frame encode and decode, event loops, hand-off to
        # the model thread), learnt from decode steps and priced by the next plan (EMA)
        self.hop_overhead_s: float | None = None
        self.decode_steps = 0  # decode steps measured on this plan
        # nodes whose cached profile the ring contradicts: measured again by the next plan
        self.stale_profiles: set[str] = set()
        # node id -> measured / predicted compute: the profile's speeds scaled until the node
        # is measured again
        self.calibration: dict[str, float] = {}
        self.replan_when_idle = False  # a better plan may exist: make it when nobody waits
        self.reprofiled_at: dict[str, float] = {}  # node id -> monotonic time last measured
        self.disk_speed: dict[str, float] = {}  # node id -> its profile's disk read bytes/s

    def wire_bytes(self) -> int:
        """Bytes per number of the activations on the ring links (``--link-dtype``)."""
        return 2 if self.node.config.link_dtype == "f16" else 4

    # -- making and applying a plan -----------------------------------------------------------

    async def make(self, members: list[Member], k: int | None = None, *,
                   fresh_links: bool = True, remeasure: bool = True) -> Plan:
        """Halda's plan for these members (the head first), from their profiles (see
        ``profiles``) and links (measured again, or those of the last plan where it measured
        them all)."""
        profiles = await self.profiles(members, remeasure)
        if fresh_links or any((a.node_id, b.node_id) not in self.links
                              for a in members for b in members if a is not b):
            self.links = await self._links(members)
        devices = [_calibrated(device_from_profile(p), self.calibration.get(m.node_id, 1.0))
                   for m, p in zip(members, profiles, strict=True)]
        options = Options(n_ctx=self.node.config.n_ctx,
                          k=k if k is not None else self.force_k, head=0, use_all=self.use_all,
                          hop_overhead_s=self.hop_overhead_s or 0.0,
                          activation_bytes=self.wire_bytes())
        # reading the file's shapes and solving the programs take from a tenth of a second to
        # seconds (80 layers on four devices: about 2 s here): off the event loop, which keeps
        # answering requests, pings and handshakes meanwhile
        result = await asyncio.get_running_loop().run_in_executor(
            None, _plan, self.node.config.model_path, devices, options, dict(self.links))
        names = {m.node_id: m.name for m in members}
        _LOG.info("plan: k=%d, ring %s, predicted %.1f ms/token", result.k,
                  " -> ".join(names.get(d, d) for d in result.ring), 1e3 * result.latency_s)
        return result

    async def profiles(self, members: list[Member], remeasure: bool = True
                       ) -> list[dict[str, Any]]:
        """The members' profiles: cached, or (``remeasure``) measured again for the nodes
        the ring contradicted (``stale_profiles``), whose calibration then ends. A plan made
        while a request waits (a node failed) does not measure: the calibration stands in,
        and the nodes stay due for measuring when the cluster is idle."""
        loop = asyncio.get_running_loop()
        if not remeasure:
            stale: set[str] = set()
        else:
            stale, self.stale_profiles = self.stale_profiles, set()
        for m in members:
            if m.node_id in stale:
                _LOG.info("measuring node %s again: its cached profile is far from what the "
                          "ring measured", m.name)
        try:
            profiles = [await loop.run_in_executor(None, self.node.profile,
                                                   members[0].node_id in stale)]
            for m in members[1:]:
                assert m.control is not None
                profiles.append((await m.control.call("profile", timeout=300,
                                                      refresh=m.node_id in stale))["profile"])
        except BaseException:
            self.stale_profiles |= stale  # not measured: the next plan tries again
            raise
        now = time.monotonic()
        for node_id in stale:
            self.reprofiled_at[node_id] = now
            self.calibration.pop(node_id, None)  # measured afresh: the profile speaks again
        for member, profile in zip(members, profiles, strict=True):
            disk = profile.get("disk")
            if isinstance(disk, dict) and isinstance(disk.get("sequential_bytes_per_s"),
                                                     (int, float)):
                self.disk_speed[member.node_id] = float(disk["sequential_bytes_per_s"])
        return profiles

    async def _links(self, members: list[Member]) -> dict[tuple[str, str], Link]:
        links: dict[tuple[str, str], Link] = {}
        for a in members:
            for b in members:
                if a is b:
                    continue
                if a.control is None:
                    hop = await self.node.measure_link(b.url)
                else:
                    hop = (await a.control.call("link", url=b.url))["link"]
                links[(a.node_id, b.node_id)] = Link(hop["latency_s"], hop["bytes_per_s"])
        return links

    async def apply(self, p: Plan, members: list[Member], *, keep_same: bool = False
                    ) -> None:
        """Every ring member loads its windows under a new plan number; the plan and its
        figures start afresh. With ``keep_same`` (a healthy ring), a plan whose windows are
        the ones the ring holds (the same ring, rounds, layers and streaming) only replaces
        the figures: nothing reloads, and the caches stay. (A load is also what opens the
        ring's links again, so a ring in trouble always loads.) Raises WindowLoadError
        naming a member that could not."""
        by_id = {m.node_id: m for m in members}
        ring = [by_id[node_id] for node_id in p.ring]
        if not keep_same or self.plan is None or _windows(p) != _windows(self.plan) \
                or [m.node_id for m in ring] != [m.node_id for m in self.ring] \
                or self.node.assignment is None:
            await self._load(p, ring)
        else:
            _LOG.info("the new plan gives every node the windows it holds: the ring and its "
                      "caches stay")
        self.plan, self.ring = p, ring
        self.planned_at = time.time()
        self.measured_ms, self.measured_token_ms = {}, None
        self.decode_steps = 0

    async def _load(self, p: Plan, ring: list[Member]) -> None:
        self.epoch = (self.epoch + 1) % 2**32
        for i, (member, dp) in enumerate(zip(ring, p.devices, strict=True)):
            successor = ring[(i + 1) % len(ring)].url if len(ring) > 1 else None
            stream = dp.streamed_bytes > 0
            if member.control is None:
                await self.node.load(i, dp.ranges, successor, p.k, self.epoch, stream,
                                     dp.gpu_layers, p.output_on_gpu)
                continue
            try:
                await member.control.call("load", timeout=LOAD_TIMEOUT_S, index=i,
                                          ranges=dp.ranges, successor=successor, k=p.k,
                                          epoch=self.epoch, stream=stream,
                                          gpu_layers=dp.gpu_layers)
            except NodeError as exc:
                raise WindowLoadError(member, exc) from None

    # -- what the ring measures (model thread) ------------------------------------------------

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
        per_hop = self._hop_residual(p, marks, token_s, output_s)
        if per_hop is not None:
            old_h = self.hop_overhead_s
            self.hop_overhead_s = per_hop if old_h is None else 0.8 * old_h + 0.2 * per_hop

    def _hop_residual(self, p: Plan, marks: list[tuple[int, int]], token_s: float,
                      output_s: float) -> float | None:
        """A decode step's time not explained by compute, output and the links, per hop."""
        if len(self.ring) < 2 or self.node.model is None:
            return None
        nbytes = self.node.model.config.n_embd * self.wire_bytes()
        ids = [m.node_id for m in self.ring]
        links = [self.links.get((a, b)) for a, b in zip(ids, ids[1:] + ids[:1], strict=True)]
        if any(link is None for link in links):
            return None
        network = p.k * sum(link.hop_s(nbytes) for link in links if link is not None)
        residual = token_s - sum(us for _, us in marks) / 1e6 - output_s - network
        return min(max(0.0, residual / (p.k * len(ids))), token_s)

    def _check_profiles(self, p: Plan) -> None:
        """Compare each node's measured compute with what its profile predicted. A profile is
        cached per device and model; one taken while the device was busy (or before a
        change of hardware or power mode) can be several times off, and a plan built on it
        gives that node too few or too many layers. Such a node's speeds are scaled by what
        the ring measured, and a plan made once the cluster is idle prices them (measuring
        the node again, at most once per ``REPROFILE_EVERY_S``): a request never waits for
        it. Only nodes that hold their windows in memory are judged: a streaming node's
        compute time includes its waits for the disk."""
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
            ratio = ms / predicted
            self.calibration[member.node_id] = self.calibration.get(member.node_id, 1.0) * ratio
            measure = now - self.reprofiled_at.get(member.node_id, -REPROFILE_EVERY_S) \
                >= REPROFILE_EVERY_S
            if measure:
                self.stale_profiles.add(member.node_id)
            self.replan_when_idle = True
            _LOG.warning("node %s computes its windows in %.1f ms a token, its profile said "
                         "%.1f ms: its figures are scaled by what the ring measured%s, and the "
                         "ring is planned again once the cluster is idle", member.name, ms,
                         predicted, " (it is measured again then)" if measure else "")


def _plan(model_path: Path, devices: list[Device], options: Options,
          links: dict[tuple[str, str], Link]) -> Plan:
    return plan(devices, ModelProfile.load(model_path), options, links)


def _windows(p: Plan) -> tuple[Any, ...]:
    """What a plan has the nodes load: rounds, and per node its layers and whether it
    streams."""
    return (p.k, tuple((tuple(map(tuple, d.ranges)), d.streamed_bytes > 0) for d in p.devices))


def _calibrated(device: Device, ratio: float) -> Device:
    """The device with its compute speeds divided by ``ratio`` (measured / predicted time)."""
    if ratio == 1.0:
        return device
    gpu = device.gpu_flops
    return dataclasses.replace(
        device, cpu_flops={t: v / ratio for t, v in device.cpu_flops.items()},
        gpu_flops=None if gpu is None else {t: v / ratio for t, v in gpu.items()})
