"""One chunk of tokens, k times around the ring: the generation loop's executor on a cluster.

The generation loop neither knows nor cares that the transformer runs on several machines:
``RingExecutor`` offers the calls of the engine's ``Model`` (forward one chunk; the cache
operations clear, truncate, drop) and turns each forward into k rounds. It runs on the model
thread and knows the rest of the cluster only through a ``RingLink`` (the head implements it):
this node's slot of the plan, sending a frame to the next node, waiting for the frame of (step,
round) to come back, and the cache operations on the other nodes.

One ring round, seen from the head (threads in brackets)::

    [model thread]  embed (round 0) -> the head's window of round r -> encode a frame
                    -> link.send: handed to [event loop], which writes it to the next node
    [next nodes]    each runs its window of round r on its own model thread and sends on
    [event loop]    the frame comes back on the head node's ring link -> the returned queue
    [model thread]  link.receive takes it (checking, while it waits, for errors the nodes
                    reported and for a stall: no frame within the round's deadline), and
                    round r + 1 starts; after k rounds, the output projection gives logits.

A failure anywhere ends the forward with a RingError naming the node; the ring is planned
again before the next request (``n_cached`` is where the loop asks, before it evaluates).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ClusterError
from .frames import Frame

if TYPE_CHECKING:
    from ..engine.model import Model
    from ..engine.window import LayerWindow

_LOG = logging.getLogger("prima.cluster")


class RingError(ClusterError):
    """The ring could not finish a forward pass (a node failed or went away)."""


class CacheOp(Enum):
    """A KV-cache operation, the same name at every level (generation loop, executor, node,
    control message)."""

    CLEAR = "clear"  # forget a session's positions, keep its memory
    TRUNCATE = "truncate"  # keep a session's first n positions (prefix reuse)
    DROP = "drop"  # release a session's memory


def apply_cache_op(windows: Sequence[LayerWindow], op: CacheOp, session: str, n: int = 0
                   ) -> None:
    for w in windows:
        if op is CacheOp.CLEAR:
            w.clear(session)
        elif op is CacheOp.TRUNCATE:
            w.truncate(session, n)
        else:
            w.drop(session)


@dataclass(frozen=True)
class RingSlot:
    """This node's part of the current plan, as the executor uses it."""

    epoch: int  # the plan's number, carried by every frame
    windows: Sequence[LayerWindow]  # one per round
    alone: bool  # a ring of one: no frame leaves this node
    before_use: Callable[[int], None]  # the pager: round r's window is about to run
    after_use: Callable[[int], None]  # ... and has run (its activations are on their way)


class RingLink(Protocol):
    """What the executor needs of the cluster, and nothing else."""

    def slot(self) -> RingSlot: ...
    def send(self, frame: Frame) -> None: ...
    def receive(self, step: int, round: int, n_tokens: int) -> Frame: ...
    def broken(self) -> str | None: ...
    def mark_broken(self) -> None: ...
    def ensure(self) -> None: ...
    def cache_op(self, op: CacheOp, session: str, n: int) -> None: ...
    def record(self, marks: list[tuple[int, int]], token_s: float, output_s: float) -> None: ...


class RingExecutor:
    """The generation loop's executor for a ring (model thread)."""

    def __init__(self, model: Model, link: RingLink, max_tokens: int) -> None:
        self.model = model
        self.link = link
        self.max_tokens = max_tokens  # the largest chunk a frame carries
        self._step = 0
        self.last_marks: list[tuple[int, int]] = []

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

    def forward(self, token_ids: Any, session: str = "default") -> np.ndarray:
        """One chunk (at most ``max_tokens``) after the session's cached positions, k times
        around the ring; logits of its last token."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if not 0 < ids.size <= self.max_tokens:
            raise ValueError(f"a ring step takes 1 to {self.max_tokens} tokens, not {ids.size}")
        broken = self.link.broken()
        if broken:  # mid-request: fail now; the next request's n_cached plans a new ring
            self.link.mark_broken()
            raise RingError(broken)
        slot = self.link.slot()
        pos0 = int(slot.windows[0].n_cached(session))
        pos = np.arange(pos0, pos0 + ids.size, dtype=np.int64)
        t0 = time.perf_counter()
        h = self.model.embed(ids)
        marks: list[tuple[int, int]] = []
        for r in range(len(slot.windows)):
            try:
                h = self._round(slot, h, r, pos, session)
            except RingError:
                self.link.mark_broken()  # a broken link or node: a new ring next time
                raise
            marks += self.last_marks
        t1 = time.perf_counter()
        logits = np.asarray(self.model.output(h[-1:])[0])
        if ids.size == 1:  # a decode step: what the status shows per node
            t2 = time.perf_counter()
            self.link.record(marks, t2 - t0, t2 - t1)
        return logits

    def _round(self, slot: RingSlot, h: np.ndarray, r: int, pos: np.ndarray, session: str
               ) -> np.ndarray:
        slot.before_use(r)
        t0 = time.perf_counter()
        h = slot.windows[r].forward(h, pos, session)
        mark = (0, int(1e6 * (time.perf_counter() - t0)))
        if slot.alone:
            self.last_marks = [mark]
            return h
        self._step = (self._step + 1) % 2**32
        frame = Frame(session, slot.epoch, self._step, r, len(slot.windows), int(pos[0]), h,
                      [mark])
        self.link.send(frame)
        slot.after_use(r)
        back = self.link.receive(self._step, r, int(pos.size))
        self.last_marks = back.marks
        return back.hidden

    # -- the KV cache, on every node of the ring ----------------------------------------------

    def n_cached(self, session: str = "default") -> int:
        """Positions the ring holds for the session; a pending re-plan happens here, where
        the loop learns what it must evaluate (a new ring holds nothing)."""
        try:
            self.link.ensure()
        except RingError as exc:
            _LOG.warning("%s", exc)
            return 0  # the next forward reports the broken ring to the request
        return int(self.link.slot().windows[0].n_cached(session))

    def _cache(self, op: CacheOp, session: str, n: int = 0) -> None:
        apply_cache_op(self.link.slot().windows, op, session, n)
        self.link.cache_op(op, session, n)

    def truncate(self, session: str, n: int) -> None:
        self._cache(CacheOp.TRUNCATE, session, n)

    def clear(self, session: str = "default") -> None:
        self._cache(CacheOp.CLEAR, session)

    def drop(self, session: str) -> None:
        self._cache(CacheOp.DROP, session)

    def warm_up(self) -> None:
        """The ring's windows were warmed when they were loaded; here only the head's own
        steps (embedding lookup and output projection), without building the whole model's
        window that ``Model.warm_up`` would."""
        self.model.output(self.model.embed([1]))

    def close(self) -> None:
        """The head owns the node and the model: nothing of the executor's to release."""
