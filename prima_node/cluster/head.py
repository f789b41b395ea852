"""The head of a cluster: forms the ring, keeps it planned, and is the ring executor's link.

``ClusterHead`` puts together the membership (who is in the cluster: ``members.py``), the
planning (the plan, the ring and what it measures: ``planning.py``) and the status view
(``view.py``), and does what needs them all: the first ring (``setup``), planning again
(``replan``), finding the node that stalled a round, and the KV-cache operations on every
node. It runs on the event loop.

``HeadRingLink`` is the same head seen from the model thread: the ``RingLink`` the executor
(``ring.py``) runs through. It hands frames to the event loop, waits for them to come back on
the head node's returned queue, watches the membership's events while it waits, and asks the
event loop to plan again when the ring broke.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Coroutine
from typing import Any

from ..errors import ClusterError, NodeUnreachableError, PrimaError
from ..planner.halda import Plan
from .control import NodeError
from .frames import Frame, encode
from .members import Member, Membership
from .node import ClusterNode
from .planning import Planning, WindowLoadError
from .ring import CacheOp, RingError, RingSlot
from .view import cluster_view

_LOG = logging.getLogger("prima.cluster")
LIVENESS_POLL_S = 0.25
REPLAN_TIMEOUT_S = 600.0


class ClusterHead:
    """The head's cluster: membership, planning and the status view, on the event loop."""

    def __init__(self, node: ClusterNode, peers: list[str], address: str,
                 force_k: int | None = None, use_all: bool = False) -> None:
        self.node = node
        self.planning = Planning(node, force_k, use_all)
        self.membership = Membership(node, address, peers, on_stale=self.mark_stale)

    # the figures the status view, the tests and the ring link read
    @property
    def members(self) -> list[Member]:
        return self.membership.members

    @property
    def plan(self) -> Plan | None:
        return self.planning.plan

    @property
    def ring(self) -> list[Member]:
        return self.planning.ring

    @property
    def needs_plan(self) -> bool:
        return self.planning.needs_plan

    def mark_stale(self) -> None:
        """The membership changed or a step failed: plan again before the next request."""
        self.planning.needs_plan = True

    def view(self) -> dict[str, Any]:
        return cluster_view(self.membership, self.planning)

    # -- forming and re-forming the ring ------------------------------------------------------

    async def setup(self) -> None:
        """Admit the configured peers, plan and load the first ring, watch the membership."""
        await self.membership.connect_peers()
        await self._apply(await self.planning.make(self.members))
        self.membership.start()

    async def replan(self, k: int | None = None, *, fresh_links: bool = True,
                     remeasure: bool = True, keep_same: bool = False) -> None:
        """Plan again with the members that are connected and not benched (``make``,
        ``apply``)."""
        self.membership.members = self.membership.usable()
        self.planning.needs_plan = self.planning.replan_when_idle = False
        _LOG.info("planning again with %d node(s)", len(self.members))
        try:
            await self._apply(await self.planning.make(
                self.members, k, fresh_links=fresh_links, remeasure=remeasure), keep_same)
        except BaseException:
            self.mark_stale()  # half the nodes may hold the new plan: never run on that
            raise

    async def _apply(self, p: Plan, keep_same: bool = False) -> None:
        try:
            await self.planning.apply(p, self.members, keep_same=keep_same)
        except WindowLoadError as failure:
            m = failure.member
            if m.control is not None and m.control.alive:  # it answers but cannot load: hung
                await self.membership.bench(m, str(failure))
            raise RingError(str(failure)) from None
        events = self.membership.events
        while not events.empty():  # what happened before this ring formed is over
            events.get_nowait()

    # -- a ring in trouble --------------------------------------------------------------------

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
            if info.get("last_out") != {"epoch": self.planning.epoch, "step": step, "round": r}:
                culprit, why = m, "the activations reached it and went no further"
                break
        self.mark_stale()
        if culprit is None:
            return f"the ring stalled: round {r + 1} did not come back within {waited_s:.1f} s"
        await self.membership.bench(culprit, why)
        return (f"node {culprit.name} ({culprit.node_id}) stalled the ring: {why} "
                f"(waited {waited_s:.1f} s); the next request runs without it")

    async def cache_op_everywhere(self, op: CacheOp, session: str, n: int = 0) -> None:
        """A KV-cache operation on every other ring node. A node that does not answer in time
        holds a cache nobody can trust: it is benched like a node that stalls a round."""
        limit = self.planning.round_deadline_s(1)
        for m in self.ring[1:]:
            if m.control is None or not m.control.alive:
                continue  # gone: it will not be in the next ring
            try:
                await m.control.call("kv", timeout=limit, action=op.value, session=session,
                                     n=n)
            except NodeError as exc:
                if not m.control.alive:
                    continue  # it went away meanwhile: the forward reports that
                _LOG.warning("KV %s on %s failed: %s", op.value, m.name, exc)
                await self.membership.bench(m, "it did not carry out a KV-cache operation "
                                               "in time")
                raise RingError(f"node {m.name} ({m.node_id}) stalled the ring: {exc}; the "
                                "next request runs without it") from None

    async def close(self) -> None:
        await self.membership.close()


