"""The head's control channel to a node: JSON requests and answers over an admitted websocket.

Requests carry an id and an ``op``; the node answers with the same id and ``ok`` (plus fields)
or ``error`` (a sentence). A node may also send unsolicited events (``{"event": ...}``), e.g. a
failure while running a window, which the head turns into the failing request's error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

_LOG = logging.getLogger("prima.cluster")


class NodeError(RuntimeError):
    """A node answered a request with an error, or went away while it was pending."""


class ControlLink:
    """One admitted control connection, head side."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, node_id: str, url: str,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.ws, self.node_id, self.url = ws, node_id, url
        self.on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read(), name=f"control {node_id}")
        self.closed_reason: str | None = None

    @property
    def alive(self) -> bool:
        return self.closed_reason is None and not self.ws.closed

    async def call(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        if not self.alive:
            raise NodeError(f"node {self.node_id} is gone ({self.closed_reason or 'closed'})")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.ws.send_json({"id": rid, "op": op, **fields})
            answer = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise NodeError(f"node {self.node_id} did not answer {op!r} within "
                            f"{timeout:g} s") from None
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise NodeError(f"node {self.node_id}: the control link broke: {exc}") from None
        finally:
            self._pending.pop(rid, None)
        if "error" in answer:
            raise NodeError(f"node {self.node_id}: {answer['error']}")
        return answer

    async def _read(self) -> None:
        reason = "the connection closed"
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    reason = f"it sent a {msg.type.name} message on the control link"
                    break
                try:
                    doc = msg.json()
                except (ValueError, RecursionError):
                    reason = "it sent a message that is not JSON"
                    break
                if not isinstance(doc, dict):
                    continue
                if "event" in doc:
                    if self.on_event is not None:
                        self.on_event(self.node_id, doc)
                    continue
                fut = self._pending.get(doc.get("id", -1))
                if fut is not None and not fut.done():
                    fut.set_result(doc)
            else:
                reason = (f"the connection closed (code {self.ws.close_code})"
                          if self.ws.close_code else "the connection closed")
        except (ConnectionError, aiohttp.ClientError) as exc:
            reason = f"the connection broke: {exc}"
        finally:
            self.closed_reason = reason
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(NodeError(f"node {self.node_id} went away: {reason}"))
            if not self.ws.closed:
                await self.ws.close()
            if self.on_event is not None:
                self.on_event(self.node_id, {"event": "gone", "reason": reason})

    async def close(self) -> None:
        await self.ws.close()
        if not self._reader.done():
            await asyncio.wait([self._reader], timeout=5)
