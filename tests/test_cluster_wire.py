"""The ring's wire formats on their own: activation frames and the admission handshake."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from loopback import serving

from prima_node.cluster.auth import AuthError, NonceLog, accept, connect
from prima_node.cluster.frames import (
    MAX_MARKS,
    MAX_SESSION,
    Frame,
    FrameError,
    decode,
    encode,
    max_frame_bytes,
)


def _frame() -> Frame:
    h = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    return Frame("conv-1", 3, 7, 1, 2, 40, h, [(0, 1234)])


def test_a_frame_round_trips_exactly_in_float32_and_closely_in_float16() -> None:
    f = _frame()
    back = decode(encode(f), 16)
    assert (back.session, back.epoch, back.step, back.round, back.n_rounds, back.pos0,
            back.marks) == ("conv-1", 3, 7, 1, 2, 40, [(0, 1234)])
    assert np.array_equal(back.hidden, f.hidden)
    half = decode(encode(f, "f16"), 16)
    np.testing.assert_allclose(half.hidden, f.hidden, rtol=1e-3, atol=1e-3)
    assert len(encode(f, "f16")) < len(encode(f))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:10], "shorter than the header"),
    (lambda b: b"XXXX" + b[4:], "not an activation frame"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "frame version 9"),
    (lambda b: b[:6] + bytes([7]) + b[7:], "unknown dtype"),
    (lambda b: b + b"\0", "header says"),
    (lambda b: b[:-4], "header says"),
])
def test_a_malformed_frame_is_refused_with_the_reason(mutate: object, message: str) -> None:
    data = encode(_frame())
    with pytest.raises(FrameError, match=message):
        decode(mutate(data), 16)  # type: ignore[operator]
    with pytest.raises(FrameError, match="16 wide, the model's are 32"):
        decode(data, 32)


def test_non_finite_states_and_impossible_headers_are_refused() -> None:
    f = _frame()
    f.hidden[1, 3] = np.nan
    with pytest.raises(FrameError, match="NaN"):
        decode(encode(f), 16)
    g = _frame()
    data = bytearray(encode(g))
    struct.pack_into("<H", data, 16, 5)  # round 5 of 2
    with pytest.raises(FrameError, match="impossible header"):
        decode(bytes(data), 16)
    data = bytearray(encode(g))
    data[7] = 0x80  # a flag this version does not know
    with pytest.raises(FrameError, match="unknown flags"):
        decode(bytes(data), 16)


def test_a_micro_batch_says_whether_more_of_its_round_follow() -> None:
    f = _frame()
    assert not decode(encode(f), 16).more
    f.more = True
    assert decode(encode(f), 16).more


def test_the_largest_frame_a_model_sends_fits_the_socket_limit_and_a_bigger_one_does_not(
        ) -> None:
    rng = np.random.default_rng(1)
    limit = max_frame_bytes(16, 8)
    full = Frame("s" * MAX_SESSION, 1, 1, 0, 1, 0, rng.standard_normal((8, 16)).astype(
        np.float32), [(0, 1)] * MAX_MARKS)
    assert len(encode(full)) == limit
    full.hidden = rng.standard_normal((9, 16)).astype(np.float32)
    assert len(encode(full)) > limit


async def _handshake(server_secret: bytes, client_secret: bytes, nonces: NonceLog
                     ) -> tuple[str | None, str | None]:
    """(what the server saw, what the client saw): a node id, or the error message."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            peer = await accept(ws, server_secret, "server-node", nonces)
            seen.append(peer.node_id + "/" + peer.purpose)
            await ws.close()
        except AuthError as exc:
            seen.append(f"error: {exc}")
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    client: str | None
    async with serving(app) as port, aiohttp.ClientSession() as s:
        try:
            ws, peer_id = await connect(s, f"ws://127.0.0.1:{port}/ws", client_secret,
                                        "client-node", "ring")
            client = peer_id
            await ws.close()
        except AuthError as exc:
            client = f"error: {exc}"
    return (seen[0] if seen else None), client


def test_the_handshake_admits_a_node_with_the_secret_and_refuses_others() -> None:
    nonces = NonceLog()
    assert asyncio.run(_handshake(b"s3cret-abc", b"s3cret-abc", nonces)) == (
        "client-node/ring", "server-node")
    server, client = asyncio.run(_handshake(b"s3cret-abc", b"wrong-secret", nonces))
    assert server == "error: node client-node does not know the cluster secret"
    assert client == "error: the node refused our cluster secret"


