"""Admission to a cluster that a stranger on the network cannot jam, with real sockets.

Strangers here are real websockets that never answer the challenge but answer every ping
(aiohttp's client does, and pings on its own): the kind of connection that a receive timeout
alone never ends. Several source addresses are loopback aliases (127.0.0.2, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ModelFactory
from loopback import serving
from server_process import ServerProcess
from test_cluster import SECRET, _node

from prima_node.cluster.admission import (
    EVICT_AFTER_S,
    MAX_UNADMITTED,
    MAX_UNADMITTED_PER_PEER,
)
from prima_node.cluster.auth import CLOSE_AUTH, connect
from prima_node.cluster.node import RING_PATH, ClusterNode, NodeConfig

pytestmark = pytest.mark.timeout(300)


def _bare_node(tmp_path: Path) -> ClusterNode:
    """A node's admission without a model: the handshake needs none."""
    return ClusterNode(NodeConfig(model_path=tmp_path / "none.gguf", secret=SECRET.encode(),
                                  node_id="server-node", name="server", n_ctx=16))


@asynccontextmanager
async def _node_serving(node: ClusterNode) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get(RING_PATH, node.handler)
    async with serving(app) as port:
        yield f"ws://127.0.0.1:{port}{RING_PATH}"


async def _strangers(stack: AsyncExitStack, url: str, addresses: list[str], each: int
                     ) -> list[aiohttp.ClientWebSocketResponse]:
    """``each`` challenged, never answering, ping-answering sockets from every address."""
    out = []
    for addr in addresses:
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(addr, 0))))
        for _ in range(each):
            ws = await session.ws_connect(url, heartbeat=0.3)  # pings, and answers pings
            assert (await ws.receive_json(timeout=5))["type"] == "challenge"
            out.append(ws)
    return out


async def _closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> tuple[int, str]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    return ws.close_code or 0, str(msg.extra or "")


def test_a_handshake_has_a_wall_clock_deadline_that_pings_do_not_move(tmp_path: Path) -> None:
    node = _bare_node(tmp_path)
    node.handshake_timeout_s = 1.5

    async def run() -> float:
        async with AsyncExitStack() as stack:
            url = await stack.enter_async_context(_node_serving(node))
            [ws] = await _strangers(stack, url, ["127.0.0.1"], 1)
            t0 = time.monotonic()
            code, why = await _closed_with(ws, timeout=10)
            held = time.monotonic() - t0
            assert code == CLOSE_AUTH and "no hello within 1.5 s" in why
            for _ in range(100):  # the node frees the place once its side of the close is done
                if node.admission.count() == 0:
                    break
                await asyncio.sleep(0.02)
            assert node.admission.count() == 0
            return held

    held = asyncio.run(run())
    assert 1.0 < held < 3.0, held


def test_strangers_from_one_address_give_way_to_a_node_that_proves_the_secret(
        tmp_path: Path) -> None:
    """One address's places are full of strangers: a newcomer from it is refused while they
    are young (503, Retry-After), and takes the oldest one's place once that had its time; a
    node from another address is never in their way."""
    node = _bare_node(tmp_path)

    async def run() -> None:
        async with AsyncExitStack() as stack:
            url = await stack.enter_async_context(_node_serving(node))
            strangers = await _strangers(stack, url, ["127.0.0.1"], MAX_UNADMITTED_PER_PEER)
            session = await stack.enter_async_context(aiohttp.ClientSession())
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url)
            assert refused.value.status == 503
            assert refused.value.headers is not None
            assert refused.value.headers.get("Retry-After") == "1"
            assert node.admission.by_address() == {"127.0.0.1": MAX_UNADMITTED_PER_PEER}
            other = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))))
            ws, peer = await connect(other, url, SECRET.encode(), "other-node", "probe")
            assert peer == "server-node"
            await ws.close()
            await asyncio.sleep(EVICT_AFTER_S + 0.1)
            ws, peer = await connect(session, url, SECRET.encode(), "real-node", "probe")
            assert peer == "server-node"
            code, why = await _closed_with(strangers[0], timeout=5)
            assert code == CLOSE_AUTH and "a newer connection took its place" in why
            assert all(not s.closed for s in strangers[1:])
            await ws.close()

    asyncio.run(run())


