"""The head's aiohttp application: routes, API-key check, errors in OpenAI's shape.

Handlers never run model code: they parse and check the request here, then wait their turn and
hand the work to the runtime's model thread. A request is answered completely or with an error
naming what went wrong; a stream that fails part-way ends with an ``error`` event rather than
just stopping, which OpenAI's clients raise as an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from ..device.link import add_probe_route
from ..errors import ClusterError, NodeUnreachableError
from ..generate import Finished, Generator, ReasoningDelta, TextDelta, ToolCall
from . import prompting
from .config import ServerConfig
from .metrics import CONTENT_TYPE, ServerMetrics, ring_node_gauges
from .openapi import openapi_document
from .protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    parse_chat_request,
    parse_completion_request,
)
from .responses import Reply, sse
from .runtime import Runtime
from .status import LastRequest, Status, StatusHub, model_id

_LOG = logging.getLogger("prima.server")

#: Paths without the API key: the add-on watchdog's health check and the API description.
#: ``/cluster/ws`` admits nodes by the cluster secret's challenge-response, not the API key.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/cluster/ws"})
MAX_BODY_BYTES = 16 * 1024 * 1024


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RUNTIME = web.AppKey("runtime", Runtime)
STATUS = web.AppKey("status", Status)
HUB = web.AppKey("hub", StatusHub)
METRICS = web.AppKey("metrics", ServerMetrics)
CONFIG = web.AppKey("config", ServerConfig)
#: Plans the ring again on the model thread (``k`` forced or None); set on a cluster's head.
PLANNER: web.AppKey[Callable[[int | None], dict[str, Any]]] = web.AppKey("planner")


async def _nothing_to_measure() -> None:
    return None


@dataclass(frozen=True)
class ClusterHooks:
    """What a cluster's head adds to the API; a lone node has none of it."""

    handler: Handler  # /cluster/ws: the head's node admits the cluster's links there
    view: Callable[[], dict[str, Any]]  # the status document's ``cluster`` part
    plan: Callable[[int | None], dict[str, Any]]  # POST /api/plan, run on the model thread
    listeners: list[Callable[[], None]]  # told of joins and departures: the hub pushes then
    # work that must not stand between a user and an answer, once no request ran for
    # ``IDLE_S``: whether it is wanted, its slow part (event loop, the model free for
    # requests) and its quick part (model thread, holding the model's turn)
    idle_wanted: Callable[[], bool] = lambda: False
    idle_measure: Callable[[], Awaitable[None]] = _nothing_to_measure
    idle_work: Callable[[], None] = lambda: None


IDLE_S = 3.0  # no request for this long: the cluster is idle
IDLE_POLL_S = 1.0


async def _when_idle(runtime: Runtime, cluster: ClusterHooks) -> None:
    """Run the cluster's idle work whenever it wants to and the node is idle: the slow part
    beside any request that arrives meanwhile, the quick part between requests."""
    while True:
        await asyncio.sleep(IDLE_POLL_S)
        if not cluster.idle_wanted() or runtime.idle_for() < IDLE_S:
            continue
        try:
            await cluster.idle_measure()
            while cluster.idle_wanted() and not await runtime.when_idle(cluster.idle_work, 0):
                await asyncio.sleep(IDLE_POLL_S)
        except Exception:  # the work reports its own failures; keep serving
            _LOG.exception("the cluster's idle work failed")


