"""What every node of a cluster runs: the admitted ``/cluster/ws`` endpoint, its layer windows,
and its place in the ring.

A node holds only the windows the head assigns it (one per round), runs each activation frame
that reaches it through the window of that frame's round, and sends the result to its successor.
The head's own node does the same for its windows, but frames that come back to it end a round
and go to the ring executor instead. One model thread per node runs all the windows, so frames
are processed in the order they arrive.

This module admits the connections (the cluster secret's challenge-response, within caps an
unadmitted flood cannot exceed) and holds the node's state: its model, the plan's windows, the
pager, the ring link to its successor. The control requests are answered in
``node_control.py``, the activation frames run in ``node_frames.py``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from .. import __version__
from ..device.link import measure_over, serve_probe
from ..device.profile import profile_device
from ..device.vitals import vitals
from ..engine.gpu import find_gpus, gpu_unavailable
from ..engine.model import DEFAULT_BATCH, Model
from ..engine.paging import WindowPages
from ..engine.window import Window
from .admission import Admission, AdmissionBusyError
from .auth import CLOSE_AUTH, HANDSHAKE_TIMEOUT_S, AuthError, NonceLog, accept, connect
from .fingerprint import fingerprint
from .frames import Frame, max_frame_bytes
from .node_control import CLOSE_OTHER_HEAD, serve_control
from .node_frames import serve_ring
from .pager import Pager
from .ring import CacheOp, apply_cache_op

_LOG = logging.getLogger("prima.cluster")
RING_PATH = "/cluster/ws"
CONTROL_BYTES = 4 * 2**20  # handshakes, control requests: small JSON
__all__ = ["CLOSE_OTHER_HEAD", "RING_PATH", "Assignment", "ClusterNode", "NodeConfig"]


@dataclass
class NodeConfig:
    model_path: Path
    secret: bytes
    node_id: str
    name: str
    n_ctx: int
    threads: int | None = None
    profile_cache: Path | None = None
    link_dtype: str = "f32"
    prefetch: bool = True  # release/prefetch windows when they do not all fit in memory
    pipeline: bool = True  # head: prompts cross the ring as pipelined micro-batches
    #: the GPU for the plan's GPU layers (ggml's name); None: the first the build has, if any;
    #: "none": the CPU only
    gpu: str | None = None
    tls_client: ssl.SSLContext | None = None  # set: the cluster runs on TLS (wss://)

    @property
    def scheme(self) -> str:
        return "ws" if self.tls_client is None else "wss"


@dataclass
class Assignment:
    """The windows the plan gives this node, and where its output goes."""

    index: int  # position in the ring (the head is 0)
    epoch: int  # the plan's number: frames of any other plan are refused
    ranges: list[tuple[int, int]]  # [start, end) of its window in each round
    successor_url: str | None  # None: a ring of one
    k: int = 1
    windows: list[Window] = field(default_factory=list)  # one per round
    gpu_layers: int = 0  # of each window, the first ones on the node's GPU


def resident_fits(model: Model, ranges: list[tuple[int, int]], gpu_layers: int,
                  available: int | None = None) -> bool:
    """Whether a node's windows (their CPU layers) are held resident with room to spare, so
    that decode steps use repacked copies of their matrices, as a lone node's ``forward``
    does (``engine.model.should_repack``: at most half of the memory available now, less
    the GPU layers Metal maps, which it keeps resident in the same memory). The same
    kernels give the same logits as one node, and decode 10-25 % faster; windows that
    stream from disk stay in the file mapping, where the pager can move them."""
    from ..device.memory import memory_info

    def matrices(layers: set[int]) -> int:
        return sum(t.n_bytes for name, t in model.file.tensors.items()
                   if name.startswith("blk.") and int(name.split(".")[1]) in layers
                   and len(t.shape) >= 2)

    held = matrices({i for a, b in ranges for i in range(a + gpu_layers, b)})
    mapped = model.accel is not None and model.accel.map_on is not None
    wired = matrices({i for a, _ in ranges for i in range(a, a + gpu_layers)}) if mapped else 0
    if available is None:
        available = memory_info().available
    return held <= (available - wired) // 2


class ClusterNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.model: Model | None = None  # opened by open_model()
        self.assignment: Assignment | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="prima-model")
        self.nonces = NonceLog()
        self.client: aiohttp.ClientSession | None = None
        self.out_ws: aiohttp.ClientWebSocketResponse | None = None
        self.head_ws: web.WebSocketResponse | None = None  # the head's control link to us
        #: frames that came back to the ring's first node (the head): a round is complete
        self.returned: queue.Queue[Frame] = queue.Queue()
        self.sockets: set[web.WebSocketResponse] = set()
        self.frames_in = 0
        self.max_frame = CONTROL_BYTES  # until the model is open and its width known
        self.admission = Admission()  # places for connections still proving the secret
        self.handshake_timeout_s = HANDSHAKE_TIMEOUT_S
        self.busy: tuple[int, int, float] | None = None  # (step, round, since) of the frame
        self.last_out: tuple[int, int, int] | None = None  # (epoch, step, round) sent on
        self._out_reader: asyncio.Task[None] | None = None
        self.compute_s = 0.0
        self.pager: Pager | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def open_model(self) -> None:
        """Map the model file (on the model thread): validates it, reads no layer."""
        if self.model is None:
            gpu = self.config.gpu
            if gpu is None:
                gpus = find_gpus()
                gpu = gpus[0].name if gpus else None
                reason = gpu_unavailable()
                if reason is not None:  # a GPU the user expects, idle
                    _LOG.warning("every layer runs on the CPU: %s", reason)
            self.model = Model.open(self.config.model_path, threads=self.config.threads,
                                    n_ctx=self.config.n_ctx,
                                    gpu=None if gpu == "none" else gpu)
            self.max_frame = max(CONTROL_BYTES,
                                 max_frame_bytes(self.model.config.n_embd, DEFAULT_BATCH))

    async def start(self, app: web.Application | None = None) -> None:
        """Open the client session and map the model (an aiohttp startup hook on a worker)."""
        self.client = self.new_client()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.open_model)
        _LOG.info("node %s (%s) ready for a plan: %s", self.config.node_id, self.config.name,
                  self.config.model_path.name)

    def new_client(self) -> aiohttp.ClientSession:
        """The session the node opens its links with (checking peers' certificates on TLS)."""
        ctx = self.config.tls_client
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx) if ctx else None)

    async def stop(self, app: web.Application | None = None) -> None:
        for ws in list(self.sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node stopping")
        if self.out_ws is not None:
            await self.out_ws.close()
        if self.client is not None:
            await self.client.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.pager is not None:
            self.pager.close()
        if self.model is not None:
            self.model.close()
            self.model = None

    def info(self) -> dict[str, Any]:
        path = self.config.model_path
        return {"node_id": self.config.node_id, "name": self.config.name, "version": __version__,
                "memory": vitals(),
                "model": {"file": path.name, "size": path.stat().st_size,
                          "fingerprint": fingerprint(path)},
                "assignment": None if self.assignment is None else {
                    "index": self.assignment.index, "epoch": self.assignment.epoch,
                    "ranges": self.assignment.ranges, "k": self.assignment.k,
                    "gpu_layers": self.assignment.gpu_layers},
                "gpu": None if self.model is None else self.model.gpu_status(),
                "gpu_unavailable": None if self.config.gpu == "none" else gpu_unavailable(),
                "repacked_bytes": 0 if self.model is None else self.model.repacked_bytes,
                "frames": self.frames_in, "compute_s": round(self.compute_s, 6),
                "paging": None if self.pager is None else self.pager.as_dict(),
                "busy": None if self.busy is None else {
                    "step": self.busy[0], "round": self.busy[1],
                    "for_s": round(time.monotonic() - self.busy[2], 3)},
                "last_out": None if self.last_out is None else dict(
                    zip(("epoch", "step", "round"), self.last_out, strict=True))}

    # -- the endpoint -----------------------------------------------------------------------------

    async def handler(self, request: web.Request) -> web.StreamResponse:
        remote = request.remote or "?"
        try:
            place = self.admission.claim(remote)
        except AdmissionBusyError as exc:
            # a flood of handshakes: memory stays bounded, and one address cannot take every
            # place
            _LOG.warning("refused a cluster connection from %s: %s", remote, exc)
            return web.json_response({"error": {"code": "busy", "message": "too many "
                                                "connections waiting for admission"}},
                                     status=503, headers={"Retry-After": "1"})
        # the limit fits the largest frame this model sends: an unadmitted peer can make the
        # node hold at most MAX_UNADMITTED of those, for at most the handshake's deadline
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, heartbeat=2.0, compress=False)
        try:
            async with asyncio.timeout(None) as place.hold:  # eviction sets it to now
                await ws.prepare(request)
                self.sockets.add(ws)
                peer = await accept(ws, self.config.secret, self.config.node_id, self.nonces,
                                    self.handshake_timeout_s)
        except (AuthError, TimeoutError) as exc:
            why = "a newer connection took its place" if place.evicted else str(exc)
            if not ws.closed and ws.prepared:
                await ws.close(code=CLOSE_AUTH, message=why.encode()[:120])
            _LOG.warning("refused a cluster connection from %s: %s", remote, why)
            self.sockets.discard(ws)
            return ws
        except BaseException:
            self.sockets.discard(ws)
            raise
        finally:
            self.admission.release(place)
        try:
            _LOG.info("admitted %s link from node %s (%s)", peer.purpose, peer.node_id,
                      request.remote)
            if peer.purpose == "control":
                await serve_control(self, ws, peer)
            elif peer.purpose == "ring":
                await serve_ring(self, ws, peer)
            else:
                await serve_probe(ws)
        finally:
            self.sockets.discard(ws)
        return ws

    def profile(self, refresh: bool = False) -> dict[str, Any]:
        """This node's profile: cached speeds (``refresh``: measured again) and its memory now."""
        accel = self.model.accel if self.model is not None else None
        prof = profile_device(self.config.model_path, threads=self.config.threads,
                              cache_dir=self.config.profile_cache, refresh=refresh,
                              gpu=accel.info.name if accel is not None else None)
        doc = prof.to_json()
        doc["name"] = self.config.node_id  # unique within the cluster; hostnames may repeat
        doc["host"] = self.config.name
        if self.model is not None and isinstance(doc.get("memory"), dict):
            # repacked copies of the current windows go with them when a new plan comes
            doc["memory"]["available"] += self.model.repacked_bytes
        if accel is not None and self.model is not None:
            # what this node's current windows hold on the GPU is free for the next plan
            # (a new plan replaces them): without it, a GPU node would plan without its own
            # layers' memory and lose them every other plan
            for d in doc["gpu"]["devices"]:
                d["vram_free"] += self.model.device_bytes - accel.device_bytes
        return doc

    async def measure_link(self, url: str) -> dict[str, float]:
        """A hop to another node, over an admitted probe connection: latency and throughput."""
        assert self.client is not None
        ws, _ = await connect(self.client, url, self.config.secret, self.config.node_id, "probe")
        async with ws:
            prof = await measure_over(ws, url, pings=5, bulk_bytes=2**20, bulk_repeats=2)
        return {"latency_s": prof.latency_s, "bytes_per_s": prof.bytes_per_s}

    async def load(self, index: int, ranges: list[tuple[int, int]], successor: str | None,
                   k: int, epoch: int, stream: bool = False, gpu_layers: int = 0,
                   output_on_gpu: bool = False) -> None:
        """Hold the plan's windows (``stream``: Halda planned this node to stream them from
        disk; ``gpu_layers``: the first ones of each on its GPU, their weights copied there;
        ``output_on_gpu``: the head computes the logits there), and open the ring link to the
        successor."""
        loop = asyncio.get_running_loop()

        replaced = self.assignment.windows if self.assignment is not None else []

        def build() -> tuple[list[Window], Pager]:
            assert self.model is not None
            for w in replaced:  # their caches, graphs and weight descriptions
                w.close()
            self.model.output_on_gpu(output_on_gpu)
            repack = not stream and resident_fits(self.model, ranges, gpu_layers)
            self.model.repack_output(repack and index == 0)
            windows: list[Window] = []
            n_embd = self.model.config.n_embd
            try:
                for a, b in ranges:
                    windows.append(self.model.window(a, b, gpu_layers, repack=repack))
                for w in windows:  # first touch of the weights and graphs now, not on a token
                    for n in (5, 1):
                        w.forward(np.zeros((n, n_embd), np.float32),
                                  np.arange(n, dtype=np.int64), "warm-up")
                    w.drop("warm-up")
            except BaseException:  # what was built goes (GPU memory is not paged out)
                for w in windows:
                    w.close()
                raise
            mf = self.model.file
            pages = [WindowPages.of_window(mf, w) for w in windows]
            # GPU layers compute from their copies (or, on Metal, from the mapping it keeps
            # resident): only the CPU layers are paged
            parts = [WindowPages.parts_in_use_order(mf, range(a + gpu_layers, b))
                     for a, b in ranges]
            return windows, Pager(pages, enabled=self.config.prefetch, planned_stream=stream,
                                  part_pages=parts)

        self.assignment = None  # until the new plan is whole, no frame runs on the old one
        if self.pager is not None:
            self.pager.close()
            self.pager = None
        windows, self.pager = await loop.run_in_executor(self.executor, build)
        if self.out_ws is not None:
            old, self.out_ws = self.out_ws, None
            await old.close()
        if successor is not None:
            assert self.client is not None
            self.out_ws, peer = await connect(self.client, successor, self.config.secret,
                                              self.config.node_id, "ring",
                                              max_msg_size=CONTROL_BYTES)
            # nothing comes back on an outgoing link, but reading it is what answers the far
            # end's pings and notices its close
            self._out_reader = asyncio.create_task(self._watch_out(self.out_ws, peer))
            _LOG.info("ring link to %s open", peer)
        self.assignment = Assignment(index, epoch, ranges, successor, k, windows, gpu_layers)
        _LOG.info("holding layers %s (%d round%s)", " ".join(f"{a}-{b - 1}" for a, b in ranges),
                  k, "s" if k > 1 else "")

    async def _watch_out(self, ws: aiohttp.ClientWebSocketResponse, peer: str) -> None:
        async for msg in ws:
            _LOG.warning("unexpected %s message on the ring link to %s", msg.type.name, peer)
        if self.out_ws is ws:
            _LOG.warning("the ring link to %s closed (code %s)", peer, ws.close_code)

    def cache_op(self, op: CacheOp, session: str, n: int = 0) -> None:
        """A KV-cache operation on every window this node holds (model thread)."""
        if self.assignment is not None:
            apply_cache_op(self.assignment.windows, op, session, n)
