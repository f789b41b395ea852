"""What every node of a cluster runs: the admitted ``/cluster/ws`` endpoint, its layer windows,
and its place in the ring.

A node holds only the windows the head assigns it (one per round), runs each activation frame
that reaches it through the window of that frame's round, and sends the result to its successor.
The head's own node does the same for its windows, but frames that come back to it end a round
and go to the ring executor instead. One model thread per node runs all the windows, so frames
are processed in the order they arrive.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from .. import __version__
from ..device.link import measure_over, serve_probe
from ..device.vitals import vitals
from .auth import AuthError, NonceLog, Peer, accept, connect
from .fingerprint import fingerprint
from .frames import Frame, FrameError, decode, encode, max_frame_bytes
from .pager import Pager

_LOG = logging.getLogger("prima.cluster")
RING_PATH = "/cluster/ws"
CONTROL_BYTES = 4 * 2**20  # handshakes, control requests: small JSON
MAX_UNADMITTED = 16  # connections still proving the secret; more wait for a free place
#: of those, from one address: one misbehaving device cannot take every place and keep the
#: real nodes out (a head opens at most two at once to a node: control and a link probe)
MAX_UNADMITTED_PER_PEER = 4
CLOSE_OTHER_HEAD = 4409


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
    windows: list[Any] = field(default_factory=list)  # LayerWindow per round


class ClusterNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.model: Any = None  # engine.model.Model, opened by open_model()
        self.assignment: Assignment | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="prima-model")
        self.nonces = NonceLog()
        self.client: aiohttp.ClientSession | None = None
        self.out_ws: aiohttp.ClientWebSocketResponse | None = None
        self.head_ws: web.WebSocketResponse | None = None  # the head's control link to us
        self.on_round_done: Callable[[Frame], None] | None = None  # set on the head
        self.sockets: set[web.WebSocketResponse] = set()
        self.frames_in = 0
        self.max_frame = CONTROL_BYTES  # until the model is open and its width known
        self.unadmitted = 0
        self.unadmitted_from: dict[str, int] = {}  # remote address -> its share of those
        self.busy: tuple[int, int, float] | None = None  # (step, round, since) of the frame
        self.last_out: tuple[int, int, int] | None = None  # (epoch, step, round) sent on
        self._out_reader: asyncio.Task[None] | None = None
        self.compute_s = 0.0
        self.pager: Pager | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def open_model(self) -> None:
        """Map the model file (on the model thread): validates it, reads no layer."""
        from ..engine.model import Model

        if self.model is None:
            self.model = Model.open(self.config.model_path, threads=self.config.threads,
                                    n_ctx=self.config.n_ctx)
            from ..engine.model import DEFAULT_BATCH

            self.max_frame = max(CONTROL_BYTES,
                                 max_frame_bytes(self.model.config.n_embd, DEFAULT_BATCH))

    async def start(self, app: web.Application) -> None:
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
                    "ranges": self.assignment.ranges, "k": self.assignment.k},
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
        mine = self.unadmitted_from.get(remote, 0)
        if self.unadmitted >= MAX_UNADMITTED or mine >= MAX_UNADMITTED_PER_PEER:
            # a flood of handshakes: memory stays bounded, and one address cannot take every
            # place
            _LOG.warning("refused a cluster connection from %s: %d connections (%d from it) "
                         "are still proving the secret", remote, self.unadmitted, mine)
            return web.json_response({"error": {"code": "busy", "message": "too many "
                                                "connections waiting for admission"}},
                                     status=503, headers={"Retry-After": "1"})
        # the limit fits the largest frame this model sends: an unadmitted peer can make the
        # node hold at most MAX_UNADMITTED of those, for at most the handshake's timeout
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, heartbeat=2.0, compress=False)
        # counted from before the first await: the caps cannot overshoot
        self.unadmitted += 1
        self.unadmitted_from[remote] = mine + 1
        try:
            await ws.prepare(request)
            self.sockets.add(ws)
            peer = await accept(ws, self.config.secret, self.config.node_id, self.nonces)
        except AuthError as exc:
            _LOG.warning("refused a cluster connection from %s: %s", remote, exc)
            self.sockets.discard(ws)
            return ws
        except BaseException:
            self.sockets.discard(ws)
            raise
        finally:
            self.unadmitted -= 1
            left = self.unadmitted_from[remote] - 1
            if left:
                self.unadmitted_from[remote] = left
            else:
                del self.unadmitted_from[remote]
        try:
            _LOG.info("admitted %s link from node %s (%s)", peer.purpose, peer.node_id,
                      request.remote)
            if peer.purpose == "control":
                await self._control(ws, peer)
            elif peer.purpose == "ring":
                await self._ring_in(ws, peer)
            else:
                await serve_probe(ws)
        finally:
            self.sockets.discard(ws)
        return ws

    # -- control ----------------------------------------------------------------------------------

    async def _control(self, ws: web.WebSocketResponse, peer: Peer) -> None:
        if self.head_ws is not None and not self.head_ws.closed:
            # two heads of one cluster would hand this node two plans at once
            _LOG.warning("refused a control link from %s: another head controls this node",
                         peer.node_id)
            await ws.close(code=CLOSE_OTHER_HEAD, message=b"another head controls this node")
            return
        self.head_ws = ws
        lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                               message=b"control messages are JSON text")
                _LOG.warning("closed the control link from %s: a binary message", peer.node_id)
                break
            try:
                req = msg.json()
                rid, op = req["id"], req["op"]
            except (ValueError, KeyError, TypeError):
                await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                               message=b"malformed control message")
                _LOG.warning("closed the control link from %s: a malformed message",
                             peer.node_id)
                break
            # the op runs beside this loop, which keeps reading (and so answering the head's
            # pings) while a slow one (a first profile, a load) works; one at a time, in order
            tasks.add(asyncio.create_task(self._answer(ws, lock, rid, op, req)))
            tasks = {t for t in tasks if not t.done()}
        for t in tasks:
            t.cancel()
        if self.head_ws is ws:
            self.head_ws = None

    async def _answer(self, ws: web.WebSocketResponse, lock: asyncio.Lock, rid: Any, op: str,
                      req: dict[str, Any]) -> None:
        async with lock:
            try:
                answer = await self._op(op, req)
                reply = {"id": rid, "ok": True, **answer}
            except Exception as exc:  # every failure is an answer, never a dead link
                _LOG.warning("%s failed: %s", op, exc)
                reply = {"id": rid, "error": str(exc) or type(exc).__name__}
            if not ws.closed:
                await ws.send_json(reply)

    async def _op(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if op == "info":
            return self.info()
        if op == "profile":
            refresh = req.get("refresh") is True
            return {"profile": await loop.run_in_executor(None, self._profile, refresh)}
        if op == "link":
            return {"link": await self.measure_link(str(req["url"]))}
        if op == "load":
            await self.load(int(req["index"]), [tuple(r) for r in req["ranges"]],
                            req.get("successor"), int(req["k"]), int(req["epoch"]),
                            bool(req.get("stream", False)))
            return self.info()
        if op == "kv":
            await loop.run_in_executor(self.executor, self.kv, str(req["action"]),
                                       str(req["session"]), int(req.get("n", 0)))
            return {}
        raise ValueError(f"unknown operation {op!r}")

    def _profile(self, refresh: bool = False) -> dict[str, Any]:
        """This node's profile: cached speeds (``refresh``: measured again) and its memory now."""
        from ..device.profile import profile_device

        prof = profile_device(self.config.model_path, threads=self.config.threads,
                              cache_dir=self.config.profile_cache, refresh=refresh)
        doc = prof.to_json()
        doc["name"] = self.config.node_id  # unique within the cluster; hostnames may repeat
        doc["host"] = self.config.name
        return doc

    async def measure_link(self, url: str) -> dict[str, float]:
        """A hop to another node, over an admitted probe connection: latency and throughput."""
        assert self.client is not None
        ws, _ = await connect(self.client, url, self.config.secret, self.config.node_id, "probe")
        async with ws:
            prof = await measure_over(ws, url, pings=5, bulk_bytes=2**20, bulk_repeats=2)
        return {"latency_s": prof.latency_s, "bytes_per_s": prof.bytes_per_s}

    async def load(self, index: int, ranges: list[tuple[int, int]], successor: str | None,
                   k: int, epoch: int, stream: bool = False) -> None:
        """Hold the plan's windows (``stream``: Halda planned this node to stream them from
        disk), and open the ring link to the successor."""
        loop = asyncio.get_running_loop()

        replaced = self.assignment.windows if self.assignment is not None else []

        def build() -> tuple[list[Any], Pager]:
            assert self.model is not None
            for w in replaced:  # their caches, graphs and weight descriptions
                w.close()
            windows = [self.model.window(a, b) for a, b in ranges]
            n_embd = self.model.config.n_embd
            for w in windows:  # first touch of the weights and graphs now, not on a token
                for n in (5, 1):
                    w.forward(np.zeros((n, n_embd), np.float32),
                              np.arange(n, dtype=np.int64), "warm-up")
                w.drop("warm-up")
            from ..engine.paging import WindowPages

            mf = self.model.file
            pages = [WindowPages.of_window(mf, w) for w in windows]
            per_layer = [[WindowPages.of_layers(mf, [i]) for i in range(a, b)]
                         for a, b in ranges]
            return windows, Pager(pages, enabled=self.config.prefetch, planned_stream=stream,
                                  layer_pages=per_layer)

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
        self.assignment = Assignment(index, epoch, ranges, successor, k, windows)
        _LOG.info("holding layers %s (%d round%s)", " ".join(f"{a}-{b - 1}" for a, b in ranges),
                  k, "s" if k > 1 else "")

    async def _watch_out(self, ws: aiohttp.ClientWebSocketResponse, peer: str) -> None:
        async for msg in ws:
            _LOG.warning("unexpected %s message on the ring link to %s", msg.type.name, peer)
        if self.out_ws is ws:
            _LOG.warning("the ring link to %s closed (code %s)", peer, ws.close_code)

    def kv(self, action: str, session: str, n: int = 0) -> None:
        """Apply a KV-cache operation to every window this node holds (model thread)."""
        if self.assignment is None:
            return
        for w in self.assignment.windows:
            if action == "clear":
                w.clear(session)
            elif action == "truncate":
                w.truncate(session, n)
            elif action == "drop":
                w.drop(session)
            else:
                raise ValueError(f"unknown KV action {action!r}")

    # -- ring data --------------------------------------------------------------------------------

    async def _ring_in(self, ws: web.WebSocketResponse, peer: Peer) -> None:
        # frames are run by one consumer, in arrival order, while this loop keeps reading (and
        # so answering pings) however long a window takes
        pending: asyncio.Queue[Frame | None] = asyncio.Queue()
        consumer = asyncio.create_task(self._consume(pending))
        try:
            await self._read_ring(ws, peer, pending)
        finally:
            pending.put_nowait(None)
            await consumer

    async def _read_ring(self, ws: web.WebSocketResponse, peer: Peer,
                         pending: asyncio.Queue[Frame | None]) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                               message=b"ring links carry binary frames")
                _LOG.warning("closed the ring link from %s: a %s message", peer.node_id,
                             msg.type.name)
                break
            try:
                assert self.model is not None
                frame = decode(msg.data, self.model.config.n_embd)
            except FrameError as exc:
                await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                               message=f"bad frame: {exc}".encode()[:120])
                _LOG.warning("closed the ring link from %s: %s", peer.node_id, exc)
                break
            self.frames_in += 1
            a = self.assignment
            if a is not None and a.index == 0:
                if self.on_round_done is not None:
                    self.on_round_done(frame)  # back at the head: the round is complete
                continue  # (a head without a running forward drops it: never around again)
            pending.put_nowait(frame)

    async def _consume(self, pending: asyncio.Queue[Frame | None]) -> None:
        loop = asyncio.get_running_loop()
        while (frame := await pending.get()) is not None:
            a = self.assignment
            try:
                if a is None:
                    raise ValueError("this node holds no plan (a new one is loading)")
                if frame.epoch != a.epoch:
                    raise ValueError(f"a frame of plan {frame.epoch} reached a node holding "
                                     f"plan {a.epoch}")
                if frame.round >= len(a.windows) or frame.n_rounds != a.k:
                    raise ValueError(f"no window for round {frame.round} of {frame.n_rounds} "
                                     "here (the plan changed?)")
                self.busy = (frame.step, frame.round, time.monotonic())
                try:
                    out = await loop.run_in_executor(self.executor, self._run, a, frame)
                finally:
                    self.busy = None
                if self.out_ws is None or self.out_ws.closed:
                    raise ConnectionError("the ring link to the next node is down")
                await self.out_ws.send_bytes(encode(out, self.config.link_dtype))
                self.last_out = (frame.epoch, frame.step, frame.round)
                if self.pager is not None:
                    self.pager.after_use(frame.round)
            except Exception as exc:
                _LOG.warning("frame of step %d round %d failed: %s", frame.step, frame.round,
                             exc)
                if self.head_ws is not None and not self.head_ws.closed:
                    await self.head_ws.send_json({"event": "error", "step": frame.step,
                                                  "session": frame.session,
                                                  "message": str(exc) or type(exc).__name__})

    def _run(self, a: Assignment, frame: Frame) -> Frame:
        t0 = time.perf_counter()
        window = a.windows[frame.round]
        if self.pager is not None:
            self.pager.before_use(frame.round)
        pos = np.arange(frame.pos0, frame.pos0 + frame.n_tokens, dtype=np.int64)
        h = window.forward(frame.hidden, pos, frame.session)
        dt = time.perf_counter() - t0
        self.compute_s += dt
        frame.hidden = h
        frame.marks.append((a.index, min(int(dt * 1e6), 2**32 - 1)))
        return frame
