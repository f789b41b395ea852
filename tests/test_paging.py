"""Prefetching, releasing and measuring a window's pages, on a real GGUF file.

The model file is private to this module (its own seed), and every Model is closed and collected
after its test: ``posix_fadvise(DONTNEED)`` cannot evict pages that another live mapping of the
file still has mapped, so a forgotten map would make the release tests fail for the wrong reason.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from prima_node.device.memory import MemoryInfo
from prima_node.engine import paging
from prima_node.engine.model import Model
from prima_node.engine.paging import (
    HIT_RESIDENCY,
    PAGE,
    RELEASE_HEADROOM,
    PagingStats,
    WindowPages,
    merged_pages,
    should_release,
    tensors_in_use_order,
)
from prima_node.engine.window import LayerWindow

# Measured on this kernel: a released window keeps at most a few pages (pages still sitting in
# another CPU's LRU batch are not dropped), far below 1 % of a window of this model.
RELEASED_MAX = 0.01
PREFETCH_WAIT_S = 5.0


@pytest.fixture(scope="module")
def model_path(make_model) -> Path:
    # "small" Q8_0: ~3 MB per layer, hundreds of pages per window
    path = make_model("llama", "small", "Q8_0", seed=7)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages of a file just written cannot be dropped
    finally:
        os.close(fd)
    return path


@pytest.fixture
def model(model_path: Path) -> Iterator[Model]:
    m = Model.open(model_path, threads=1, n_ctx=32)
    yield m
    m.close()
    del m
    gc.collect()  # unmap now, not whenever the views happen to go


def wait_resident(pages: WindowPages, at_least: float, timeout: float = PREFETCH_WAIT_S) -> float:
    """Poll residency until it reaches ``at_least`` (readahead is asynchronous) or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        r = pages.resident_fraction()
        assert r is not None
        if r >= at_least or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def fraction(pages: WindowPages) -> float:
    r = pages.resident_fraction()
    assert r is not None, "mincore is available on the platforms the tests run on"
    return r


def hidden(model: Model, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, model.config.n_embd)).astype(np.float32)


def run_window(model: Model, a: int, b: int) -> tuple[np.ndarray, LayerWindow]:
    """Read every weight of layers [a, b) by running them; returns (output, window)."""
    window = model.window(a, b)
    return window.forward(hidden(model), np.arange(3)), window


# -- merged_pages -------------------------------------------------------------------------------


