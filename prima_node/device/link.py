"""A ring hop's cost, measured over the same kind of connection the ring uses: a websocket.

Halda prices every hop as latency + activation bytes / throughput, so both are measured the way
activations will travel: binary websocket frames through aiohttp, TCP, the nodes' network
stacks and the event loops at both ends (which is what a hop really pays, not an ICMP ping).

The probe protocol is deliberately tiny. A binary frame whose first byte is ``PING`` comes back
unchanged (round-trip time); a frame whose first byte is ``BULK`` is answered with ``ACK`` and
the byte count once it has arrived (one-way throughput: the time to push N bytes and hear back,
minus one round trip). Anything else closes the probe with a reason.
"""

from __future__ import annotations

import asyncio
import statistics
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from aiohttp import web

PING, BULK, ACK = 0x01, 0x02, 0x03
MAX_FRAME = 4 * 2**20  # the probe's largest frame; bulk transfers are cut to this size
FORMAT = "prima-link-profile/1"


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a hop as measured; ``latency_s`` is half the median round trip."""

    url: str
    rtt_s: float  # median round trip of a small frame
    rtt_min_s: float
    latency_s: float
    bytes_per_s: float  # best of the bulk transfers
    pings: int
    bulk_bytes: int

    def hop_s(self, nbytes: int) -> float:
        """What sending ``nbytes`` over this hop costs, as the planner prices it."""
        return self.latency_s + nbytes / self.bytes_per_s

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


PROBES: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("link_probes")


def add_probe_route(app: web.Application, path: str = "/api/link") -> None:
    """Serve the probe at ``path``; open probes are closed when the application shuts down
    (an idle one would otherwise hold the shutdown until its peer goes away)."""
    app[PROBES] = set()

    async def close_probes(app: web.Application) -> None:
        open_probes: set[web.WebSocketResponse] = app[PROBES]
        for ws in list(open_probes):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node stopping")

    app.router.add_get(path, probe_handler)
    app.on_shutdown.append(close_probes)


async def probe_handler(request: web.Request) -> web.WebSocketResponse:
    """The far end of a link probe."""
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME + 16, heartbeat=30)
    await ws.prepare(request)
    probes: set[web.WebSocketResponse] = request.app.get(PROBES, set())
    probes.add(ws)
    try:
        await serve_probe(ws)
    finally:
        probes.discard(ws)
    return ws


async def serve_probe(ws: web.WebSocketResponse) -> None:
    """Answer the probe protocol on a prepared websocket until it closes."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
            await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                           message=b"link probe: only PING and BULK binary frames")
            break
        data: bytes = msg.data
        if data[0] == PING:
            await ws.send_bytes(data)
        elif data[0] == BULK:
            await ws.send_bytes(struct.pack("<BQ", ACK, len(data)))
        else:
            await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                           message=f"link probe: unknown frame kind {data[0]}".encode())
            break


async def measure_link(url: str, *, session: aiohttp.ClientSession | None = None,
                       headers: dict[str, str] | None = None, pings: int = 20,
                       ping_bytes: int = 64, bulk_bytes: int = 4 * 2**20, bulk_repeats: int = 3,
                       timeout_s: float = 10.0) -> LinkProfile:
    """Round-trip time and throughput to the probe at ``url`` (ws:// or wss://).

    Raises ``ConnectionError`` with the reason when the far end cannot be reached, goes silent
    for ``timeout_s`` or answers something that is not the probe protocol.
    """
    if pings < 1 or ping_bytes < 1 or bulk_bytes < 1 or bulk_repeats < 1:
        raise ValueError("a link measurement needs at least one ping and one bulk byte")
    own = session is None
    sess = session or aiohttp.ClientSession()
    try:
        try:
            ws = await asyncio.wait_for(
                sess.ws_connect(url, headers=headers, max_msg_size=MAX_FRAME + 16,
                                timeout=aiohttp.ClientWSTimeout(ws_close=timeout_s),
                                heartbeat=None), timeout_s)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot open the link probe at {url}: {exc}") from None
        async with ws:
            return await measure_over(ws, url, pings=pings, ping_bytes=ping_bytes,
                                      bulk_bytes=bulk_bytes, bulk_repeats=bulk_repeats,
                                      timeout_s=timeout_s)
    finally:
        if own:
            await sess.close()


async def measure_over(ws: aiohttp.ClientWebSocketResponse, url: str, *, pings: int = 20,
                       ping_bytes: int = 64, bulk_bytes: int = 4 * 2**20, bulk_repeats: int = 3,
                       timeout_s: float = 10.0) -> LinkProfile:
    """The measurement itself, on a websocket already open to a probe (the API's, or a
    cluster node's admitted one)."""
    async def exchange(frame: bytes) -> bytes:
        try:
            await ws.send_bytes(frame)
            msg = await ws.receive(timeout=timeout_s)
        except TimeoutError:
            raise ConnectionError(f"the link probe at {url} did not answer within "
                                  f"{timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionError(f"the link to {url} broke: {exc}") from None
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise ConnectionError(f"the link probe at {url} answered {msg.type.name} "
                                  f"({msg.data!r}), not the probe protocol")
        return bytes(msg.data)

    ping = bytes([PING]) + b"\0" * max(0, ping_bytes - 1)
    await exchange(ping)  # warm: the connection's buffers and both event loops
    rtts = []
    for _ in range(pings):
        t0 = time.perf_counter()
        if await exchange(ping) != ping:
            raise ConnectionError(f"the link probe at {url} did not echo a ping")
        rtts.append(time.perf_counter() - t0)
    rtt = statistics.median(rtts)
    best = 0.0
    chunk = bytes([BULK]) + b"\0" * (min(bulk_bytes, MAX_FRAME) - 1)
    for _ in range(bulk_repeats):
        t0 = time.perf_counter()
        sent = 0
        while sent < bulk_bytes:
            answer = await exchange(chunk)
            kind, got = struct.unpack("<BQ", answer[:9]) if len(answer) == 9 else (0, 0)
            if kind != ACK or got != len(chunk):
                raise ConnectionError(f"the link probe at {url} acknowledged {got} of "
                                      f"{len(chunk)} bytes")
            sent += len(chunk)
        elapsed = time.perf_counter() - t0
        # each chunk paid one round trip for its acknowledgement: take those out
        n_chunks = -(-bulk_bytes // len(chunk))
        transfer = max(elapsed - n_chunks * min(rtts), elapsed * 0.05)
        best = max(best, sent / transfer)
    return LinkProfile(url=url, rtt_s=rtt, rtt_min_s=min(rtts), latency_s=rtt / 2,
                       bytes_per_s=best, pings=pings, bulk_bytes=bulk_bytes)
