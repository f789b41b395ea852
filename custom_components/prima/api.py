"""The head node's HTTP and WebSocket API, as this integration uses it.

The integration never imports the node package: it speaks the head's documented API
(docs/api.md) over Home Assistant's shared aiohttp session. Errors are sorted into what the
caller must do about them: a refused key (reauthenticate), a head that cannot be reached or is
not ready (retry later), and a request the head refused (show its message).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from .const import CONNECT_TIMEOUT_S, GENERATE_TIMEOUT_S


class PrimaError(Exception):
    """Anything that went wrong talking to the head."""


class PrimaConnectionError(PrimaError):
    """The head cannot be reached, or is not ready (loading, stopping): try again later."""


class PrimaAuthError(PrimaError):
    """The head refused the API key."""


class PrimaResponseError(PrimaError):
    """The head answered with an error in OpenAI's shape; ``message`` says what to do."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


#: error codes of an answer that a retry may get through (the node was busy, loading, stopping,
#: or a ring node failed and the head plans again without it)
TRANSIENT_CODES = frozenset({"node_failed", "cancelled", "shutting_down", "model_loading",
                             "model_failed", "queue_full"})


def _chunk(event: str) -> dict[str, Any]:
    """One streamed chunk; an error event (in OpenAI's shape) raised as the error it is."""
    chunk = json.loads(event)
    if not isinstance(chunk, dict):
        raise ValueError(f"a streamed chunk that is not an object: {event[:80]}")
    err = chunk.get("error")
    if isinstance(err, dict):
        code = err.get("code") if isinstance(err.get("code"), str) else None
        message = str(err.get("message") or "the answer failed")
        if code in TRANSIENT_CODES:
            raise PrimaConnectionError(message)
        raise PrimaResponseError(200, code, message)
    return chunk


def normalize_url(url: str) -> str:
    """The head's base URL as stored: scheme and host[:port], no trailing slash or /v1."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if "://" not in url:
        url = f"http://{url}"
    return url


class PrimaClient:
    """One head node, at ``url``, with an optional API key."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_key: str | None = None
                 ) -> None:
        self.session = session
        self.url = normalize_url(url)
        self.api_key = api_key or None

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _error(self, resp: aiohttp.ClientResponse) -> PrimaError:
        """The exception for an error answer, with the head's own message."""
        code: str | None = None
        message = f"HTTP {resp.status}"
        try:
            body = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            code = err.get("code") if isinstance(err.get("code"), str) else None
            if isinstance(err.get("message"), str):
                message = err["message"]
        if resp.status == 401 or code == "invalid_api_key":
            return PrimaAuthError(message)
        if resp.status in (429, 502, 503, 504):
            return PrimaConnectionError(message)
        return PrimaResponseError(resp.status, code, message)

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       timeout: float = CONNECT_TIMEOUT_S) -> Any:
        try:
            async with self.session.request(
                    method, f"{self.url}{path}", json=json_body, headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status >= 400:
                    raise await self._error(resp)
                return await resp.json(content_type=None)
        except PrimaError:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PrimaConnectionError(f"cannot reach the head at {self.url}: "
                                       f"{exc or type(exc).__name__}") from exc

    async def status(self) -> dict[str, Any]:
        """The head's status document (``GET /api/status``)."""
        doc = await self._request("GET", "/api/status")
        if not isinstance(doc, dict) or "node_id" not in doc:
            raise PrimaResponseError(200, None, f"{self.url} is not a Prima node "
                                     "(its /api/status has no node_id)")
        return doc

    async def plan(self, k: int | None = None) -> dict[str, Any]:
        """Plan the ring again (``POST /api/plan``); the answer is the status's cluster part."""
        body = {} if k is None else {"k": k}
        result: dict[str, Any] = await self._request("POST", "/api/plan", json_body=body,
                                                     timeout=GENERATE_TIMEOUT_S)
        return result

    async def chat(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """One chat completion, whole (``stream`` false)."""
        result: dict[str, Any] = await self._request(
            "POST", "/v1/chat/completions", json_body={**payload, "stream": False},
            timeout=GENERATE_TIMEOUT_S)
        return result

    async def chat_stream(self, payload: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A streamed chat completion: its chunks as they arrive (server-sent events).

        An answer that stops without the closing ``[DONE]`` was cut off (the head or the link
        went away): that is an error, never a shorter answer."""
        try:
            async with self.session.post(
                    f"{self.url}/v1/chat/completions", json={**payload, "stream": True},
                    headers=self._headers,
                    # per read, not in total: a long answer on a slow ring may take minutes
                    timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S,
                                                  sock_read=GENERATE_TIMEOUT_S)) as resp:
                if resp.status >= 400:
                    raise await self._error(resp)
                data: list[str] = []
                async for raw in resp.content:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                        continue
                    if line or not data:  # other fields, comments; or no event yet
                        continue
                    event, data = "\n".join(data), []
                    if event == "[DONE]":
                        return
                    yield _chunk(event)
                if data and "\n".join(data) == "[DONE]":
                    return
                raise PrimaConnectionError(f"the answer from {self.url} stopped before its end")
        except PrimaError:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PrimaConnectionError(f"the answer from {self.url} broke off: "
                                       f"{exc or type(exc).__name__}") from exc

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Status documents pushed by the head (``/api/events``) until the socket closes."""
        try:
            async with self.session.ws_connect(
                    f"{self.url}/api/events", headers=self._headers, heartbeat=30,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CONNECT_TIMEOUT_S)) as ws:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    event = json.loads(msg.data)
                    if (isinstance(event, dict) and event.get("type") == "status"
                            and isinstance(event.get("data"), dict)
                            and isinstance(event["data"].get("node_id"), str)):
                        yield event["data"]
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise PrimaAuthError("the head refused the API key") from exc
            raise PrimaConnectionError(f"no event stream from {self.url}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, ValueError, asyncio.IncompleteReadError
                ) as exc:
            raise PrimaConnectionError(f"the event stream from {self.url} broke off: "
                                       f"{exc or type(exc).__name__}") from exc
