"""The link probe: a ring hop's round trip and throughput, measured over a real websocket on
loopback, and what it does with frames that are not the probe protocol."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from loopback import serving

from prima_node.cli import link_url, main
from prima_node.device.link import ACK, BULK, PING, LinkProfile, add_probe_route, measure_link


async def _with_probe(fn: Callable[[str], Awaitable[None]]) -> None:
    app = web.Application()
    add_probe_route(app)
    async with serving(app) as port:
        await fn(f"ws://127.0.0.1:{port}/api/link")


def test_a_loopback_hop_is_fast_and_priced_as_latency_plus_bytes() -> None:
    found: list[LinkProfile] = []

    async def run(url: str) -> None:
        found.append(await measure_link(url, pings=10, bulk_bytes=8 * 2**20))

    asyncio.run(_with_probe(run))
    prof = found[0]
    assert 0 < prof.rtt_min_s <= prof.rtt_s < 0.05  # loopback through two event loops
    assert prof.latency_s == pytest.approx(prof.rtt_s / 2)
    assert prof.bytes_per_s > 50e6  # loopback moves hundreds of MB/s even on a busy machine
    assert prof.hop_s(32768) == pytest.approx(prof.latency_s + 32768 / prof.bytes_per_s)
    assert prof.to_json()["format"] == "prima-link-profile/1"


def test_frames_outside_the_protocol_close_the_probe_with_a_reason() -> None:
    async def run(url: str) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(url) as ws:  # the protocol itself, by hand
                await ws.send_bytes(bytes([PING, 7, 7]))
                assert (await ws.receive_bytes(timeout=5)) == bytes([PING, 7, 7])
                await ws.send_bytes(bytes([BULK]) + b"x" * 999)
                assert struct.unpack("<BQ", await ws.receive_bytes(timeout=5)) == (ACK, 1000)
                await ws.send_bytes(bytes([9, 1]))
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert msg.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA
                assert "unknown frame kind 9" in msg.extra
            async with s.ws_connect(url) as ws:
                await ws.send_str("hello")
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE and "only PING and BULK" in msg.extra
            # the probe still serves after both
            prof = await measure_link(url, session=s, pings=3, bulk_bytes=2**20,
                                      bulk_repeats=1)
            assert prof.bytes_per_s > 0

    asyncio.run(_with_probe(run))


def test_an_unreachable_node_is_a_connection_error_naming_it() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/api/link"
    with pytest.raises(ConnectionError, match=f"cannot open the link probe at {url}"):
        asyncio.run(measure_link(url, timeout_s=5))


def test_an_endpoint_that_is_not_the_probe_is_refused_clearly() -> None:
    async def echo_text(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            await ws.send_str("not a probe")
        return ws

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/api/link", echo_text)
        async with serving(app) as port:
            with pytest.raises(ConnectionError, match="not the probe protocol"):
                await measure_link(f"ws://127.0.0.1:{port}/api/link", timeout_s=5)

    asyncio.run(run())


def test_a_silent_peer_is_a_connection_error_not_a_hang() -> None:
    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass  # reads, never answers
        return ws

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/api/link", silent)
        async with serving(app) as port:
            with pytest.raises(ConnectionError, match=r"did not answer within 0\.5 s"):
                await measure_link(f"ws://127.0.0.1:{port}/api/link", timeout_s=0.5)

    asyncio.run(run())
    with pytest.raises(ValueError, match="at least one ping"):
        asyncio.run(measure_link("ws://127.0.0.1:1/api/link", pings=0))


def test_an_open_probe_does_not_hold_up_the_node_stopping() -> None:
    async def run() -> float:
        app = web.Application()
        add_probe_route(app)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"ws://127.0.0.1:{port}/api/link")  # opened, left idle
            t0 = time.perf_counter()
            await runner.cleanup()
            took = time.perf_counter() - t0
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            await ws.close()
        return took

    assert asyncio.run(run()) < 5


def test_node_addresses_become_probe_urls() -> None:
    assert link_url("10.0.0.5:8080") == "ws://10.0.0.5:8080/api/link"
    assert link_url("https://nuc.local:8443") == "wss://nuc.local:8443/api/link"
    assert link_url("ws://h:1/custom") == "ws://h:1/custom"
    with pytest.raises(ValueError, match="not a node address"):
        link_url("ftp://x:1")


def test_the_command_reports_an_unreachable_node_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["link", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prima-node: error: cannot open the link probe") and err.count("\n") == 1


