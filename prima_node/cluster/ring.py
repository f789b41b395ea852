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
new ring, every chunk the session's cache held, cut into the same micro-batches as the first
time (so the new cache is bit for bit the old one and a greedy answer goes on as if nothing
happened; runs of decode steps cross the new ring pipelined, one token a micro-batch), then
the chunk that failed. Only when no ring can be planned does the forward end with a RingError
naming the node. A ring that broke between requests is planned again before the next one
(``n_cached`` is where the loop asks, before it evaluates).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
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
    from ..engine.window import Window

_LOG = logging.getLogger("prima.cluster")
_T = TypeVar("_T")
RING_PREFILL_CHUNK = 2048  # prompt tokens per forward on a ring
MIN_MICRO = 64  # tokens: the smallest micro-batch worth its own frame
MICRO_PER_NODE = 4
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


def apply_cache_op(windows: Sequence[Window], op: CacheOp, session: str, n: int = 0
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
    windows: Sequence[Window]  # one per round
    alone: bool  # a ring of one: no frame leaves this node
    nodes: int  # in the ring
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


def micro_batches(n: int, ring: int, largest: int) -> list[tuple[int, int]]:
    """[start, end) of the micro-batches a chunk of ``n`` tokens crosses a ring of ``ring``
    nodes in: about ``MICRO_PER_NODE`` per node, so that the pipeline is full most of the
    time, but none under ``MIN_MICRO`` tokens (smaller batches cost more per token: 28 % at 16
    tokens, 18 % at 32, nothing from 64 on for a 1B model on one core) nor over ``largest``
    (what a frame carries). A ring of one takes ``largest`` at a time."""
    per_node = -(-n // (MICRO_PER_NODE * ring))
    size = largest if ring <= 1 else min(largest, max(MIN_MICRO, per_node))
    count = -(-n // size)
    bounds = [round(i * n / count) for i in range(count + 1)]  # equal parts, none empty
    return list(itertools.pairwise(bounds))


Parts = list[tuple[int, int]]


@dataclass(frozen=True)
class Evaluation:
    """One forward: its token ids and the micro-batches ([start, end) within them) they
    crossed the ring in."""

    ids: np.ndarray
    parts: Parts


class EvaluatedChunks:
    """What each session's cache holds on the current ring, as it was evaluated: each
    forward's ids in the micro-batches they crossed the ring in, and the truncations between
    them (a forward cut short by one is kept whole, then truncated). A new ring evaluates the
    same again to hold bit for bit the same cache: ggml's results depend on how a prompt is
    cut, and a ring of fewer nodes would cut it otherwise. Token ids only, so a few bytes per
    position."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self._history: dict[str, list[Evaluation | int]] = {}  # int: a truncation

    def follow(self, epoch: int) -> None:
        """The ring's plan number now; another plan holds no cache at all."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._history.clear()

    def history(self, session: str) -> list[Evaluation | int]:
        return list(self._history.get(session, ()))

    def restore(self, session: str, history: list[Evaluation | int]) -> None:
        self._history[session] = list(history)

    def add(self, session: str, ids: np.ndarray, parts: Parts) -> None:
        self._history.setdefault(session, []).append(Evaluation(ids.copy(), list(parts)))

    def apply(self, op: CacheOp, session: str, n: int = 0) -> None:
        if op is not CacheOp.TRUNCATE:
            self._history.pop(session, None)
            return
        kept: list[Evaluation | int] = []
        pos = 0
        for entry in self._history.get(session, ()):
            if isinstance(entry, int):
                pos = min(pos, entry)
            elif pos >= n:
                break
            else:
                pos += entry.ids.size
            kept.append(entry)
        if pos > n:
            kept.append(n)
        self._history[session] = kept


def replay_batches(history: list[Evaluation | int], largest: int
                   ) -> list[Evaluation | int]:
    """The history with runs of consecutive forwards merged into forwards of at most
    ``largest`` ids, each keeping its micro-batches: a run of decode steps (one token each)
    then crosses the ring as one pipelined forward, every node at work at once, while every
    window still evaluates each token alone, as it did."""
    out: list[Evaluation | int] = []
    for entry in history:
        last = out[-1] if out else None
        if (isinstance(entry, Evaluation) and isinstance(last, Evaluation)
                and last.ids.size + entry.ids.size <= largest):
            shift = last.ids.size
            out[-1] = Evaluation(np.concatenate([last.ids, entry.ids]),
                                 last.parts + [(a + shift, b + shift) for a, b in entry.parts])
        else:
            out.append(entry)
    return out


class RingExecutor:
    """The generation loop's executor for a ring (model thread)."""

    def __init__(self, model: Model, link: RingLink, max_tokens: int, *,
                 pipeline: bool = True) -> None:
        """``max_tokens``: the largest micro-batch a frame carries; ``pipeline``: a prompt
        chunk crosses the ring as micro-batches that follow each other (False: whole, one
        node at a time, as a ring did before; for comparison)."""
        self.model = model
        self.link = link
        self.max_tokens = max_tokens
        self.pipeline = pipeline
        #: prompt tokens per forward: with the pipeline, enough micro-batches to keep every
        #: node busy for most of it (a cancelled request stops within one such chunk)
        self.prefill_chunk = RING_PREFILL_CHUNK if pipeline else max_tokens
        self._step = 0
        self.last_marks: list[tuple[int, int]] = []
        self.last_parts: Parts = []
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
        """One chunk (at most ``prefill_chunk``) after the session's cached positions, k times
        around the ring; logits of its last token. A node lost on the way is planned out and
        the session's cache rebuilt on the new ring (a pause); RingError when no ring is
        left."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if not 0 < ids.size <= self.prefill_chunk:
            raise ValueError(f"a ring step takes 1 to {self.prefill_chunk} tokens, not "
                             f"{ids.size}")
        logits = self._recovering(session, lambda: self._forward_once(ids, session))
        self._evaluated.add(session, ids, self.last_parts)
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
        """Evaluate the session's cache again on a new ring, in the micro-batches it was
        first evaluated in (runs of decode steps pipelined, see ``replay_batches``), with
        its truncations."""
        history = self._evaluated.history(session)  # kept until all ran: a replay may fail
        t0 = time.perf_counter()
        for entry in replay_batches(history, self.prefill_chunk):
            if isinstance(entry, int):
                apply_cache_op(self.link.slot().windows, CacheOp.TRUNCATE, session, entry)
                self.link.cache_op(CacheOp.TRUNCATE, session, entry)
            else:
                self._forward_once(entry.ids, session, entry.parts)
        self._evaluated.follow(self.link.slot().epoch)  # a new ring: no other cache survived
        self._evaluated.restore(session, history)
        _LOG.info("evaluated %d position(s) again in %.2f s",
                  sum(e.ids.size for e in history if isinstance(e, Evaluation)),
                  time.perf_counter() - t0)

    def _forward_once(self, ids: np.ndarray, session: str, parts: Parts | None = None
                      ) -> np.ndarray:
        """``ids`` around the ring in ``parts`` (micro-batches; None: as many as keep this
        ring busy, see ``micro_batches``), recorded in ``last_parts``."""
        broken = self.link.broken()
        if broken:
            self.link.mark_broken()
            raise RingError(broken)
        slot = self.link.slot()
        pos0 = int(slot.windows[0].n_cached(session))
        t0 = time.perf_counter()
        h = self.model.embed(ids)
        if parts is None:
            parts = micro_batches(ids.size, slot.nodes if self.pipeline and not slot.alone
                                  else 1, self.max_tokens)
        self.last_parts = parts
        try:
            if slot.alone:
                h = self._alone(slot, h, parts, pos0, session)
            else:
                h = self._pipeline(slot, h, parts, pos0, session)
        except RingError:
            self.link.mark_broken()  # a broken link or node: a new ring next time
            raise
        t1 = time.perf_counter()
        logits = np.asarray(self.model.output(h[-1:], decode=ids.size == 1)[0])
        if ids.size == 1:  # a decode step: what the status shows per node
            t2 = time.perf_counter()
            self.link.record(self.last_marks, t2 - t0, t2 - t1)
        return logits

    def _alone(self, slot: RingSlot, h: np.ndarray, parts: list[tuple[int, int]], pos0: int,
               session: str) -> np.ndarray:
        """A ring of one: every part through round 0's window, then round 1's, ... (each
        window read once per chunk, however many parts; the pager streams as on any node)."""
        marks: list[tuple[int, int]] = []
        x = h
        n_layer = self.model.config.n_layer
        for r, window in enumerate(slot.windows):
            slot.before_use(r)
            t = time.perf_counter()
            last_only = window.end == n_layer  # each part's last row (see _send_round)
            x = np.concatenate([window.forward(x[a:b], np.arange(pos0 + a, pos0 + b,
                                                                   dtype=np.int64), session,
                                               last_only=last_only)
                                for a, b in parts])
            marks.append((0, int(1e6 * (time.perf_counter() - t))))
            slot.after_use(r)
        self.last_marks = marks
        return x

    def _pipeline(self, slot: RingSlot, h: np.ndarray, parts: list[tuple[int, int]],
                  pos0: int, session: str) -> np.ndarray:
        """The parts (micro-batches) one after the other around the ring, k times: the head
        runs part 2 through its window while part 1 is on the next node, so every node
        works at once. Every node runs a round's parts in order (positions ascending, as
        attention needs them), and they come back in the order they left."""
        k, last = len(slot.windows), len(parts) - 1
        in_flight: deque[tuple[int, int, int]] = deque()  # (step, round, part), as sent
        for j, (a, b) in enumerate(parts):
            step = self._send_round(slot, h[a:b], 0, pos0 + a, session, j, last)
            in_flight.append((step, 0, j))
        marks: list[tuple[int, int]] = []
        out = h
        while in_flight:
            step, r, j = in_flight.popleft()
            a, b = parts[j]
            back = self.link.receive(step, r, b - a)
            marks += back.marks
            if r + 1 == k:
                out = back.hidden  # the last part comes back last
                continue
            step = self._send_round(slot, back.hidden, r + 1, pos0 + a, session, j, last)
            in_flight.append((step, r + 1, j))
        self.last_marks = marks
        return out

    def _send_round(self, slot: RingSlot, h: np.ndarray, r: int, p0: int, session: str,
                    part: int, last: int) -> int:
        """Part ``part`` of ``last + 1`` through this node's window of round ``r``, sent on;
        its step number. The window is prepared before the first part and released (to the
        pager) after the last."""
        if part == 0:
            slot.before_use(r)
        pos = np.arange(p0, p0 + h.shape[0], dtype=np.int64)
        t0 = time.perf_counter()
        window = slot.windows[r]
        # the model's last layer computes the last row only, as one node's forward does (the
        # same kernels on the same rows), and only that row goes on: the nodes do the same
        last_only = window.end == self.model.config.n_layer
        out = window.forward(h, pos, session, last_only=last_only)
        if last_only:
            p0 += h.shape[0] - 1
        mark = (0, int(1e6 * (time.perf_counter() - t0)))
        self._step = (self._step + 1) % 2**32
        self.link.send(Frame(session, slot.epoch, self._step, r, len(slot.windows), p0, out,
                             [mark], more=part < last))
        if part == last:
            slot.after_use(r)
        return self._step

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
