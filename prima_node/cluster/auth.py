"""Admission to the cluster: challenge-response over the websocket, with the cluster secret.

The secret never crosses the wire. The accepting node sends a fresh random nonce; the
connecting node answers with its own nonce and an HMAC-SHA256 over both nonces, both node ids
and the connection's purpose; the accepting node checks it in constant time and proves that it
knows the secret too, with an HMAC over the same values in the other order. A recorded exchange
is worthless: the next connection gets a new nonce, and nonces seen recently are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp
from aiohttp import web

PROTOCOL = "prima-cluster/1"
PURPOSES = ("control", "ring", "probe")
CLOSE_AUTH = 4401  # application close code: authentication failed
HANDSHAKE_TIMEOUT_S = 10.0


class AuthError(ConnectionError):
    """The peer could not prove it holds the cluster secret (or broke the handshake)."""


@dataclass(frozen=True)
class Peer:
    node_id: str
    purpose: str
    name: str = ""


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\x1f".join((PROTOCOL, *parts)).encode(), hashlib.sha256).hexdigest()


def cluster_id(secret: bytes) -> str:
    """A public name for the cluster a secret defines: nodes advertise it so a head adopts
    only its own cluster's workers, and it reveals nothing of the secret."""
    return hmac.new(secret, b"prima-cluster-id", hashlib.sha256).hexdigest()[:16]


class NonceLog:
    """Client nonces seen in the last ``ttl_s`` seconds: a replayed answer is refused even if
    it were ever paired with the same challenge again."""

    def __init__(self, ttl_s: float = 600.0, limit: int = 10000) -> None:
        self.ttl_s, self.limit = ttl_s, limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def fresh(self, nonce: str) -> bool:
        now = time.monotonic()
        while self._seen and (len(self._seen) > self.limit
                              or next(iter(self._seen.values())) < now - self.ttl_s):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


async def _receive_json(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                        timeout: float, step: str) -> dict[str, object]:
    try:
        msg = await ws.receive(timeout=timeout)
    except TimeoutError:
        raise AuthError(f"no {step} within {timeout:g} s") from None
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise AuthError(f"expected the {step}, got a {msg.type.name} message")
    try:
        doc = msg.json()
    except RecursionError:  # a few kB of brackets: refused like any other broken message
        raise AuthError(f"the {step} is nested too deeply") from None
    except ValueError:
        raise AuthError(f"the {step} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("type") != step:
        raise AuthError(f"expected the {step}")
    return doc


async def accept(ws: web.WebSocketResponse, secret: bytes, node_id: str, nonces: NonceLog,
                 timeout: float = HANDSHAKE_TIMEOUT_S) -> Peer:
    """Admit the peer on a prepared websocket, or close it (code 4401) and raise AuthError.

    ``timeout`` is wall-clock time for the whole exchange: a receive timeout alone restarts
    on every ping and pong the peer sends, so a stranger that answers pings would hold the
    connection for as long as it likes."""
    challenge = secrets.token_hex(16)
    try:
        try:
            async with asyncio.timeout(timeout):
                await ws.send_json({"type": "challenge", "protocol": PROTOCOL,
                                    "node_id": node_id, "nonce": challenge})
                hello = await _receive_json(ws, timeout, "hello")
        except TimeoutError:
            raise AuthError(f"no hello within {timeout:g} s") from None
        peer_id, nonce, purpose, mac = (hello.get(k) for k in ("node_id", "nonce", "purpose",
                                                                "mac"))
        if not all(isinstance(v, str) and v for v in (peer_id, nonce, purpose, mac)):
            raise AuthError("the hello lacks node_id, nonce, purpose or mac")
        assert isinstance(peer_id, str) and isinstance(nonce, str)
        assert isinstance(purpose, str) and isinstance(mac, str)
        if purpose not in PURPOSES:
            raise AuthError(f"unknown purpose {purpose!r}")
        expected = _mac(secret, "client", challenge, nonce, peer_id, node_id, purpose)
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            raise AuthError(f"node {peer_id} does not know the cluster secret")
        if not nonces.fresh(nonce):
            raise AuthError(f"node {peer_id} replayed an earlier handshake")
        await ws.send_json({"type": "welcome", "mac": _mac(secret, "server", nonce, challenge,
                                                           node_id, peer_id, purpose)})
    except AuthError as exc:
        if not ws.closed:
            await ws.close(code=CLOSE_AUTH, message=str(exc).encode()[:120])
        raise
    except (ConnectionError, aiohttp.ClientError) as exc:
        raise AuthError(f"the handshake broke: {exc}") from None
    name = hello.get("name")
    return Peer(peer_id, purpose, name if isinstance(name, str) else "")


async def connect(session: aiohttp.ClientSession, url: str, secret: bytes, node_id: str,
                  purpose: str, *, name: str = "", timeout: float = HANDSHAKE_TIMEOUT_S,
                  max_msg_size: int = 64 * 2**20
                  ) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """Open ``url`` and prove the secret; returns the socket and the peer's node id.

    Raises AuthError if either side fails to prove it (the peer is not one of ours, or we are
    not one of its), ConnectionError if the peer cannot be reached.
    """
    try:
        # bounded: an address that swallows packets must not hold the caller for minutes
        ws = await asyncio.wait_for(session.ws_connect(
            url, max_msg_size=max_msg_size, heartbeat=2.0,
            timeout=aiohttp.ClientWSTimeout(ws_close=timeout)), timeout)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ConnectionError(f"cannot reach the node at {url}: {exc}") from None
    try:
        challenge = await _receive_json(ws, timeout, "challenge")
        peer_id, server_nonce = challenge.get("node_id"), challenge.get("nonce")
        if not isinstance(peer_id, str) or not isinstance(server_nonce, str):
            raise AuthError("the challenge lacks node_id or nonce")
        nonce = secrets.token_hex(16)
        await ws.send_json({"type": "hello", "node_id": node_id, "name": name, "nonce": nonce,
                            "purpose": purpose, "mac": _mac(secret, "client", server_nonce,
                                                             nonce, node_id, peer_id, purpose)})
        try:
            welcome = await _receive_json(ws, timeout, "welcome")
        except AuthError:
            reason = ws.close_code == CLOSE_AUTH and "the node refused our cluster secret"
            raise AuthError(reason or f"no welcome from {url}") from None
        expected = _mac(secret, "server", nonce, server_nonce, peer_id, node_id, purpose)
        mac = welcome.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(expected.encode(),
                                                                  mac.encode()):
            raise AuthError(f"the node at {url} ({peer_id}) does not know the cluster secret")
    except BaseException:
        await ws.close()
        raise
    return ws, peer_id
