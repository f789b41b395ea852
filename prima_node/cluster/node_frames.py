"""A node's incoming ring link: activation frames in, through the round's window, out to the
next node.

Frames are read on the event loop (which keeps answering the link's pings however long a window
takes) and run by one consumer, in arrival order, on the node's model thread; the result goes to
the successor. On the ring's first node (the head) a frame that comes back ends a round and goes
to the ring executor's queue (``ClusterNode.returned``) instead. A frame that cannot run (no
plan, another plan's number, no window for its round) is reported to the head as an error event
naming its step, which ends that step's forward with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
import numpy as np
from aiohttp import web

from .auth import Peer
from .frames import Frame, FrameError, decode, encode

if TYPE_CHECKING:
    from .node import Assignment, ClusterNode

_LOG = logging.getLogger("prima.cluster")


async def serve_ring(node: ClusterNode, ws: web.WebSocketResponse, peer: Peer) -> None:
    """Read one admitted ring link until it closes."""
    pending: asyncio.Queue[Frame | None] = asyncio.Queue()
    consumer = asyncio.create_task(_consume(node, pending))
    try:
        await _read(node, ws, peer, pending)
    finally:
        pending.put_nowait(None)
        await consumer


async def _read(node: ClusterNode, ws: web.WebSocketResponse, peer: Peer,
                pending: asyncio.Queue[Frame | None]) -> None:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY:
            await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                           message=b"ring links carry binary frames")
            _LOG.warning("closed the ring link from %s: a %s message", peer.node_id,
                         msg.type.name)
            break
        try:
            assert node.model is not None
            frame = decode(msg.data, node.model.config.n_embd)
        except FrameError as exc:
            await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                           message=f"bad frame: {exc}".encode()[:120])
            _LOG.warning("closed the ring link from %s: %s", peer.node_id, exc)
            break
        node.frames_in += 1
        a = node.assignment
        if a is not None and a.index == 0:
            node.returned.put(frame)  # back at the head: the round is complete
            continue
        pending.put_nowait(frame)


async def _consume(node: ClusterNode, pending: asyncio.Queue[Frame | None]) -> None:
    loop = asyncio.get_running_loop()
    while (frame := await pending.get()) is not None:
        a = node.assignment
        try:
            _check(a, frame)
            assert a is not None
            node.busy = (frame.step, frame.round, time.monotonic())
            try:
                out = await loop.run_in_executor(node.executor, _run, node, a, frame)
            finally:
                node.busy = None
            if node.out_ws is None or node.out_ws.closed:
                raise ConnectionError("the ring link to the next node is down")
            await node.out_ws.send_bytes(encode(out, node.config.link_dtype))
            node.last_out = (frame.epoch, frame.step, frame.round)
            if node.pager is not None and not frame.more:  # the round's last micro-batch
                node.pager.after_use(frame.round)
        except Exception as exc:
            _LOG.warning("frame of step %d round %d failed: %s", frame.step, frame.round, exc)
            if node.head_ws is not None and not node.head_ws.closed:
                await node.head_ws.send_json({"event": "error", "step": frame.step,
                                              "session": frame.session,
                                              "message": str(exc) or type(exc).__name__})


def _check(a: Assignment | None, frame: Frame) -> None:
    if a is None:
        raise ValueError("this node holds no plan (a new one is loading)")
    if frame.epoch != a.epoch:
        raise ValueError(f"a frame of plan {frame.epoch} reached a node holding plan {a.epoch}")
    if frame.round >= len(a.windows) or frame.n_rounds != a.k:
        raise ValueError(f"no window for round {frame.round} of {frame.n_rounds} here (the "
                         "plan changed?)")


def _run(node: ClusterNode, a: Assignment, frame: Frame) -> Frame:
    """The frame's round through this node's window (model thread)."""
    t0 = time.perf_counter()
    window = a.windows[frame.round]
    if node.pager is not None:
        node.pager.before_use(frame.round)
    pos = np.arange(frame.pos0, frame.pos0 + frame.n_tokens, dtype=np.int64)
    # the model's last layer: only the last token's row goes on (to the head's output), as
    # one node computes it, and one row crosses the last hop instead of the chunk
    assert node.model is not None  # a node holding a plan has its model
    last_only = window.end == node.model.config.n_layer
    h = window.forward(frame.hidden, pos, frame.session, last_only=last_only)
    dt = time.perf_counter() - t0
    node.compute_s += dt
    if last_only:
        frame.pos0 += frame.n_tokens - 1
    frame.hidden = h
    frame.marks.append((a.index, min(int(dt * 1e6), 2**32 - 1)))
    return frame