def make_app(config: ServerConfig, open_generator: Callable[[], Generator] | None = None,
             cluster: ClusterHooks | None = None) -> web.Application:
    """The application; with ``open_generator`` the model loads once the server is up
    (model thread); ``cluster`` makes it a ring's head."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=MAX_BODY_BYTES)
    hub: StatusHub
    runtime = Runtime(queue_limit=config.queue_limit, slots=config.cache_slots,
                      on_change=lambda: hub.changed())
    status = Status(runtime, config.node_id, config.model_path, config.n_ctx, config.host,
                    config.port, cluster_view=cluster.view if cluster is not None else None,
                    name=config.name, gpu_off=config.gpu == "none")
    hub = StatusHub(status.document)
    metrics = _metrics(runtime)
    app[CONFIG], app[RUNTIME], app[STATUS], app[HUB], app[METRICS] = (
        config, runtime, status, hub, metrics)
    if cluster is not None:
        app[PLANNER] = cluster.plan
        cluster.listeners.append(hub.changed)  # Home Assistant learns of joins and departures
        for gauge in ring_node_gauges(cluster.view):
            metrics.registry.add(gauge)

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/api/events", api_events)
    add_probe_route(app)
    app.router.add_get("/cluster/ws", cluster.handler if cluster else _not_in_a_cluster)
    app.router.add_post("/api/plan", api_plan)
    app.router.add_get("/openapi.json", openapi)

    async def start_loading(app: web.Application) -> None:
        if open_generator is not None:
            _LOG.info("loading %s (context %d tokens)", config.model_path, config.n_ctx)
            app[_LOADER] = asyncio.create_task(runtime.load(open_generator))
        if cluster is not None:
            app[_IDLE] = asyncio.create_task(_when_idle(runtime, cluster))

    async def shutdown(app: web.Application) -> None:
        if _IDLE in app:
            app[_IDLE].cancel()
        hub.close()
        runtime.stop_accepting()  # queued requests get 503 instead of running
        runtime.cancel_all()

    async def cleanup(app: web.Application) -> None:
        loader = app.get(_LOADER)
        if loader is not None and not loader.done():
            runtime.state = "stopping"
            with contextlib.suppress(BaseException):
                await loader
        await runtime.close()

    app.on_startup.append(start_loading)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app


_LOADER = web.AppKey("loader", asyncio.Task)
_IDLE = web.AppKey("idle work", asyncio.Task)


def _metrics(runtime: Runtime) -> ServerMetrics:
    """The node's metrics, with gauges that read the runtime when scraped."""
    return ServerMetrics({
        "prima_queue_depth": ("Requests waiting for the model.", lambda: runtime.waiting),
        "prima_requests_running": ("Requests being generated.", lambda: runtime.running),
        "prima_kv_cache_tokens": ("Positions held in the KV cache slots.", runtime.kv_tokens),
        "prima_kv_cache_capacity_tokens": ("Positions the KV cache slots can hold.",
                                           runtime.kv_capacity),
        "prima_kv_cache_usage_ratio": ("Share of the KV cache slots' positions in use.",
                                       lambda: runtime.kv_tokens() / max(1, runtime.kv_capacity())),
        "prima_model_ready": ("1 when the model is loaded and answering.",
                              lambda: float(runtime.state == "ready")),
    })


# -- middleware -----------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error in OpenAI's shape, counted by endpoint and status."""
    metrics = request.app[METRICS]
    t0 = time.perf_counter()
    try:
        resp = await handler(request)
    except RequestError as exc:
        if exc.status == 429:
            metrics.rejected.inc()
        _LOG.info("%s %s refused (%d): %s", request.method, request.path, exc.status,
                  exc.message)
        resp = _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found" if exc.status == 404 else "invalid_request_error"
        message = {
            404: f"no such endpoint: {request.method} {request.path} (see /openapi.json)",
            405: f"{request.path} does not take {request.method} (see /openapi.json)",
            413: f"the request body is larger than {MAX_BODY_BYTES // (1 << 20)} MiB",
        }.get(exc.status, exc.text if exc.text and exc.text != exc.reason else exc.reason)
        if request.path == "/api/events" and exc.status == 400:
            message = "GET /api/events is a websocket: connect with a websocket client"
        resp = _error_response(RequestError(message, status=exc.status, type=kind,
                                            code=exc.reason.lower().replace(" ", "_")))
    except (asyncio.CancelledError, ConnectionResetError):
        metrics.requests.inc(endpoint=_endpoint(request), status="499")  # the client left
        raise
    except ClusterError as exc:
        _LOG.warning("%s %s failed: %s", request.method, request.path, exc)
        resp = _error_response(_node_failed(exc))
    except Exception as exc:
        _LOG.exception("%s %s failed", request.method, request.path)
        resp = _error_response(RequestError(f"internal error: {exc}", status=500,
                                            type="server_error", code="internal_error"))
    metrics.requests.inc(endpoint=_endpoint(request), status=str(resp.status))
    _LOG.debug("%s %s %d in %.1f ms", request.method, request.path, resp.status,
               1e3 * (time.perf_counter() - t0))
    if resp.status >= 400:
        request.app[STATUS].totals["errors"] += 1
    return resp


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[CONFIG].api_key
    if key and request.path not in PUBLIC_PATHS:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            what = "no API key was given" if not given else "the API key is not valid"
            raise RequestError(f"{what}: send the node's key as 'Authorization: Bearer KEY'",
                               status=401, code="invalid_api_key")
    return await handler(request)


def _node_failed(exc: ClusterError) -> RequestError:
    return RequestError(f"{exc}; no ring could go on without it: retry the request once the "
                        "node is back (the head takes it in again)", status=503,
                        type="server_error", code="node_failed")