def test_every_place_taken_by_strangers_from_four_addresses_still_admits_a_node(
        tmp_path: Path) -> None:
    node = _bare_node(tmp_path)
    addresses = [f"127.0.0.{i}" for i in range(2, 6)]
    assert len(addresses) * MAX_UNADMITTED_PER_PEER == MAX_UNADMITTED

    async def run() -> None:
        async with AsyncExitStack() as stack:
            url = await stack.enter_async_context(_node_serving(node))
            await _strangers(stack, url, addresses, MAX_UNADMITTED_PER_PEER)
            assert node.admission.count() == MAX_UNADMITTED
            await asyncio.sleep(EVICT_AFTER_S + 0.1)
            session = await stack.enter_async_context(aiohttp.ClientSession())
            for i in range(3):  # the first takes a stranger's place, the next the one it left
                ws, peer = await connect(session, url, SECRET.encode(), f"node-{i}", "probe")
                assert peer == "server-node"
                await ws.close()
            assert node.admission.count() == MAX_UNADMITTED - 1  # only as many as needed

    asyncio.run(run())


def test_a_deeply_nested_hello_is_refused_without_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = _bare_node(tmp_path)

    async def run() -> tuple[int, str]:
        async with AsyncExitStack() as stack:
            url = await stack.enter_async_context(_node_serving(node))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            ws = await session.ws_connect(url)
            await ws.receive_json(timeout=5)
            await ws.send_str("[" * 200_000 + "]" * 200_000)
            return await _closed_with(ws, timeout=5)

    with caplog.at_level(logging.DEBUG):
        code, why = asyncio.run(run())
    assert code == CLOSE_AUTH and "nested too deeply" in why
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text
    assert "nested too deeply" in caplog.text  # the node says why it refused


class Jam:
    """Strangers on a real node process, kept alive (pinging, answering pings) by an event
    loop in a thread of their own until closed."""

    def __init__(self, port: int, addresses: list[str], each: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = AsyncExitStack()
        url = f"ws://127.0.0.1:{port}{RING_PATH}"
        self.sockets = self._call(_strangers(self.stack, url, addresses, each))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def open(self) -> int:
        return sum(1 for ws in self.sockets if not ws.closed)

    def close(self) -> None:
        self._call(self.stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_a_jammed_worker_and_head_still_plan_and_answer(
        make_model: ModelFactory, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> None:
    """Real processes: every admission place of the worker and the head held by strangers
    answering pings. Planning again (which opens new control, probe and ring links) succeeds,
    the ring answers, and a plan that cannot be made is a 409 with the reason, not a 500."""
    model = make_model("llama", "small", "Q8_0")
    cache = tmp_path_factory.mktemp("profiles")
    worker = _node(model, tmp_path / "w", cache)
    head: ServerProcess | None = None
    jams: list[Jam] = []
    try:
        worker.wait_ready()
        head = _node(model, tmp_path / "h", cache, "--head", "--all-nodes", "--peer",
                     f"127.0.0.1:{worker.port}")
        head.wait_ready()
        assert worker.port is not None and head.port is not None
        jams.append(Jam(worker.port, [f"127.0.0.{i}" for i in range(2, 6)],
                        MAX_UNADMITTED_PER_PEER))
        jams.append(Jam(head.port, ["127.0.0.1"], MAX_UNADMITTED_PER_PEER))
        time.sleep(EVICT_AFTER_S + 0.1)
        assert [j.open() for j in jams] == [MAX_UNADMITTED, MAX_UNADMITTED_PER_PEER]
        status, raw = head.post("/api/plan", {"k": 1}, timeout=120)
        assert status == 200, raw
        assert len(json.loads(raw)["plan"]["ring"]) == 2
        status, raw = head.post("/api/plan", {"k": 1000}, timeout=120)
        assert status == 409, raw
        err = json.loads(raw)["error"]
        assert err["code"] == "no_plan" and err["message"].startswith("no plan")
        status, raw = head.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=120)
        assert status == 200, raw
        assert "Traceback" not in head.log() and "Traceback" not in worker.log()
    finally:
        for jam in jams:
            jam.close()
        for srv in (head, worker):
            if srv is not None and srv.proc is not None and srv.proc.poll() is None:
                assert srv.stop() == 0, srv.log()
