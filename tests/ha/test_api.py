"""The head's client: server-sent events as the protocol allows them, and answers cut short.

The head sends one ``data:`` line per event; the protocol also allows an event spread over
several lines, which a proxy in front of the head may produce. A small SSE server stands in
for that (and for a head that dies mid-answer); the rest runs against the real head.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from conftest import head_url
from homeassistant.core import HomeAssistant
from loopback import serving
from server_process import ServerProcess

from custom_components.prima.api import (
    PrimaAuthError,
    PrimaClient,
    PrimaConnectionError,
    PrimaResponseError,
)


def _sse_app(body: bytes) -> web.Application:
    """An HTTP server whose chat completions stream ``body`` as it is."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


async def _collect(url: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as session:
        return [c async for c in PrimaClient(session, url).chat_stream({"messages": []})]


@pytest.mark.parametrize(("body", "expected"), [
    # one event over two data lines (joined with a newline: JSON allows it between tokens)
    (b'data: {"id": "a",\ndata:  "n": 1}\n\ndata: [DONE]\n\n', [{"id": "a", "n": 1}]),
    # comments and other fields are skipped; CRLF line ends
    (b': keep-alive\r\nevent: chunk\r\ndata: {"n": 2}\r\n\r\ndata: [DONE]\r\n\r\n',
     [{"n": 2}]),
])
async def test_events_as_the_protocol_allows_them(hass: HomeAssistant, body: bytes,
                                                  expected: list[dict[str, object]]) -> None:
    async with serving(_sse_app(body)) as port:
        url = f"http://127.0.0.1:{port}"
        assert await _collect(url) == expected


async def test_an_answer_cut_short_is_an_error_not_a_shorter_answer(hass: HomeAssistant
                                                                    ) -> None:
    async with serving(_sse_app(b'data: {"n": 1}\n\n')) as port:
        with pytest.raises(PrimaConnectionError, match="stopped before its end"):
            await _collect(f"http://127.0.0.1:{port}")


@pytest.mark.parametrize(("code", "error"), [("node_failed", PrimaConnectionError),
                                             ("context_length_exceeded", PrimaResponseError)])
async def test_an_error_event_says_whether_a_retry_can_help(
        hass: HomeAssistant, code: str, error: type[Exception]) -> None:
    body = (b'data: {"n": 1}\n\ndata: {"error": {"message": "node w1 went away", "code": "'
            + code.encode() + b'"}}\n\n')
    async with serving(_sse_app(body)) as port:
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(error, match="went away"):
            await _collect(url)


async def test_the_real_head_streams_an_answer_to_its_end(hass: HomeAssistant,
                                                         head: ServerProcess) -> None:
    async with aiohttp.ClientSession() as session:
        client = PrimaClient(session, head_url(head) + "/v1/", head.api_key)
        chunks = [c async for c in client.chat_stream({
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
        with pytest.raises(PrimaResponseError) as refused:
            await client.plan()  # a lone node has no ring to plan
        assert refused.value.status == 404
        with pytest.raises(PrimaAuthError):
            await PrimaClient(session, head_url(head), "wrong").status()
