"""A node's side of the head's control link: JSON requests in, answers out.

The head asks a node for its info, its profile, a link measurement, to load the windows of a
plan, or to apply a KV-cache operation; each request runs beside the reading loop (which keeps
answering the head's pings while a slow one, a first profile or a load, works), one at a time,
in order. Every failure is an answer naming the cause, never a dead link. A node takes orders
from one head at a time: a second head's control link is closed with ``CLOSE_OTHER_HEAD``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .auth import Peer
from .ring import CacheOp

if TYPE_CHECKING:
    from .node import ClusterNode

_LOG = logging.getLogger("prima.cluster")
CLOSE_OTHER_HEAD = 4409


async def serve_control(node: ClusterNode, ws: web.WebSocketResponse, peer: Peer) -> None:
    """Answer one admitted control link until it closes."""
    if node.head_ws is not None and not node.head_ws.closed:
        # two heads of one cluster would hand this node two plans at once
        _LOG.warning("refused a control link from %s: another head controls this node",
                     peer.node_id)
        await ws.close(code=CLOSE_OTHER_HEAD, message=b"another head controls this node")
        return
    node.head_ws = ws
    lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()
    async for msg in ws:
        request = await _request(ws, peer, msg)
        if request is None:
            break
        tasks.add(asyncio.create_task(_answer(node, ws, lock, request)))
        tasks = {t for t in tasks if not t.done()}
    for t in tasks:
        t.cancel()
    if node.head_ws is ws:
        node.head_ws = None


async def _request(ws: web.WebSocketResponse, peer: Peer, msg: aiohttp.WSMessage
                   ) -> dict[str, Any] | None:
    """The message as a request with an id and an op; None (and the link closed) if not."""
    if msg.type != aiohttp.WSMsgType.TEXT:
        await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                       message=b"control messages are JSON text")
        _LOG.warning("closed the control link from %s: a binary message", peer.node_id)
        return None
    try:
        req = msg.json()
        req["id"], req["op"]
    except (ValueError, RecursionError, KeyError, TypeError):
        await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                       message=b"malformed control message")
        _LOG.warning("closed the control link from %s: a malformed message", peer.node_id)
        return None
    return dict(req)


async def _answer(node: ClusterNode, ws: web.WebSocketResponse, lock: asyncio.Lock,
                  req: dict[str, Any]) -> None:
    rid, op = req["id"], req["op"]
    async with lock:
        try:
            answer = await _op(node, str(op), req)
            reply = {"id": rid, "ok": True, **answer}
        except Exception as exc:  # every failure is an answer, never a dead link
            _LOG.warning("%s failed: %s", op, exc)
            reply = {"id": rid, "error": str(exc) or type(exc).__name__}
        if not ws.closed:
            await ws.send_json(reply)


async def _op(node: ClusterNode, op: str, req: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    if op == "info":
        return node.info()
    if op == "profile":
        refresh = req.get("refresh") is True
        return {"profile": await loop.run_in_executor(None, node.profile, refresh)}
    if op == "link":
        return {"link": await node.measure_link(str(req["url"]))}
    if op == "load":
        await node.load(int(req["index"]), [tuple(r) for r in req["ranges"]],
                        req.get("successor"), int(req["k"]), int(req["epoch"]),
                        bool(req.get("stream", False)), int(req.get("gpu_layers", 0)))
        return node.info()
    if op == "kv":
        cache_op = CacheOp(req["action"])  # an unknown action is a ValueError, answered
        await loop.run_in_executor(node.executor, node.cache_op, cache_op,
                                   str(req["session"]), int(req.get("n", 0)))
        return {}
    raise ValueError(f"unknown operation {op!r}")
