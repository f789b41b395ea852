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

A failure anywhere (a node that dies, hangs or cannot be reached) costs a pause, not the
answer: the executor has the ring planned again without that node and evaluates again, on the
new ring, every chunk the session's cache held, in the same chunks as the first time (so the
new cache is bit for bit the old one and a greedy answer goes on as if nothing happened), then
the chunk that failed. Only when no ring can be planned does the forward end with a RingError
naming the node. A ring that broke between requests is planned again before the next one
(``n_cached`` is where the loop asks, before it evaluates).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from ..errors import ClusterError
from .frames import Frame

if TYPE_CHECKING:
    from ..engine.model import Model
    from ..engine.window import LayerWindow

_LOG = logging.getLogger("prima.cluster")
_T = TypeVar("_T")
#: new rings one forward may try to plan after failures before it gives up (each failure
#: leaves a node out)
MAX_RECOVERIES = 3


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


class EvaluatedChunks:
    """The chunks each session's cache holds on the current ring, in the order and sizes they
    were evaluated: what a new ring evaluates again to hold the same cache. Token ids only,
    so a few bytes per position."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self._chunks: dict[str, list[np.ndarray]] = {}

    def follow(self, epoch: int) -> None:
        """The ring's plan number now; another plan holds no cache at all."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._chunks.clear()

    def chunks(self, session: str) -> list[np.ndarray]:
        return list(self._chunks.get(session, ()))

    def add(self, session: str, ids: np.ndarray) -> None:
        self._chunks.setdefault(session, []).append(ids.copy())

    def apply(self, op: CacheOp, session: str, n: int = 0) -> None:
        if op is not CacheOp.TRUNCATE:
            self._chunks.pop(session, None)
            return
        kept: list[np.ndarray] = []
        for chunk in self._chunks.get(session, ()):
            if n <= 0:
                break
            kept.append(chunk[:n])
            n -= chunk.size
        self._chunks[session] = kept


class RingExecutor:
    """The generation loop's executor for a ring (model thread)."""

    def __init__(self, model: Model, link: RingLink, max_tokens: int) -> None:
        self.model = model
        self.link = link
        self.max_tokens = max_tokens  # the largest chunk a frame carries
        self._step = 0
        self.last_marks: list[tuple[int, int]] = []
        self._evaluated = EvaluatedChunks()  # what each session's cache holds, as evaluated

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
        around the ring; logits of its last token. A node lost on the way is planned out and
        the session's cache rebuilt on the new ring (a pause); RingError when no ring is
        left."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if not 0 < ids.size <= self.max_tokens:
            raise ValueError(f"a ring step takes 1 to {self.max_tokens} tokens, not {ids.size}")
        logits = self._recovering(session, lambda: self._forward_once(ids, session))
        self._evaluated.add(session, ids)
        return logits

    def _recovering(self, session: str, action: Callable[[], _T]) -> _T:
        """``action`` on the ring; after a failure, on a new ring without the failed node
        that first evaluates the session's cache again. RingError when no ring is left."""
        failures: list[RingError] = []
        for _ in range(MAX_RECOVERIES + 1):
            try:
                if failures:
                    self._plan_without_failed(failures[-1])
                    self._replay(session)
                self._evaluated.follow(self.link.slot().epoch)
                return action()
            except RingError as exc:
                failures.append(exc)
        first, last = failures[0], failures[-1]
        if str(last) == str(first):
            raise first
        raise RingError(f"{first}; the ring could not go on without it: {last}")

    def _plan_without_failed(self, failure: RingError) -> None:
        """A new ring without the node that failed (RingError if none can be planned)."""
        _LOG.warning("%s: planning the ring again to go on with the answer", failure)
        self.link.mark_broken()
        t0 = time.perf_counter()
        self.link.ensure()
        _LOG.info("new ring in %.2f s; evaluating the session's positions again",
                  time.perf_counter() - t0)

    def _replay(self, session: str) -> None:
        """Evaluate the session's cached chunks again on a new ring, in the same chunks."""
        chunks = self._evaluated.chunks(session)  # kept until all ran: a replay may fail too
        t0 = time.perf_counter()
        for chunk in chunks:
            self._forward_once(chunk, session)
        self._evaluated.follow(self.link.slot().epoch)  # a new ring: no other cache survived
        for chunk in chunks:
            self._evaluated.add(session, chunk)
        _LOG.info("evaluated %d position(s) again in %.2f s",
                  sum(c.size for c in chunks), time.perf_counter() - t0)

    def _forward_once(self, ids: np.ndarray, session: str) -> np.ndarray:
        broken = self.link.broken()
        if broken:
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
        slot = self.link.slot()
        self._evaluated.follow(slot.epoch)
        return int(slot.windows[0].n_cached(session))

    def _cache(self, op: CacheOp, session: str, n: int = 0) -> None:
        """The operation on every node; if one fails, on a new ring that first holds the
        session's cache as it was."""
        def run() -> None:
            apply_cache_op(self.link.slot().windows, op, session, n)
            self.link.cache_op(op, session, n)

        self._recovering(session, run)
        self._evaluated.apply(op, session, n)

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