def _error_response(exc: RequestError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def _endpoint(request: web.Request) -> str:
    route = request.match_info.route.resource
    return route.canonical if route is not None else "other"




async def api_plan(request: web.Request) -> web.Response:
    planner = request.app.get(PLANNER)
    if planner is None:
        await _not_in_a_cluster(request)
    body = await _json_body(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", code="invalid_body")
    unknown = sorted(set(body) - {"k"})
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: only 'k' may be given",
                           param=unknown[0], code="unknown_field")
    k = body.get("k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise RequestError("k must be a positive integer (the number of rounds) or null",
                           param="k", code="invalid_value")
    runtime = request.app[RUNTIME]
    assert planner is not None
    async with runtime.turn():
        try:
            view = await runtime.call(planner, k)
        except NodeUnreachableError as exc:
            raise RequestError(f"{exc}; try again shortly", status=503, type="server_error",
                               code="node_unreachable") from None
        except ClusterError as exc:
            raise RequestError(str(exc), status=409, type="invalid_request_error",
                               code="no_plan") from None
    request.app[HUB].changed()
    return web.json_response(view)


async def _not_in_a_cluster(request: web.Request) -> web.StreamResponse:
    raise RequestError("this node serves alone: start it with --cluster-secret to join a "
                       "cluster", status=404, type="not_found", code="not_a_cluster_node")


async def _json_body(request: web.Request) -> Any:
    # any Content-Type, as llama.cpp's server (curl -d sends form-urlencoded): the body decides
    try:
        raw = await request.read()
    except web.HTTPException:
        raise  # 413: too large
    except Exception as exc:  # e.g. a Content-Encoding the body does not have
        raise RequestError(f"the body cannot be read: {exc}", code="invalid_body") from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError("the body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise RequestError(f"the body is not valid JSON: {exc}", code="invalid_json") from None


# -- generation endpoints -------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_chat_request(await _json_body(request))
    return await _generate(request, req)


async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion_request(await _json_body(request))
    return await _generate(request, req)


async def _generate(request: web.Request, req: ChatRequest | CompletionRequest
                    ) -> web.StreamResponse:
    runtime, status, hub = request.app[RUNTIME], request.app[STATUS], request.app[HUB]
    metrics = request.app[METRICS]
    reply = Reply(model=model_id(request.app[CONFIG].model_path),
                  chat=isinstance(req, ChatRequest), include_usage=req.include_usage)
    async with runtime.turn() as job:
        hub.changed()
        metrics.queue_wait.observe(job.queue_wait_s)
        gen = runtime.require_ready()
        prepared = await runtime.call(prompting.start, runtime, gen, req, job.cancelled)
        status.totals["requests"] += 1
        events = runtime.stream(prepared.events,
                                on_finished=lambda fin: _record(request, fin, prepared.slot))
        if req.stream:
            resp = await _stream_answer(request, reply, events, job.cancel)
        else:
            fin = await _collect(reply, events)
            resp = web.json_response(reply.whole(fin)) if fin.finish_reason != "cancelled" \
                else _error_response(RequestError("the node stopped this answer (shutting "
                                                  "down)", status=503, type="server_error",
                                                  code="cancelled"))
    return resp


async def _collect(reply: Reply, events: Any) -> Finished:
    async for ev in events:
        if isinstance(ev, TextDelta):
            reply.text.append(ev.text)
        elif isinstance(ev, ReasoningDelta):
            reply.reasoning.append(ev.text)
        elif isinstance(ev, ToolCall):
            reply.calls.append(ev)
        elif isinstance(ev, Finished):
            return ev
    raise RuntimeError("the generation ended without finishing")


async def _stream_answer(request: web.Request, reply: Reply, events: Any,
                         cancel: Callable[[], None]) -> web.StreamResponse:
    """Server-sent events; a client that goes away stops the generation at its next token."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    fin: Finished | None = None
    try:
        first = reply.first_chunk()
        if first is not None:
            await resp.write(sse(first))
        async for ev in events:
            if isinstance(ev, TextDelta):
                await resp.write(sse(reply.text_chunk(ev.text)))
            elif isinstance(ev, ReasoningDelta):
                if reply.chat:  # a plain completion has no place for it
                    await resp.write(sse(reply.reasoning_chunk(ev.text)))
            elif isinstance(ev, ToolCall):
                await resp.write(sse(reply.call_chunk(ev)))
            elif isinstance(ev, Finished):
                fin = ev
        if fin is None or fin.finish_reason == "cancelled":
            raise RequestError("the node stopped this answer (shutting down)", status=503,
                               type="server_error", code="cancelled")
        for chunk in reply.final_chunks(fin):
            await resp.write(sse(chunk))
        await resp.write(sse("[DONE]"))
    except asyncio.CancelledError:
        cancel()  # the client went away: stop generating for nobody
        raise
    except ConnectionResetError:
        cancel()
        return resp
    except Exception as exc:  # headers are sent: the error travels as an event
        if isinstance(exc, ClusterError):
            _LOG.warning("a streamed answer failed part-way: %s", exc)
            exc = _node_failed(exc)
        elif not isinstance(exc, RequestError):
            _LOG.exception("a streamed answer failed part-way")
            exc = RequestError(f"the answer failed part-way: {exc}", status=500,
                               type="server_error", code="internal_error")
        with contextlib.suppress(ConnectionResetError):
            await resp.write(sse(exc.body()))
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


def _record(request: web.Request, fin: Finished, slot: str) -> None:
    t = fin.timings
    metrics, status = request.app[METRICS], request.app[STATUS]
    metrics.finished.inc(reason=fin.finish_reason)
    metrics.prompt_tokens.inc(t.prompt_tokens)
    metrics.completion_tokens.inc(t.completion_tokens)
    (metrics.prefix_hits if t.cached_tokens else metrics.prefix_misses).inc()
    metrics.prefix_tokens.inc(t.cached_tokens)
    metrics.prefill.observe(t.prefill_s)
    if t.completion_tokens:
        metrics.first_token.observe(t.first_token_s)
    if t.decode_steps:
        metrics.decode.observe(t.decode_s / t.decode_steps)
    status.totals["prompt_tokens"] += t.prompt_tokens
    status.totals["completion_tokens"] += t.completion_tokens
    decode_tps = 1e3 / t.decode_ms_per_token if t.decode_ms_per_token else 0.0
    status.last = LastRequest(
        at=time.time(), endpoint=request.path, finish_reason=fin.finish_reason,
        prompt_tokens=t.prompt_tokens, cached_tokens=t.cached_tokens,
        completion_tokens=t.completion_tokens,
        prefill_tokens_per_s=round(t.prefill_tokens_per_s, 2),
        decode_tokens_per_s=round(decode_tps, 2), first_token_s=round(t.first_token_s, 4))
    request.app[HUB].changed()
    _LOG.info("%s %s: prompt %d tokens (%d cached, %s) %.1f tokens/s | answer %d tokens "
              "%.1f ms/token | first token %.0f ms | %s", request.method, request.path,
              t.prompt_tokens, t.cached_tokens, slot, t.prefill_tokens_per_s,
              t.completion_tokens, t.decode_ms_per_token, 1e3 * t.first_token_s,
              fin.finish_reason)


# -- read-only endpoints --------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    """200 once the model answers, 503 while loading or after a failed load (the watchdog's)."""
    rt = request.app[RUNTIME]
    body: dict[str, Any] = {"status": "ok" if rt.state == "ready" else rt.state}
    if rt.error:
        body["error"] = rt.error
    return web.json_response(body, status=200 if rt.state == "ready" else 503)


async def models(request: web.Request) -> web.Response:
    config, runtime = request.app[CONFIG], request.app[RUNTIME]
    created = 0
    with contextlib.suppress(OSError):
        created = int(config.model_path.stat().st_mtime)
    return web.json_response({"object": "list", "data": [{
        "id": model_id(config.model_path), "object": "model", "created": created,
        "owned_by": "prima", "meta": {"state": runtime.state, **runtime.model_info}}]})


async def metrics_text(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render().encode(),
                        headers={"Content-Type": CONTENT_TYPE})


async def api_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATUS].document())


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def api_events(request: web.Request) -> web.StreamResponse:
    """A websocket: the status document now, then again whenever it changes."""
    hub = request.app[HUB]
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    queue = hub.subscribe()
    reader = asyncio.create_task(_drain(ws))
    try:
        await ws.send_json(hub.event())
        while not ws.closed:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            event = getter.result()
            if event is None:  # the server is stopping
                break
            await ws.send_json(event)
    except ConnectionResetError:
        pass
    finally:
        hub.unsubscribe(queue)
        reader.cancel()
        await ws.close()
    return ws


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends, so pings are answered and a close is seen."""
    async for msg in ws:
        if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            break
