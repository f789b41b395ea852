"""A node's paging policy: which of its windows it keeps in memory, prefetches and releases.

A node holds one window per round. When its windows together fit in the memory it can count
on, it keeps them all (warm-up made them resident) and only checks now and then that they
stayed so. When they do not fit (Halda planned it to stream, or memory shrank since), it runs
the paper's schedule: after sending a window's output it releases that window and asks the OS
to read the next one, on a thread of its own, while the activations travel the rest of the ring.
Residency is measured (mincore) just before each use, which is what the prefetch hit rate means.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..device.memory import memory_info
from ..engine.paging import (
    HIT_RESIDENCY,
    RELEASE_HEADROOM,
    PagingStats,
    WindowPages,
    should_release,
)

_LOG = logging.getLogger("prima.cluster")
#: While everything fits, residency is measured on one use in this many (mincore costs about
#: 20 ms per GB: too much for every decode step of a resident model).
RESIDENT_SAMPLE = 16


def tail_layers(layer_bytes: list[list[int]], budget: int) -> int:
    """How many trailing layers of each window to stream so that the rest fits: Halda's
    streaming schedule keeps the head of every window resident and holds, besides, the tail in
    use and the tail arriving (k heads + 2 tails <= memory). The fewest that fit; every layer
    when even whole windows do not."""
    most = max((len(w) for w in layer_bytes), default=0)
    for t in range(most + 1):
        heads = sum(sum(w[:len(w) - t]) for w in layer_bytes)
        tails = max((sum(w[len(w) - t:]) for w in layer_bytes), default=0)
        if heads + 2 * tails <= budget:
            return t
    return most


class Pager:
    def __init__(self, pages: list[WindowPages], *, enabled: bool = True,
                 planned_stream: bool = False,
                 layer_pages: list[list[WindowPages]] | None = None) -> None:
        """``pages``: each round's window; ``layer_pages``: the same per layer, so that a
        streaming node can keep each window's head and stream only its tail."""
        self.pages = pages
        self.enabled = enabled
        self.held_bytes = sum(p.n_bytes for p in pages)
        mem = memory_info()
        self.capacity = mem.available
        if mem.cgroup_available is not None and mem.available == mem.cgroup_available:
            # a cgroup counts only inactive file pages as reclaimable: our windows, just
            # warmed up, are active and memory they can use all the same (MemAvailable and
            # macOS's figure already include them: adding them there would count them twice)
            self.capacity += sum(p.resident_bytes() or 0 for p in pages)
        self.stream = enabled and len(pages) > 1 and (
            planned_stream or should_release(self.held_bytes, self.capacity))
        self.stats = PagingStats()
        # what is released and prefetched per window: its tail layers, or all of it
        self.moving = list(pages)
        self.tail = 0
        if self.stream and layer_pages is not None:
            sizes = [[p.n_bytes for p in w] for w in layer_pages]
            self.tail = tail_layers(sizes, int(self.capacity * (1 - RELEASE_HEADROOM)))
            if self.tail < min(len(w) for w in layer_pages):
                self.moving = [WindowPages(w[0].file, [r for p in w[len(w) - self.tail:]
                                                       for r in p.ranges])
                               for w in layer_pages]
        self._lock = threading.Lock()
        self._low: set[int] = set()  # windows found short of resident: prefetch them again
        self._pending: Future[None] | None = None  # the paging job in flight
        self._uses = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="prima-prefetch")
        if enabled and pages:
            _LOG.info("windows hold %.0f MB, memory for them %.0f MB: %s", self.held_bytes / 1e6,
                      self.capacity / 1e6,
                      (f"keep each window's head, release its last {self.tail} layer(s) after "
                       "use and prefetch the next" if self.moving is not self.pages
                       and self.tail else "release each window after use and prefetch the "
                       "next") if self.stream else "keep them all resident")

    def before_use(self, r: int) -> None:
        """Model thread, just before window ``r`` runs: measure how much of it is there."""
        if not self.enabled or not self.pages:
            return
        self._uses += 1
        if not self.stream and self._uses % RESIDENT_SAMPLE != 1:
            return
        t0 = time.perf_counter()
        residency = self.pages[r].resident_fraction()  # outside the lock: ~20 ms per GB
        with self._lock:
            self.stats.record_use(residency, time.perf_counter() - t0)
        if residency is not None and residency < HIT_RESIDENCY:
            self._low.add(r)

    def after_use(self, r: int) -> None:
        """Window ``r``'s output has left: release it (streaming) and prefetch the next one,
        off the calling thread."""
        if not self.enabled or not self.pages:
            return
        nxt = (r + 1) % len(self.pages)
        if self.stream or nxt in self._low:
            if self._pending is not None and not self._pending.done():
                # the disk is behind: a queue of stale prefetches would only get in the way,
                # but the release must happen or the windows outgrow the memory
                if self.stream:
                    self._worker.submit(self._page, r, None)
                return
            self._low.discard(nxt)
            self._pending = self._worker.submit(self._page, r if self.stream else None, nxt)

    def _page(self, release: int | None, prefetch: int | None) -> None:
        try:
            if release is not None and release != prefetch:
                seconds = self.moving[release].release()
                with self._lock:
                    self.stats.record_release(self.moving[release].n_bytes, seconds)
            if prefetch is None:
                return
            seconds = self.moving[prefetch].prefetch()
            with self._lock:
                self.stats.record_prefetch(self.moving[prefetch].n_bytes, seconds)
        except (OSError, ValueError) as exc:  # a hint that failed: the window still pages in
            _LOG.warning("paging windows %s/%s failed: %s", release, prefetch, exc)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            stats = self.stats.as_dict()
        return {"enabled": self.enabled, "mode": "stream" if self.stream else "resident",
                "held_bytes": self.held_bytes, "capacity_bytes": self.capacity,
                "streamed_bytes": sum(p.n_bytes for p in self.moving) if self.stream else 0,
                **stats}

    def close(self) -> None:
        """Stop paging; a hint in progress finishes on its own (never waited for here: the
        event loop calls this, and a prefetch can take as long as the disk needs)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
