"""A node's paging policy: which of its windows it keeps in memory, prefetches and releases.

A node holds one window per round. When its windows together fit in the memory it can count
on, it keeps them all (warm-up made them resident) and only checks now and then that they
stayed so. When they do not fit (Halda planned it to stream, or memory shrank since), it runs
the paper's schedule: after sending a window's output it releases that window and asks the OS
to read the next one, on a thread of its own, while the activations travel the rest of the ring.
Residency is measured (mincore) just before each use, which is what the prefetch hit rate means.
A mixture's expert tensors are not among the pages managed: the page cache keeps those tokens
use (``engine.paging.is_expert``).
The memory is read again every few seconds of use, since the home's other programs take and
give back memory while the node runs: the node starts or stops streaming accordingly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from ..device.memory import MemoryInfo, memory_info
from ..engine.paging import (
    HIT_RESIDENCY,
    PAGE,
    RELEASE_HEADROOM,
    PagingStats,
    WindowPages,
    should_release,
)

_LOG = logging.getLogger("prima.cluster")
#: While everything fits, residency is measured on one use in this many (mincore costs about
#: 20 ms per GB: too much for every decode step of a resident model).
RESIDENT_SAMPLE = 16
#: Seconds of use between two readings of the memory the node can count on (a reading is a
#: few /proc and cgroup files, plus mincore of the windows under a cgroup: ~20 ms per GB).
RECHECK_S = 5.0


class _Policy(NamedTuple):
    stream: bool  # release each window's moving part after use and prefetch the next
    tail: int  # bytes at the end of each window that move (0: nothing, or whole windows when
    # the parts are unknown; at least a window's bytes: the whole window)
    moving: list[WindowPages]  # what is released and prefetched, per window


def tail_bytes(window_bytes: list[int], budget: int) -> int:
    """How many bytes at the end of each window to stream so that the rest fits: Halda's
    streaming schedule keeps the head of every window resident and, besides, the one tail in
    use (``after_use`` reads the next tail only once it released the last): heads + tail <=
    budget. The fewest bytes that fit (so a node streams what Halda priced, not whole
    tensors or layers); the largest window's bytes when even whole windows do not."""
    most = max(window_bytes, default=0)

    def need(t: int) -> int:
        return sum(max(0, r - t) for r in window_bytes) + min(t, most)

    if need(most) > budget:
        return most
    lo, hi = 0, most  # need() does not grow with t: the smallest t with need(t) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if need(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def last_bytes(parts: list[WindowPages], n_bytes: int) -> WindowPages:
    """The pages of a window's last ``n_bytes`` in the order a forward pass reads its parts
    (a tensor cut where the tail begins)."""
    ranges: list[tuple[int, int]] = []
    left = n_bytes
    for part in reversed(parts):
        for a, b in reversed(part.ranges):
            if left <= 0:
                break
            take = min(left, b - a)
            ranges.append((b - take, b))
            left -= take
    return WindowPages(parts[0].file, ranges)


def clearly_short(held_bytes: int, capacity: int) -> bool:
    """Memory short of the windows beyond the figures' doubt (20 % under what they hold)."""
    return held_bytes > capacity * (1 + 2 * RELEASE_HEADROOM)