def brute_pages(ranges: list[tuple[int, int]], page: int) -> set[int]:
    return {p for a, b in ranges if b > a for p in range(a // page, (b - 1) // page + 1)}


@pytest.mark.parametrize("page", [4096, 16384, 10])
def test_merged_pages_matches_page_sets(page: int) -> None:
    rng = np.random.default_rng(page)
    for _ in range(300):
        n = int(rng.integers(0, 12))
        starts = rng.integers(0, 20 * page, n)
        lengths = rng.integers(0, 3 * page, n)
        ranges = [(int(a), int(a + n_)) for a, n_ in zip(starts, lengths, strict=True)]
        out = merged_pages(ranges, page)
        pages: set[int] = set()
        for i, (a, b) in enumerate(out):
            assert a % page == 0 and b % page == 0 and a < b
            if i:
                assert a > out[i - 1][1], "overlapping or adjacent ranges were not merged"
            pages |= set(range(a // page, b // page))
        assert pages == brute_pages(ranges, page)


def test_merged_pages_crafted() -> None:
    p = 4096
    # unaligned, out of order, overlapping, adjacent after rounding, empty, a separate one
    ranges = [(5 * p + 1, 6 * p - 1), (10, 20), (p - 1, p + 1), (2 * p, 2 * p), (3 * p, 3 * p + 5)]
    assert merged_pages(ranges, p) == [(0, 2 * p), (3 * p, 4 * p), (5 * p, 6 * p)]
    assert merged_pages([(0, p), (p, 2 * p)], p) == [(0, 2 * p)]  # adjacent
    assert merged_pages([(0, 3 * p), (p, p + 1)], p) == [(0, 3 * p)]  # contained
    assert merged_pages([], p) == []
    with pytest.raises(ValueError):
        merged_pages([(5, 4)], p)
    with pytest.raises(ValueError):
        merged_pages([(-1, 4)], p)
    with pytest.raises(ValueError):
        merged_pages([(0, 4)], 0)


# -- which pages a window has --------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(0, 2), (2, 3), (5, 6)])
def test_window_pages_cover_its_tensors_only(model: Model, a: int, b: int) -> None:
    mf = model.file
    pages = WindowPages.of_window(mf, model.window(a, b))
    own = [t.byte_range for name, t in mf.tensors.items()
           if name.startswith("blk.") and a <= int(name.split(".")[1]) < b]
    assert own and pages.n_bytes >= 8 * PAGE  # the tests below need windows of many pages
    # every byte of the window's tensors is covered ...
    for s, e in own:
        assert any(ra <= s and e <= rb for ra, rb in pages.ranges), (s, e)
    # ... and exactly the pages those tensors touch, no more
    covered = {p for ra, rb in pages.ranges for p in range(ra // PAGE, rb // PAGE)}
    assert covered == brute_pages(own, PAGE)
    assert pages.n_bytes == len(covered) * PAGE
    # other tensors (other layers, embeddings, output) only share the rounding pages at their ends
    for name, t in mf.tensors.items():
        if t.byte_range in own:
            continue
        s, e = t.byte_range
        overlap = sum(max(0, min(e, rb) - max(s, ra)) for ra, rb in pages.ranges)
        assert overlap < 2 * PAGE, name
    assert WindowPages.of_layers(mf, range(a, b)).ranges == pages.ranges


def test_ranges_are_checked(model: Model) -> None:
    mf = model.file
    with pytest.raises(ValueError, match="outside"):
        WindowPages(mf, [(0, mf.size + 1)])
    with pytest.raises(ValueError, match="no tensors for layers"):
        WindowPages.of_layers(mf, [model.config.n_layer])
    empty = WindowPages(mf, [])
    assert empty.n_bytes == 0 and empty.resident_fraction() == 1.0
    empty.prefetch()
    empty.release()


# -- release, prefetch, residency ---------------------------------------------------------------


def test_release_drops_only_the_window_and_data_reads_back(model: Model) -> None:
    mf = model.file
    out1, window = run_window(model, 1, 3)
    run_window(model, 4, 5)
    pages = WindowPages.of_window(mf, window)
    other = WindowPages.of_layers(mf, [4])
    assert pages.resident_fraction() == 1.0  # the forward pass read all of it
    assert other.resident_fraction() == 1.0

    assert pages.release() >= 0.0
    assert fraction(pages) <= RELEASED_MAX
    assert other.resident_fraction() == 1.0  # a layer not adjacent to the window is untouched

    # the mapping still works: pages fault back in from the file, with the same bytes
    out2 = window.forward(hidden(model), np.arange(3))
    np.testing.assert_array_equal(out1, out2)
    assert pages.resident_fraction() == 1.0


def test_prefetch_from_a_worker_thread_loads_a_released_window(model: Model) -> None:
    pages = WindowPages.of_layers(model.file, [2, 3])
    run_window(model, 2, 4)
    pages.release()
    time.sleep(0.2)
    assert fraction(pages) <= RELEASED_MAX  # nothing loads it back by itself
    with ThreadPoolExecutor(1) as pool:
        seconds = pool.submit(pages.prefetch).result()
    assert seconds >= 0.0
    assert wait_resident(pages, 1.0) == 1.0


def test_prefetch_loads_ranges_longer_than_one_readahead(model: Model) -> None:
    """Linux reads at most the device's readahead limit per WILLNEED call (8 MB here): the whole
    model is prefetched in chunks, so all of it must arrive."""
    mf = model.file
    pages = WindowPages(mf, [t.byte_range for t in mf.tensors.values()])
    assert pages.n_bytes > 4 * paging.PREFETCH_CHUNK
    pages.release()
    assert fraction(pages) <= RELEASED_MAX
    pages.prefetch()
    assert wait_resident(pages, 1.0) == 1.0


def test_stats_of_a_miss_then_a_hit(model: Model) -> None:
    pages = WindowPages.of_layers(model.file, [0, 1])
    stats = PagingStats()
    stats.record_release(pages.n_bytes, pages.release())
    missed = stats.measure_use(pages)
    assert missed is not None and missed <= RELEASED_MAX
    stats.record_prefetch(pages.n_bytes, pages.prefetch())
    wait_resident(pages, 1.0)
    hit = stats.measure_use(pages)
    assert hit == 1.0
    assert (stats.uses, stats.measured_uses, stats.hits) == (2, 2, 1)
    assert stats.hit_rate == 0.5
    assert list(stats.recent_residency) == [missed, hit]
    assert stats.mincore_s > 0.0 and stats.prefetch_s > 0.0 and stats.release_s > 0.0
    assert stats.bytes_prefetched == stats.bytes_released == pages.n_bytes
    assert (stats.prefetches, stats.releases) == (1, 1)


def test_closed_model_gives_a_clear_error(model_path: Path) -> None:
    m = Model.open(model_path, threads=1, n_ctx=8)
    pages = WindowPages.of_layers(m.file, [1])
    m.close()
    for call in (pages.prefetch, pages.release, pages.resident_bytes, pages.resident_fraction):
        with pytest.raises(ValueError, match=r"model file is closed") as info:
            call()
        assert str(model_path) in str(info.value)
    with pytest.raises(ValueError, match="closed"):
        WindowPages(m.file, [])
    with pytest.raises(ValueError, match="closed"):
        WindowPages.of_layers(m.file, [1])
    del pages, m
    gc.collect()


def test_platform_without_the_calls(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS lacks posix_fadvise, other systems may lack madvise or mincore: no-ops, no guesses."""
    pages = WindowPages.of_layers(model.file, [1])
    monkeypatch.setattr(paging, "_fadvise", None)
    pages.release()  # madvise alone
    monkeypatch.setattr(paging, "_madvise", None)
    monkeypatch.setattr(paging, "_mincore", None)
    assert pages.prefetch() >= 0.0
    assert pages.release() >= 0.0
    assert pages.resident_bytes() is None and pages.resident_fraction() is None
    stats = PagingStats()
    assert stats.measure_use(pages) is None
    assert (stats.uses, stats.measured_uses, stats.hits) == (1, 0, 0)
    assert stats.hit_rate is None and stats.mean_residency is None
    out, _ = run_window(model, 1, 2)  # the weights still read fine
    assert np.isfinite(out).all()


# -- stats and the release rule -------------------------------------------------------------------


def test_stats_counting() -> None:
    stats = PagingStats()
    seq = [1.0, 0.995, HIT_RESIDENCY, 0.989, 0.0, None, 0.5]
    hits = [stats.record_use(r, 0.001) for r in seq]
    assert hits == [True, True, True, False, False, False, False]
    assert (stats.uses, stats.measured_uses, stats.hits) == (7, 6, 3)
    assert stats.hit_rate == pytest.approx(3 / 6)
    assert stats.mean_residency == pytest.approx((1.0 + 0.995 + 0.99 + 0.989 + 0.0 + 0.5) / 6)
    assert stats.mincore_s == pytest.approx(0.007)
    stats.record_prefetch(100, 0.5)
    stats.record_prefetch(50, 0.25)
    stats.record_release(100, 0.125)
    doc = json.loads(json.dumps(stats.as_dict()))
    assert doc["bytes_prefetched"] == 150 and doc["prefetches"] == 2
    assert doc["bytes_released"] == 100 and doc["releases"] == 1
    assert doc["prefetch_s"] == pytest.approx(0.75) and doc["release_s"] == pytest.approx(0.125)
    assert doc["recent_residency"] == [r for r in seq if r is not None]
    assert doc["hit_rate"] == pytest.approx(0.5)


def test_recent_residency_is_bounded() -> None:
    stats = PagingStats()
    for i in range(paging.RECENT_USES + 10):
        stats.record_use(i / 1000)
    assert len(stats.recent_residency) == paging.RECENT_USES
    assert stats.recent_residency[-1] == (paging.RECENT_USES + 9) / 1000
    assert stats.measured_uses == paging.RECENT_USES + 10


def test_should_release() -> None:
    gib = 1 << 30
    assert not should_release(4 * gib, 8 * gib)
    assert not should_release(7 * gib, 8 * gib, headroom=0.1)  # 7 <= 7.2
    assert should_release(int(7.5 * gib), 8 * gib, headroom=0.1)  # inside the headroom
    assert should_release(9 * gib, 8 * gib, headroom=0.0)
    assert not should_release(8 * gib, 8 * gib, headroom=0.0)
    assert should_release(1, 0)
    assert not should_release(0, 0)
    with pytest.raises(ValueError):
        should_release(1, 1, headroom=1.0)


# -- the node's policy (cluster.pager) ------------------------------------------------------------


def _until(cond: object, timeout: float = PREFETCH_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the pager's worker did not finish in time"
        time.sleep(0.02)


def test_a_streaming_node_releases_the_window_it_used_and_reads_the_next_ahead(
        model: Model) -> None:
    from prima_node.cluster.pager import Pager

    n = model.config.n_layer
    windows = [model.window(0, n // 2), model.window(n // 2, n)]
    for w in windows:
        w.forward(hidden(model), np.arange(3), "s")
    pages = [WindowPages.of_window(model.file, w) for w in windows]
    pages[1].release()
    pager = Pager(pages, planned_stream=True)  # what a node Halda plans to stream gets
    try:
        assert pager.stream
        pager.before_use(0)  # resident (just ran): a hit
        pager.after_use(0)  # release 0, prefetch 1, off this thread
        _until(lambda: pager.stats.prefetches == 1)
        assert fraction(pages[0]) < 0.05
        assert wait_resident(pages[1], 1.0) == 1.0
        pager.before_use(1)  # arrived ahead of its use: a hit
        pager.after_use(1)  # release 1, prefetch 0
        _until(lambda: pager.stats.prefetches == 2)
        assert fraction(pages[1]) < 0.05
        doc = pager.as_dict()
        assert (doc["mode"], doc["uses"], doc["hits"], doc["releases"]) == ("stream", 2, 2, 2)
        assert doc["bytes_released"] == pages[0].n_bytes + pages[1].n_bytes
        assert doc["held_bytes"] == pages[0].n_bytes + pages[1].n_bytes
    finally:
        pager.close()


def test_a_node_whose_windows_fit_keeps_them_and_prefetches_only_what_went_missing(
        model: Model) -> None:
    from prima_node.cluster.pager import Pager

    n = model.config.n_layer
    windows = [model.window(0, n // 2), model.window(n // 2, n)]
    pages = [WindowPages.of_window(model.file, w) for w in windows]
    for w in windows:
        w.forward(hidden(model), np.arange(3), "s")
    pager = Pager(pages)  # a few MB against this machine's memory: they fit
    try:
        assert not pager.stream
        pages[1].release()  # the OS took it (another program needed the memory)
        pager.before_use(1)  # measured (the first use is), found short
        assert pager.stats.hits == 0
        pager.after_use(0)  # the next is window 1: read it ahead again; nothing released
        _until(lambda: pager.stats.prefetches == 1)
        assert wait_resident(pages[1], 1.0) == 1.0
        assert fraction(pages[0]) == 1.0 and pager.stats.releases == 0
    finally:
        pager.close()


def test_prefetch_off_leaves_paging_to_the_os(model: Model) -> None:
    from prima_node.cluster.pager import Pager

    n = model.config.n_layer
    pages = [WindowPages.of_layers(model.file, range(0, n // 2)),
             WindowPages.of_layers(model.file, range(n // 2, n))]
    pager = Pager(pages, enabled=False, planned_stream=True)
    try:
        assert not pager.stream
        pager.before_use(0)
        pager.after_use(0)
        assert pager.as_dict()["uses"] == 0 and pager.stats.prefetches == 0
    finally:
        pager.close()


def test_tail_bytes_is_the_fewest_trailing_bytes_that_fit_halda_s_schedule() -> None:
    """k window heads and the one tail in use fit the budget (the pager reads the next tail
    only after releasing the last), and no smaller tail does; whole windows when even one
    window exceeds the budget."""
    from prima_node.cluster.pager import tail_bytes

    rng = np.random.default_rng(3)
    for _ in range(300):
        windows = rng.integers(1, 100, int(rng.integers(1, 5))).tolist()
        budget = int(rng.integers(0, 2 * sum(windows) + 1))
        t = tail_bytes(windows, budget)

        feasible = [u for u in range(max(windows) + 1)
                    if sum(max(0, r - u) for r in windows) + min(u, max(windows)) <= budget]
        assert t == (feasible[0] if feasible else max(windows)), (windows, budget)
    # Halda's closed form for equal windows: t = (k r - B) / (k - 1)
    assert tail_bytes([1000] * 8, 5000) == -(-(8 * 1000 - 5000) // 7)
    assert tail_bytes([1000, 1000], 900) == 1000  # not even one window fits: all of them move


def test_a_window_s_last_bytes_are_the_end_of_its_last_parts(model: Model) -> None:
    from prima_node.cluster.pager import last_bytes

    parts = WindowPages.parts_in_use_order(model.file, range(1, 3))
    last = parts[-1]
    few = last_bytes(parts, last.n_bytes // 2)  # cut inside the last tensor
    assert few.ranges[-1][1] == last.ranges[-1][1]
    assert last.n_bytes // 2 <= few.n_bytes <= last.n_bytes // 2 + 2 * PAGE
    more = last_bytes(parts, last.n_bytes + parts[-2].n_bytes // 2)  # into the one before

    def pages(w: WindowPages) -> set[int]:
        return {q for a, b in w.ranges for q in range(a // PAGE, b // PAGE)}

    assert pages(last) <= pages(more) <= pages(last) | pages(parts[-2])
    # (less the page the two tensors may share)
    assert len(pages(more) - pages(last)) * PAGE >= parts[-2].n_bytes // 2 - PAGE
    every = last_bytes(parts, sum(p.n_bytes for p in parts))
    assert every.n_bytes == WindowPages(model.file, [r for p in parts for r in p.ranges]).n_bytes


def test_a_window_s_parts_are_its_tensors_in_the_order_a_forward_pass_reads_them(
        model: Model) -> None:
    """Tensor by tensor, a streaming node's tail can be as many bytes as Halda planned;
    the last parts are the feed-forward's (read last), and together they are the window."""
    layers = range(1, 3)
    parts = WindowPages.parts_in_use_order(model.file, layers)
    whole = WindowPages.of_layers(model.file, layers)
    assert sum(p.n_bytes for p in parts) >= whole.n_bytes > max(p.n_bytes for p in parts)
    covered = sorted(r for p in parts for r in p.ranges)
    assert covered[0][0] == whole.ranges[0][0] and covered[-1][1] == whole.ranges[-1][1]
    names = tensors_in_use_order(model.file, layers)
    assert len(names) == len(parts)
    assert sorted(names) == sorted(n for n in model.file.tensors if n.startswith(("blk.1.",
                                                                                  "blk.2.")))
    assert names[-1] == "blk.2.ffn_down.weight", names
    assert names.index("blk.1.attn_q.weight") < names.index("blk.1.ffn_gate.weight") \
        < names.index("blk.2.attn_norm.weight")
    with pytest.raises(ValueError, match="no tensors for layers"):
        WindowPages.parts_in_use_order(model.file, [999])


def test_a_streaming_node_whose_disk_is_behind_still_releases_but_queues_no_prefetch(
        model: Model) -> None:
    from concurrent.futures import Future

    from prima_node.cluster.pager import Pager

    n = model.config.n_layer
    windows = [model.window(0, n // 2), model.window(n // 2, n)]
    for w in windows:
        w.forward(hidden(model), np.arange(3), "s")
    pages = [WindowPages.of_window(model.file, w) for w in windows]
    pager = Pager(pages, planned_stream=True)
    try:
        busy: Future[None] = Future()  # a prefetch still reading
        pager._pending = busy
        pager.after_use(0)
        _until(lambda: pager.stats.releases == 1)
        assert fraction(pages[0]) < 0.05  # released all the same
        assert pager.stats.prefetches == 0 and pager._pending is busy  # nothing queued
    finally:
        pager.close()


def _memory(available: int) -> MemoryInfo:
    return MemoryInfo(total=2 * available, available=available, os_available=available,
                      cgroup_limit=None, cgroup_available=None, cgroup_version=None,
                      swap_total=0, swap_free=0, source="MemAvailable")


def test_under_a_cgroup_cap_the_windows_pages_are_counted_once(model: Model) -> None:
    """A cgroup's available figure counts inactive file pages as reclaimable, and a node's
    windows, once used, are among them: the windows get the cap less what else is used, not
    that plus their own inactive pages again (a node under a 300 MB cap took 600 MB for its
    windows and re-read all of them every token)."""
    from prima_node.cluster.pager import Pager

    n = model.config.n_layer
    windows = [model.window(0, n // 2), model.window(n // 2, n)]
    for w in windows:
        w.forward(hidden(model), np.arange(3), "s")
    pages = [WindowPages.of_window(model.file, w) for w in windows]
    resident = sum(p.resident_bytes() or 0 for p in pages)
    assert resident > 0
    other = 50 << 20  # used besides the windows (the process, its KV cache)
    limit = other + resident + (8 << 20)
    inactive = resident // 2  # half of the windows' pages went inactive

    def capped() -> MemoryInfo:
        available = limit - (other + resident) + inactive
        return MemoryInfo(total=8 * limit, available=available, os_available=8 * limit,
                          cgroup_limit=limit, cgroup_available=available, cgroup_version=1,
                          swap_total=0, swap_free=0, source="cgroup v1 memory limit",
                          cgroup_reclaimable=inactive)

    pager = Pager(pages, memory=capped)
    try:
        held = sum(p.resident_bytes() or 0 for p in pages)
        assert abs(pager.capacity - (limit - other - resident + held)) <= 2 * PAGE * len(pages)
    finally:
        pager.close()


def test_a_figure_slightly_short_does_not_stream_what_stays_resident(model: Model) -> None:
    """The memory arithmetic is a few tens of MB off either way; a node whose windows stay
    resident keeps them (streaming them from a slow disk costs far more than it saves) until
    a use finds one evicted."""
    from prima_node.cluster.pager import RESIDENT_SAMPLE, Pager

    bounds = [(a, a + 2) for a in range(0, model.config.n_layer, 2)]
    windows = [model.window(a, b) for a, b in bounds]
    for w in windows:
        w.forward(hidden(model), np.arange(3), "s")
    pages = [WindowPages.of_window(model.file, w) for w in windows]
    for pg in pages:
        pg.prefetch()
    held = sum(p.n_bytes for p in pages)
    pager = Pager(pages, memory=lambda: _memory(int(0.88 * held)), recheck_s=0.0)
    try:
        assert not pager.stream  # 12 % short by the figures, inside the doubt
        pager.before_use(0)  # sampled: resident
        pager.after_use(0)
        pager._worker.submit(lambda: None).result(timeout=PREFETCH_WAIT_S)
        assert not pager.stream
        pages[1].release()  # the kernel took a window after all
        for _ in range(RESIDENT_SAMPLE):
            pager.before_use(1)
        pager.after_use(1)
        pager._worker.submit(lambda: None).result(timeout=PREFETCH_WAIT_S)
        assert pager.stream
    finally:
        pager.close()


def test_a_node_starts_streaming_when_memory_shrinks_and_stops_when_it_returns(
        model: Model) -> None:
    """The memory figure is read again while the node runs: other programs of the home take
    memory and give it back, and the mode follows (with hysteresis)."""
    from prima_node.cluster.pager import RESIDENT_SAMPLE, Pager, tail_bytes

    bounds = [(a, a + 2) for a in range(0, model.config.n_layer, 2)]  # 3 windows of 2 layers
    windows = [model.window(a, b) for a, b in bounds]
    for w in windows:
        w.forward(hidden(model), np.arange(3), "s")
    pages = [WindowPages.of_window(model.file, w) for w in windows]
    per_layer = [[WindowPages.of_layers(model.file, [i]) for i in range(a, b)] for a, b in bounds]

    def idle() -> None:  # every paging job submitted so far has run (one worker, in order)
        pager._worker.submit(lambda: None).result(timeout=PREFETCH_WAIT_S)

    held = sum(p.n_bytes for p in pages)
    available = [4 * held]
    pager = Pager(pages, part_pages=per_layer, memory=lambda: _memory(available[0]),
                  recheck_s=0.0)
    try:
        assert not pager.stream
        available[0] = int(0.95 * held)  # another program took memory: no longer fits,
        pages[1].release()  # and the kernel evicted a window, which a use finds
        for _ in range(RESIDENT_SAMPLE):
            pager.before_use(1)
        pager.after_use(0)
        idle()
        assert pager.stream and pager.as_dict()["mode_changes"] == 1
        sizes = [p.n_bytes for p in pages]

        def tail_for(capacity: int, headroom: float) -> int:
            return tail_bytes(sizes, int(capacity * (1 - headroom)))

        # 3 heads + the tail in use fit in 0.9 of what is left: only each window's end moves
        tail = tail_for(int(0.95 * held), RELEASE_HEADROOM)
        assert pager.tail == tail and 0 < tail < min(sizes) // 4
        assert all(tail <= m.n_bytes <= tail + 2 * PAGE for m in pager.moving)
        pager.after_use(0)  # now it releases what it used and prefetches the next
        _until(lambda: pager.stats.releases >= 1 and pager.stats.prefetches >= 1)
        # back to just above fitting: inside the hysteresis band it keeps streaming, and the
        # tail shrinks only to what leaves twice the headroom free
        available[0] = int(held / (1 - 1.5 * RELEASE_HEADROOM))
        pager.after_use(1)
        idle()
        loose = tail_for(available[0], 2 * RELEASE_HEADROOM)
        assert pager.stream and 0 < pager.tail == loose < tail
        assert pager.as_dict()["mode_changes"] == 2
        available[0] = int(0.3 * held)  # less than one window: whole windows move
        pager.after_use(2)
        idle()
        assert pager.tail >= max(sizes) and pager.moving == pages
        released = [fraction(p) for p in pages]
        available[0] = 4 * held  # given back: keep everything again, read back what went
        pager.after_use(0)
        idle()
        assert not pager.stream
        assert all(wait_resident(p, 1.0) == 1.0 for p in pages), released
        doc = pager.as_dict()
        assert (doc["mode"], doc["mode_changes"], doc["streamed_bytes"]) == ("resident", 4, 0)
    finally:
        pager.close()


def test_halda_prices_the_headroom_the_pager_keeps() -> None:
    """Halda's streaming budget is the pager's: the room less the share kept free."""
    from prima_node.planner.halda import STREAM_HEADROOM

    assert STREAM_HEADROOM == RELEASE_HEADROOM
