"""Prefetching and releasing a window's weights in the page cache, and measuring their residency.

A ring node computes one window per round and then waits for the activations to come around
again. That wait is when the disk can load its next window: after sending a window's output the
node asks the OS to read the next one (``madvise(MADV_WILLNEED)``), and, when its windows together
do not fit in memory, it first drops the window it has just used (``MADV_DONTNEED`` on the map,
``posix_fadvise(POSIX_FADV_DONTNEED)`` on the file) so that the kernel does not make room for the
prefetch by evicting pages needed next (prima.cpp's "prefetch-release conflict"). Before each use
``mincore(2)`` tells how much of the window arrived in time, which is the prefetch hit rate the
node reports.

All calls go to libc through ctypes, which releases the GIL, so a worker thread can prefetch
while the model thread computes (CPython's ``mmap.madvise`` keeps the GIL for the whole call).
Every call is a hint: platforms without one make it a no-op (macOS has no ``posix_fadvise``);
where ``mincore`` is missing the residency is ``None`` (unknown), never a guess.

Linux caveat: for a file the process neither owns nor may write, ``mincore`` reports every page
as resident (a side-channel fix since Linux 5.0), so hit rates read 100 % there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from ..model_file import ModelFile
from .window import Window

PAGE = mmap.PAGESIZE
#: A use is a hit when at least this share of the window was in memory before it ran.
HIT_RESIDENCY = 0.99
#: Share of the available memory kept free by ``should_release`` (see there).
RELEASE_HEADROOM = 0.10
#: Bytes per WILLNEED call. Linux reads at most max(read_ahead_kb, max_sectors_kb) of the device
#: per call (``force_page_cache_ra``) and silently ignores the rest of the range (one 1 GB call
#: loaded 8 MB here). 128 KiB is the default read_ahead_kb: read whole unless both limits were
#: lowered. ~8000 calls per GB cost little beside the reads they start.
PREFETCH_CHUNK = max(128 << 10, PAGE)
#: Per-use residencies kept for the status document (a node runs for days: keep it bounded).
RECENT_USES = 64

_LibcCall = Callable[..., int]


def _libc_call(name: str, *argtypes: Any) -> _LibcCall | None:
    """A libc function with its C signature, or None where this platform lacks it."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, name, None)
    if fn is None:
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return cast(_LibcCall, fn)


_madvise = _libc_call("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mincore = _libc_call("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_fadvise: Callable[[int, int, int, int], None] | None = getattr(os, "posix_fadvise", None)
_WILLNEED: int | None = getattr(mmap, "MADV_WILLNEED", None)
_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)


def merged_pages(ranges: Iterable[tuple[int, int]], page_size: int = PAGE) -> list[tuple[int, int]]:
    """Byte ranges [start, end) widened to whole pages, sorted, overlapping or adjacent ones
    merged: the fewest system calls that cover exactly the pages the ranges touch."""
    if page_size <= 0:
        raise ValueError(f"page size must be positive, not {page_size}")
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if a < 0 or b < a:
            raise ValueError(f"[{a}, {b}) is not a byte range")
        if a == b:
            continue
        a -= a % page_size
        b += -b % page_size
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _check_open(mf: ModelFile, what: str) -> None:
    try:
        mf._require_reader()
    except ValueError:
        raise ValueError(f"cannot {what} {mf.path}: the model file is closed") from None


#: where a layer's tensors come in a forward pass (others sit in the middle, by file offset)
_USE_ORDER = {role: i for i, role in enumerate((
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
    "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"))}


def is_expert(name: str) -> bool:
    """A mixture's expert tensor (``blk.N.ffn_*_exps``): left to the page cache, never
    prefetched or released. A token reads a few experts of each, which cannot be known before
    the router runs, so prefetching or releasing a window's experts moves all of them: on a
    3-node ring of a 2.1 GB qwen3moe under memory limits that re-read 446 MB a token (563
    ms/token), where the page cache alone, keeping the experts tokens use, read 1.6 MB (34
    ms/token; scripts/bench-cluster --scenario memory)."""
    return "_exps." in name