class Pager:
    def __init__(self, pages: list[WindowPages], *, enabled: bool = True,
                 planned_stream: bool = False,
                 part_pages: list[list[WindowPages]] | None = None,
                 memory: Callable[[], MemoryInfo] = memory_info,
                 recheck_s: float = RECHECK_S) -> None:
        """``pages``: each round's window; ``part_pages``: the same per tensor, in the order
        the window reads them, so that a streaming node can keep each window's head and
        stream only its tail. ``memory`` reads
        what the node can count on, again every ``recheck_s`` seconds of use: memory is shared
        with the rest of the home's programs, and a node must start streaming when they take
        it and stop when they give it back."""
        self.pages = pages
        self.part_pages = part_pages
        self.enabled = enabled
        self.held_bytes = sum(p.n_bytes for p in pages)
        self._memory = memory
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self.stats = PagingStats()
        self.mode_changes = 0
        self.capacity = self._capacity()
        self._checked = time.monotonic()
        # the policy in force, replaced whole (never edited) so the model thread and the
        # paging thread each see one consistent policy
        # (a node a little short by the figures starts resident and streams once a use finds
        # a window evicted: see ``recheck``)
        self._policy = self._choose(enabled and len(pages) > 1 and (
            planned_stream or clearly_short(self.held_bytes, self.capacity)))
        self._low: set[int] = set()  # windows found short of resident: prefetch them again
        self._missed = False  # a use found a window short of resident since the last check
        self._pending: Future[None] | None = None  # the paging job in flight
        self._uses = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="prima-prefetch")
        if enabled and pages:
            self._log_policy()

    @property
    def stream(self) -> bool:
        return self._policy.stream

    @property
    def tail(self) -> int:
        return self._policy.tail

    @property
    def moving(self) -> list[WindowPages]:
        return self._policy.moving

    def _capacity(self) -> int:
        """Memory for the windows: what the node can count on, with its own windows' pages
        where the rule that decides does not already count them."""
        mem = self._memory()
        capacity = mem.available
        if mem.cgroup_available is not None and mem.available == mem.cgroup_available:
            # a cgroup counts only inactive file pages as reclaimable: our windows, once
            # used, are active and memory they can use all the same; so the cap less what
            # is used besides our windows (their inactive pages are among the reclaimable
            # ones: counting both counted them twice, and a node under a 300 MB cap took
            # 600 MB for its windows and re-read all of them every token). MemAvailable and
            # macOS's figure already include our pages.
            capacity += sum(p.resident_bytes() or 0 for p in self.pages)
            capacity -= mem.cgroup_reclaimable or 0
        return max(0, capacity)

    def _tail(self, headroom: float) -> int:
        """Bytes at the end of each window to stream with this share of the capacity kept
        free (at least a page: a streaming node moves something)."""
        sizes = [p.n_bytes for p in self.pages]
        return max(PAGE, tail_bytes(sizes, int(self.capacity * (1 - headroom))))

    def _choose(self, stream: bool, tail: int | None = None) -> _Policy:
        """The policy for a mode: streaming moves each window's last ``tail`` bytes (Halda's
        schedule; by default the fewest that fit), or whole windows when the order of a
        window's parts is not known."""
        if not stream:
            return _Policy(False, 0, list(self.pages))
        if self.part_pages is None:
            return _Policy(True, 0, list(self.pages))
        if tail is None:
            tail = self._tail(RELEASE_HEADROOM)
        moving = [whole if tail >= whole.n_bytes else last_bytes(w, tail)
                  for whole, w in zip(self.pages, self.part_pages, strict=True)]
        return _Policy(True, tail, moving)

    def _log_policy(self) -> None:
        p = self._policy
        _LOG.info("windows hold %.0f MB, memory for them %.0f MB: %s", self.held_bytes / 1e6,
                  self.capacity / 1e6,
                  (f"keep each window's head, release its last {self._moving_mb(p):.0f} MB "
                   "after use and prefetch the next"
                   if p.tail and any(
                       m is not w for m, w in zip(p.moving, self.pages, strict=True))
                   else "release each window after use and prefetch the next")
                  if p.stream else "keep them all resident")

    @staticmethod
    def _moving_mb(p: _Policy) -> float:
        return max((m.n_bytes for m in p.moving), default=0) / 1e6

    def recheck(self) -> bool:
        """Read the memory again and change mode (or tail) if it moved; True if it did.

        Hysteresis: a node streams more as soon as what it holds no longer fits with the
        headroom (``should_release``), but streams less, or stops, only once it fits with
        twice that, so that a figure hovering at an edge does not flip the policy on every
        check."""
        if not self.enabled or len(self.pages) < 2:
            return False
        self.capacity = self._capacity()
        old = self._policy
        if not old.stream:
            # the arithmetic is a few tens of MB off either way (the process's own memory
            # moves; the cap counts pages the node cannot tell apart), and streaming from a
            # slow disk what in fact stayed resident costs far more than it saves: start only
            # once uses found a window evicted, or when memory is short beyond doubt
            short = should_release(self.held_bytes, self.capacity)
            evicted, self._missed = self._missed, False
            new = self._choose(short and (evicted or clearly_short(self.held_bytes,
                                                                   self.capacity)))
        elif self.held_bytes <= self.capacity * (1 - 2 * RELEASE_HEADROOM):
            new = self._choose(False)
        elif self.part_pages is None:
            new = old
        else:
            tight, loose = self._tail(RELEASE_HEADROOM), self._tail(2 * RELEASE_HEADROOM)
            tail = tight if tight > old.tail else loose if loose < old.tail else old.tail
            new = old if tail == old.tail else self._choose(True, tail)
        if new is old or (new.stream, new.tail) == (old.stream, old.tail):
            return False
        with self._lock:
            self._policy = new
            self.mode_changes += 1
        self._log_policy()
        if old.stream and (not new.stream or new.tail < old.tail):
            # what the old policy released is needed again: read it back now (this runs on
            # the paging thread, after any release the old policy still had queued)
            for pages in old.moving:
                pages.prefetch()
        return True

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
            self._missed = True

    def after_use(self, r: int) -> None:
        """Window ``r``'s output has left: release it (streaming) and prefetch the next one,
        off the calling thread; now and then, read the memory again there too."""
        if not self.enabled or not self.pages:
            return
        now = time.monotonic()
        recheck = now - self._checked >= self.recheck_s
        if recheck:
            self._checked = now
        policy = self._policy
        nxt = (r + 1) % len(self.pages)
        if policy.stream or nxt in self._low:
            if self._pending is not None and not self._pending.done():
                # the disk is behind: a queue of stale prefetches would only get in the way,
                # but the release must happen or the windows outgrow the memory
                if policy.stream:
                    self._worker.submit(self._page, policy.moving, r, None, recheck)
                elif recheck:
                    self._worker.submit(self._page, policy.moving, None, None, True)
                return
            self._low.discard(nxt)
            self._pending = self._worker.submit(self._page, policy.moving,
                                                r if policy.stream else None, nxt, recheck)
        elif recheck:
            self._worker.submit(self._page, policy.moving, None, None, True)

    def _page(self, moving: list[WindowPages], release: int | None, prefetch: int | None,
              recheck: bool = False) -> None:
        try:
            if release is not None and release != prefetch:
                seconds = moving[release].release()
                with self._lock:
                    self.stats.record_release(moving[release].n_bytes, seconds)
            if prefetch is not None:
                seconds = moving[prefetch].prefetch()
                with self._lock:
                    self.stats.record_prefetch(moving[prefetch].n_bytes, seconds)
        except (OSError, ValueError) as exc:  # a hint that failed: the window still pages in
            _LOG.warning("paging windows %s/%s failed: %s", release, prefetch, exc)
        if recheck:
            try:
                self.recheck()
            except (OSError, ValueError) as exc:  # keep the policy in force
                _LOG.warning("reading the memory figures failed: %s", exc)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            stats = self.stats.as_dict()
            changes = self.mode_changes
        policy = self._policy
        return {"enabled": self.enabled, "mode": "stream" if policy.stream else "resident",
                "tail_bytes": policy.tail, "mode_changes": changes,
                "held_bytes": self.held_bytes, "capacity_bytes": self.capacity,
                "streamed_bytes": sum(p.n_bytes for p in policy.moving) if policy.stream else 0,
                **stats}

    def close(self) -> None:
        """Stop paging; a hint in progress finishes on its own (never waited for here: the
        event loop calls this, and a prefetch can take as long as the disk needs)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