def test_a_reused_client_nonce_is_refused() -> None:
    log = NonceLog(ttl_s=60)
    assert log.fresh("abc") and not log.fresh("abc") and log.fresh("abd")
    short = NonceLog(ttl_s=60, limit=2)
    for n in ("a", "b", "c"):
        assert short.fresh(n)
    assert short.fresh("a")  # forgotten: the log keeps only the newest


def test_a_hello_with_a_non_ascii_mac_is_refused_not_a_crash() -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            await accept(ws, b"s3cret-abc", "server-node", NonceLog())
        except AuthError as exc:
            seen.append(str(exc))
        return ws

    async def run() -> int | None:
        app = web.Application()
        app.router.add_get("/ws", handler)
        async with serving(app) as port, aiohttp.ClientSession() as s, s.ws_connect(
                f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.receive_json(timeout=5)  # the challenge
            await ws.send_json({"type": "hello", "node_id": "x", "nonce": "n1",
                                "purpose": "ring", "mac": "é" * 64})
            await ws.receive(timeout=5)
            return ws.close_code

    assert asyncio.run(run()) == 4401
    assert seen == ["node x does not know the cluster secret"]


def test_the_evaluated_chunks_follow_the_cache_operations_and_the_plan() -> None:
    """What a new ring evaluates again: the forwards as they were evaluated, in their
    micro-batches; one a truncation cut short is kept whole and truncated after (evaluating
    only its first positions would cut it otherwise); nothing of a cleared session, nothing at
    all after another plan."""
    from prima_node.cluster.ring import CacheOp, EvaluatedChunks

    def seen(session: str) -> list[object]:
        return [e if isinstance(e, int) else (e.ids.tolist(), e.parts)
                for e in log.history(session)]

    log = EvaluatedChunks()
    log.follow(7)
    for chunk, parts in (([1, 2, 3, 4], [(0, 2), (2, 4)]), ([5, 6], [(0, 2)]), ([7], [(0, 1)])):
        log.add("s", np.array(chunk, dtype=np.int64), parts)
    log.add("t", np.array([9], dtype=np.int64), [(0, 1)])
    log.apply(CacheOp.TRUNCATE, "s", 5)
    assert seen("s") == [([1, 2, 3, 4], [(0, 2), (2, 4)]), ([5, 6], [(0, 2)]), 5]
    log.add("s", np.array([8], dtype=np.int64), [(0, 1)])
    log.apply(CacheOp.TRUNCATE, "s", 6)  # the truncation to 5 stays: the 6th is 8
    assert seen("s") == [([1, 2, 3, 4], [(0, 2), (2, 4)]), ([5, 6], [(0, 2)]), 5,
                         ([8], [(0, 1)])]
    log.apply(CacheOp.TRUNCATE, "s", 3)
    assert seen("s") == [([1, 2, 3, 4], [(0, 2), (2, 4)]), 3]
    log.apply(CacheOp.TRUNCATE, "s", 4)  # nothing beyond 3 is held: nothing changes
    assert seen("s") == [([1, 2, 3, 4], [(0, 2), (2, 4)]), 3]
    log.apply(CacheOp.CLEAR, "t")
    assert log.history("t") == []
    log.follow(7)
    assert len(log.history("s")) == 2
    log.follow(8)
    assert log.history("s") == []


def test_decode_steps_are_evaluated_again_as_one_pipelined_forward_in_their_own_parts(
        ) -> None:
    """Runs of forwards merge up to the largest forward, each keeping its micro-batches (so
    every window evaluates each decode token alone, as it did); a truncation ends a run."""
    from prima_node.cluster.ring import Evaluation, replay_batches

    def ev(ids: list[int], parts: list[tuple[int, int]]) -> Evaluation:
        return Evaluation(np.array(ids, dtype=np.int64), parts)

    history: list[Evaluation | int] = [ev([1, 2, 3], [(0, 2), (2, 3)]), ev([4], [(0, 1)]),
                                       ev([5], [(0, 1)]), 4, ev([6], [(0, 1)]),
                                       ev([7], [(0, 1)]), ev([8], [(0, 1)])]
    got = [e if isinstance(e, int) else (e.ids.tolist(), e.parts)
           for e in replay_batches(history, largest=4)]
    assert got == [([1, 2, 3, 4], [(0, 2), (2, 3), (3, 4)]), ([5], [(0, 1)]), 4,
                   ([6, 7, 8], [(0, 1), (1, 2), (2, 3)])]