def tensors_in_use_order(mf: ModelFile, layers: Iterable[int]) -> list[str]:
    """The given layers' tensor names in the order a forward pass reads them: layer by layer,
    attention before the feed-forward, whose down projection comes last."""
    _check_open(mf, "find the tensors of")
    wanted = {int(i) for i in layers}
    found: list[tuple[int, int, int, str]] = []
    for name, t in mf.tensors.items():
        m = re.match(r"blk\.(\d+)\.(\w+?)(?:\.weight|\.bias)?$", name)
        if m and int(m.group(1)) in wanted:
            rank = _USE_ORDER.get(m.group(2), len(_USE_ORDER) // 2)
            found.append((int(m.group(1)), rank, t.byte_range[0], name))
    missing = wanted - {f[0] for f in found}
    if missing:
        raise ValueError(f"{mf.path} has no tensors for layers {sorted(missing)}")
    return [name for *_, name in sorted(found)]


class WindowPages:
    """The pages of one window's tensors in a model file's read-only map.

    Holds the file's ``np.memmap``, which keeps the mapping alive (closing the ModelFile then
    leaves it to the garbage collector, as the tensor views do), so an address handed to libc is
    never one the process has since reused. ``prefetch``, ``release`` and the residency calls
    are safe from a worker thread; on a closed ModelFile they raise ValueError.
    """

    def __init__(self, mf: ModelFile, ranges: Iterable[tuple[int, int]]) -> None:
        _check_open(mf, "map the pages of")
        self.file = mf
        self._map: np.ndarray = mf._require_reader().data
        self._base = int(self._map.ctypes.data)  # the map starts at file offset 0
        size = len(self._map)
        rs = list(ranges)
        for a, b in rs:
            if not 0 <= a <= b <= size:
                raise ValueError(f"[{a}, {b}) is outside {mf.path} ({size} bytes)")
        self.ranges = merged_pages(rs, PAGE)
        #: bytes of the whole pages covered (what prefetch reads and release drops)
        self.n_bytes = sum(b - a for a, b in self.ranges)

    @classmethod
    def of_window(cls, mf: ModelFile, window: Window) -> WindowPages:
        """The pages a node manages of a window built on ``mf``: all but a mixture's expert
        tensors (``is_expert``)."""
        experts = {t.byte_range for name, t in mf.tensors.items() if is_expert(name)}
        return cls(mf, [r for r in window.byte_ranges() if r not in experts])

    @classmethod
    def of_layers(cls, mf: ModelFile, layers: Iterable[int]) -> WindowPages:
        """The pages of the given layers' tensors (``blk.<i>.*``), without building a window."""
        _check_open(mf, "find the pages of")
        wanted = {int(i) for i in layers}
        found: set[int] = set()
        ranges = []
        for name, t in mf.tensors.items():
            m = re.match(r"blk\.(\d+)\.", name)
            if m and int(m.group(1)) in wanted:
                found.add(int(m.group(1)))
                ranges.append(t.byte_range)
        if wanted - found:
            raise ValueError(f"{mf.path} has no tensors for layers {sorted(wanted - found)}")
        return cls(mf, ranges)

    @classmethod
    def parts_in_use_order(cls, mf: ModelFile, layers: Iterable[int]) -> list[WindowPages]:
        """The pages of the given layers, one part per tensor, in the order a forward pass
        reads them (``tensors_in_use_order``): the trailing parts of a window are the ones a
        streaming node can read back last, and tensor by tensor its tail can be as many bytes
        as its memory spares, not whole layers."""
        return [cls(mf, [mf.tensors[name].byte_range])
                for name in tensors_in_use_order(mf, layers) if not is_expert(name)]

    def prefetch(self) -> float:
        """Start reading the window into the page cache. Returns the seconds the call took.

        The reads are asynchronous, but submitting them blocks while the device queue is full,
        so the call lasts about as long as the disk needs (run it on a worker thread).
        """
        t0 = time.perf_counter()
        _check_open(self.file, "prefetch")
        if _madvise is not None and _WILLNEED is not None:
            for a, b in self.ranges:
                for c in range(a, b, PREFETCH_CHUNK):
                    self._call(_madvise, "madvise(MADV_WILLNEED)", c, min(b, c + PREFETCH_CHUNK),
                               _WILLNEED)
        return time.perf_counter() - t0

    def release(self) -> float:
        """Drop the window's pages: unmap them from this process, then evict them from the page
        cache (clean file pages, nothing is written). Pages another mapping still holds stay.

        Call it before prefetching the next window: windows can share a boundary page. Returns
        the seconds the call took.
        """
        t0 = time.perf_counter()
        _check_open(self.file, "release")
        if _madvise is not None and _DONTNEED is not None:
            for a, b in self.ranges:
                self._call(_madvise, "madvise(MADV_DONTNEED)", a, b, _DONTNEED)
        if _fadvise is not None and self.ranges:
            fd = os.open(self.file.path, os.O_RDONLY)
            try:
                for a, b in self.ranges:
                    _fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return time.perf_counter() - t0

    def resident_bytes(self) -> int | None:
        """Bytes of the window's pages now in memory (``mincore``); None where unknown."""
        _check_open(self.file, "measure the pages of")
        if _mincore is None:
            return None
        vec = np.empty(max((b - a for a, b in self.ranges), default=0) // PAGE, np.uint8)
        pages = 0
        for a, b in self.ranges:
            self._call(_mincore, "mincore", a, b, vec.ctypes.data)
            pages += int(np.count_nonzero(vec[:(b - a) // PAGE] & 1))
        return pages * PAGE

    def resident_fraction(self) -> float | None:
        """Share of the window in memory, 0..1 (1.0 for an empty window); None where unknown."""
        got = self.resident_bytes()
        if got is None:
            return None
        return got / self.n_bytes if self.n_bytes else 1.0


    def _call(self, fn: _LibcCall, name: str, a: int, b: int, arg: int) -> None:
        if fn(self._base + a, b - a, arg) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name} on bytes [{a}, {b}) of {self.file.path} failed: "
                          f"{os.strerror(err)}")


@dataclass
class PagingStats:
    """What a node's paging did, for its status document.

    Updated on the model thread only: ``prefetch``/``release`` run on a worker thread return
    their durations and the model thread records them, so no lock is needed. A use with unknown
    residency (no ``mincore``) counts in ``uses`` but not in hits, hit rate or mean residency.
    """

    uses: int = 0
    measured_uses: int = 0
    hits: int = 0
    prefetches: int = 0
    releases: int = 0
    bytes_prefetched: int = 0  # bytes advised, not bytes the disk had to read
    bytes_released: int = 0
    residency_sum: float = 0.0
    prefetch_s: float = 0.0
    release_s: float = 0.0
    mincore_s: float = 0.0
    recent_residency: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_USES))

    def record_use(self, residency: float | None, seconds: float = 0.0) -> bool:
        """Count a use with the residency measured before it (taking ``seconds``); True = hit."""
        self.uses += 1
        self.mincore_s += seconds
        if residency is None:
            return False
        self.measured_uses += 1
        self.residency_sum += residency
        self.recent_residency.append(residency)
        hit = residency >= HIT_RESIDENCY
        self.hits += hit
        return hit

    def measure_use(self, pages: WindowPages) -> float | None:
        """Measure a window's residency just before using it and record the use."""
        t0 = time.perf_counter()
        residency = pages.resident_fraction()
        self.record_use(residency, time.perf_counter() - t0)
        return residency

    def record_prefetch(self, n_bytes: int, seconds: float) -> None:
        self.prefetches += 1
        self.bytes_prefetched += n_bytes
        self.prefetch_s += seconds

    def record_release(self, n_bytes: int, seconds: float) -> None:
        self.releases += 1
        self.bytes_released += n_bytes
        self.release_s += seconds

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.measured_uses if self.measured_uses else None

    @property
    def mean_residency(self) -> float | None:
        return self.residency_sum / self.measured_uses if self.measured_uses else None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values."""
        return {
            "uses": self.uses, "measured_uses": self.measured_uses, "hits": self.hits,
            "hit_rate": self.hit_rate, "mean_residency": self.mean_residency,
            "recent_residency": list(self.recent_residency),
            "prefetches": self.prefetches, "releases": self.releases,
            "bytes_prefetched": self.bytes_prefetched, "bytes_released": self.bytes_released,
            "prefetch_s": self.prefetch_s, "release_s": self.release_s,
            "mincore_s": self.mincore_s,
        }


def should_release(held_bytes: int, available_bytes: int,
                   headroom: float = RELEASE_HEADROOM) -> bool:
    """Whether a node should release each window after use.

    ``held_bytes``: the weights of all the node's windows (every round); ``available_bytes``:
    memory left for them, i.e. MemAvailable (which already counts clean page cache, these
    weights' pages included, as available) minus what the node allocates itself (KV caches,
    scratch). When everything fits, keeping it is free: after the first token every window is
    resident and prefetches cost nothing. When it does not, releasing the used window is what
    leaves room for the next one instead of letting the kernel evict whichever pages it picks.

    ``headroom`` (10 % by default) keeps the decision on the safe side: the kernel starts
    reclaiming before memory is exhausted (its watermarks), readahead reads a little past a
    window's end, and the available figure is a snapshot that other programs move meanwhile
    (prima.cpp's planner likewise counts only 0.8 x MemAvailable).
    """
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), not {headroom}")
    return held_bytes > available_bytes * (1.0 - headroom)
