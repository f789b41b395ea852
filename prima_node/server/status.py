"""The status document (``GET /api/status``) and its push channel (``GET /api/events``).

Home Assistant shows the cluster from this document and keeps it current from the events
websocket instead of polling. Changes are coalesced: many within one event-loop turn (a burst of
requests queueing) make one push.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..device.vitals import vitals
from ..engine.gpu import gpu_unavailable
from .runtime import Runtime

API_VERSION = 1


@dataclass
class LastRequest:
    at: float
    endpoint: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    first_token_s: float

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "at": _iso(self.at)}


@dataclass
class Status:
    runtime: Runtime
    node: str
    model_path: Path
    n_ctx: int
    host: str
    port: int
    started: float = field(default_factory=time.time)
    last: LastRequest | None = None
    totals: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0})
    #: the ring's view (nodes, plan, timings) on a cluster's head; None on a lone node
    cluster_view: Callable[[], dict[str, Any]] | None = None
    name: str = "node"
    #: --gpu none: a GPU backend without a device is then no surprise worth reporting
    gpu_off: bool = False

    def document(self) -> dict[str, Any]:
        rt = self.runtime
        capacity = rt.kv_capacity()
        used = rt.kv_tokens()
        model: dict[str, Any] = dict(rt.model_info) if rt.model_info else {
            "file": self.model_path.name, "path": str(self.model_path)}
        model["id"] = model_id(self.model_path)
        gpu = rt.gpu_status()  # read afresh: the caches it holds grow with the conversations
        if "gpu" in model:
            model["gpu"] = gpu
        n_layers = model.get("n_layers")
        return {
            "api_version": API_VERSION,
            "version": __version__,
            "node_id": self.node,
            "cluster_id": self.node,  # a cluster of one is known by its head
            "state": rt.state,
            "error": rt.error,
            "started_at": _iso(self.started),
            "uptime_s": round(time.time() - self.started, 1),
            "model": model,
            "context": {"n_ctx": self.n_ctx, "cache_slots": len(rt.slots),
                        "kv_tokens": used, "kv_capacity_tokens": capacity,
                        "kv_usage": round(used / capacity, 4) if capacity else 0.0},
            "queue": {"running": rt.running, "waiting": rt.waiting, "limit": rt.queue_limit},
            "requests": dict(self.totals),
            "last_request": self.last.as_dict() if self.last else None,
            "cluster": self.cluster_view() if self.cluster_view is not None else {
                "mode": "single",
                "nodes": [{"node_id": self.node, "name": self.name, "role": "head",
                           "online": rt.state in ("loading", "ready"),
                           "address": f"{self.host}:{self.port}",
                           "layers": [0, n_layers] if n_layers else None,
                           "version": __version__, "memory": vitals(),
                           "disk_read_bytes_per_s": None, "gpu": gpu,
                           "gpu_unavailable": None if self.gpu_off else gpu_unavailable(),
                           "gpu_layers": model.get("gpu_layers", 0)}],
                "plan": None,
            },
        }


def model_id(path: Path) -> str:
    return path.stem


class StatusHub:
    """Subscribers of ``/api/events``; ``changed()`` schedules one push of the new document."""

    def __init__(self, document: Callable[[], dict[str, Any]]) -> None:
        self._document = document
        self._queues: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._pending = False

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._queues.discard(q)

    def event(self) -> dict[str, Any]:
        return {"type": "status", "data": self._document()}

    def changed(self) -> None:
        """Safe to call from any thread; pushes once per event-loop turn."""
        if self._pending or not self._queues:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop (the model thread): the loop's own changes push soon
        self._pending = True
        loop.call_soon(self._push)

    def _push(self) -> None:
        self._pending = False
        event = self.event()
        for q in list(self._queues):
            if q.full():  # a subscriber that does not read: drop its oldest update
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(event)

    def close(self) -> None:
        for q in list(self._queues):
            if q.full():  # the stop signal must get through: drop an update for it
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(None)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
