"""Prometheus metrics in the text exposition format (version 0.0.4).

A few dozen lines instead of a dependency: the node only needs counters, gauges and histograms
with fixed label sets, read by one scraper at a time. Values are updated from the event loop only
(the worker thread reports through it), so no locks are needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        values = self.values or {(): 0.0}
        return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(values.items())]


class Gauge(_Metric):
    """A value read when scraped (queue depth, KV cache use): never stale."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.read = read

    def lines(self) -> list[str]:
        return [f"{self.name} {_num(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help)
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.buckets) and value > self.buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out, running = [], 0
        for bound, n in zip([*self.buckets, math.inf], self.counts, strict=True):
            running += n
            out.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        out.append(f"{self.name}_sum {_num(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


M = TypeVar("M", bound=_Metric)


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        out: list[str] = []
        for m in self.metrics:
            out += m.header()
            out += m.lines()
        return "\n".join(out) + "\n"


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class LabelledGauge(_Metric):
    """Gauges read when scraped whose label sets come and go (one per cluster node)."""

    kind = "gauge"

    def __init__(self, name: str, help: str,
                 read: Callable[[], Iterable[tuple[Labels, float]]]) -> None:
        super().__init__(name, help)
        self.read = read

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.read())]


class ServerMetrics:
    """The head's metrics; the gauges read the runtime when scraped."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        r = self.registry = Registry()
        self.requests = r.add(Counter(
            "prima_requests_total", "HTTP API requests answered, by endpoint and status code."))
        self.finished = r.add(Counter(
            "prima_generations_total", "Generations finished, by finish reason "
            "(stop, length, tool_calls; cancelled: the client went away or the node stopped)."))
        self.prompt_tokens = r.add(Counter(
            "prima_prompt_tokens_total", "Prompt tokens of finished generations."))
        self.completion_tokens = r.add(Counter(
            "prima_completion_tokens_total", "Tokens generated."))
        self.prefix_hits = r.add(Counter(
            "prima_prefix_cache_hits_total", "Generations that reused part of a cached prompt."))
        self.prefix_misses = r.add(Counter(
            "prima_prefix_cache_misses_total", "Generations whose prompt was evaluated whole."))
        self.prefix_tokens = r.add(Counter(
            "prima_prefix_cache_tokens_total", "Prompt tokens served from the KV cache instead "
            "of being evaluated again."))
        self.rejected = r.add(Counter(
            "prima_queue_rejected_total", "Requests refused because the queue was full (429)."))
        self.queue_wait = r.add(Histogram(
            "prima_queue_wait_seconds", "Time a request waited for the model.", _LATENCY))
        self.prefill = r.add(Histogram(
            "prima_prefill_seconds", "Prompt evaluation time per generation.", _LATENCY))
        self.first_token = r.add(Histogram(
            "prima_time_to_first_token_seconds", "Request start (after queueing) to first "
            "token.", _LATENCY))
        self.decode = r.add(Histogram(
            "prima_decode_seconds_per_token", "Mean decode time per token of each generation.",
            _PER_TOKEN))
        for name, (help, read) in gauges.items():
            r.add(Gauge(name, help, read))

    def render(self) -> str:
        return self.registry.render()


def ring_node_gauges(view: Callable[[], dict[str, Any]]) -> list[LabelledGauge]:
    """Per-node gauges of a ring's head, read from its cluster view when scraped (one view per
    scrape, not one per gauge)."""
    seen: dict[str, Any] = {"at": 0.0, "nodes": []}

    def nodes() -> list[dict[str, Any]]:
        now = time.monotonic()
        if now - seen["at"] > 0.5:
            seen["at"], seen["nodes"] = now, view()["nodes"]
        return list(seen["nodes"])

    def per_node(read: Callable[[dict[str, Any]], Any]
                 ) -> Callable[[], list[tuple[Labels, float]]]:
        def values() -> list[tuple[Labels, float]]:
            return [((("node", str(n["name"])), ("node_id", str(n["node_id"]))), float(v))
                    for n in nodes() if (v := read(n)) is not None]
        return values

    def paging(key: str) -> Callable[[dict[str, Any]], Any]:
        return lambda n: (n.get("paging") or {}).get(key)

    return [LabelledGauge(name, help, per_node(read)) for name, help, read in (
        ("prima_node_online", "1 while the node is connected to the head.",
         lambda n: float(n["online"])),
        ("prima_node_layers", "Layers the plan gives the node.", lambda n: n["layer_count"]),
        ("prima_node_compute_ms_per_token", "Measured compute per decoded token.",
         lambda n: n["measured_compute_ms"]),
        ("prima_node_prefetch_hit_ratio", "Window uses that found at least 99% of the "
         "window in memory (residency measured before each use).", paging("hit_rate")),
        ("prima_node_window_residency_ratio", "Mean share of a window in memory before "
         "its use.", paging("mean_residency")),
        ("prima_node_bytes_prefetched", "Bytes the node asked the OS to read ahead.",
         paging("bytes_prefetched")),
        ("prima_node_bytes_released", "Bytes the node dropped after use (streaming).",
         paging("bytes_released")))]