class HeadRingLink:
    """The ring executor's link to the cluster (model thread), through the head's event loop."""

    def __init__(self, head: ClusterHead, loop: asyncio.AbstractEventLoop) -> None:
        self.head = head
        self.node = head.node
        self.loop = loop

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def slot(self) -> RingSlot:
        a, pager = self.node.assignment, self.node.pager
        if a is None:
            raise RingError("the cluster has no plan yet")
        return RingSlot(a.epoch, a.windows, self.node.out_ws is None, len(self.head.ring),
                        pager.before_use if pager is not None else _nothing,
                        pager.after_use if pager is not None else _nothing)

    def send(self, frame: Frame) -> None:
        data = encode(frame, self.node.config.link_dtype)
        self._check(frame.step)
        out = self.node.out_ws
        if out is None:
            raise RingError("the ring link to the next node is down")
        try:
            self._call(out.send_bytes(data))
        except (ConnectionError, RuntimeError) as exc:
            raise RingError(f"cannot send to the next node: {exc}") from None

    def receive(self, step: int, round: int, n_tokens: int) -> Frame:
        """The frame of (step, round) back from the last node; RingError when a node failed
        or went away, or when it does not come back by the round's deadline."""
        epoch = self.slot().epoch
        t_sent = time.monotonic()
        deadline = self.head.planning.round_deadline_s(n_tokens)
        while True:
            self._check(step)
            try:
                back = self.node.returned.get(timeout=LIVENESS_POLL_S)
            except queue.Empty:
                waited = time.monotonic() - t_sent
                if waited > deadline:
                    raise RingError(self._call(self.head.find_stall(step, round, waited))) \
                        from None
                continue
            if (back.epoch, back.step, back.round) == (epoch, step, round):
                return back
            _LOG.debug("dropped a stale frame (step %d, round %d)", back.step, back.round)

    def _check(self, step: int) -> None:
        """Raise what a ring node reported for this step (or for none in particular)."""
        ring = {m.node_id for m in self.head.ring}
        events = self.head.membership.events
        while True:
            try:
                node_id, at, error = events.get_nowait()
            except queue.Empty:
                break
            if node_id in ring and (at is None or at == step):  # not an abandoned step's
                raise error
        gone = self._gone()
        if gone is not None:
            raise RingError(gone)

    def _gone(self) -> str | None:
        for m in self.head.ring[1:]:
            if m.control is not None and not m.control.alive:
                return f"node {m.name} ({m.node_id}) went away: {m.control.closed_reason}"
        return None

    def broken(self) -> str | None:
        gone = self._gone()
        if gone is not None:
            return gone
        if self.node.out_ws is not None and self.node.out_ws.closed:
            return "the ring link to the next node closed"
        if self.node.assignment is None:
            return "the cluster has no complete plan"
        return None

    def mark_broken(self) -> None:
        self.head.mark_stale()

    def ensure(self) -> None:
        """Plan again when a ring member went away, a plan failed half-way or a node came
        back: between requests, or in the middle of one after a failure (every KV cache
        starts empty in the new ring: the executor evaluates the session's again)."""
        if self.broken() or self.head.needs_plan:
            try:
                # a request waits: no benchmarks (the idle work measures), and the links
                # of the last plan where they were all measured
                self._call(self.head.replan(fresh_links=False, remeasure=False),
                           timeout=REPLAN_TIMEOUT_S)
            except Exception as exc:
                raise RingError(f"the ring could not be planned again: {exc}") from exc
            while True:  # frames of the old ring
                try:
                    self.node.returned.get_nowait()
                except queue.Empty:
                    break

    def cache_op(self, op: CacheOp, session: str, n: int) -> None:
        self._call(self.head.cache_op_everywhere(op, session, n))

    def record(self, marks: list[tuple[int, int]], token_s: float, output_s: float) -> None:
        self.head.planning.record(marks, token_s, output_s)

    def wants_idle_plan(self) -> bool:
        """A plan is due once nobody waits (the ring contradicted a node's profile)."""
        return self.head.planning.replan_when_idle

    async def idle_measure(self) -> None:
        """Event loop, once the cluster is idle, without holding the model: measure the
        nodes the ring contradicted (seconds of benchmarks that a request arriving meanwhile
        does not wait for)."""
        try:
            await self.head.planning.profiles(self.head.membership.usable())
        except Exception as exc:  # the plan measures them then
            _LOG.warning("measuring nodes again while idle failed: %s", exc)

    def idle_plan(self) -> None:
        """Plan again while the cluster is idle (model thread, holding the model's turn),
        from the profiles just measured and the links of the last plan: quick, and the ring
        is kept, caches included, when the plan gives every node its windows."""
        try:
            self._call(self.head.replan(fresh_links=False, keep_same=self.broken() is None),
                       timeout=REPLAN_TIMEOUT_S)
        except Exception as exc:  # the next request plans again (mark_stale was called)
            _LOG.warning("planning the ring again while idle failed: %s", exc)
        while True:  # frames of an old ring
            try:
                self.node.returned.get_nowait()
            except queue.Empty:
                break

    def plan_now(self, k: int | None = None) -> dict[str, Any]:
        """Plan again at once (model thread, between answers): ``POST /api/plan``."""
        try:
            self._call(self.head.replan(k), timeout=REPLAN_TIMEOUT_S)
        except (PrimaError, ValueError) as exc:  # ValueError: Halda's PlanError
            raise ClusterError(f"no plan: {exc}") from exc
        except (ConnectionError, NodeError, TimeoutError) as exc:
            raise NodeUnreachableError(f"no plan now: {exc or 'a node did not answer in time'}"
                                       ) from exc
        return self.head.view()


def _nothing(_round: int) -> None:
    """No pager on this node: nothing to do before or after a window runs."""
