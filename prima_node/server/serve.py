"""``prima-node serve``: the head's HTTP API on one machine (a cluster of one).

The server listens at once and loads the model in the background: ``/health`` says 503 until
the model answers, so a supervisor (the add-on's watchdog, systemd) can tell "loading" from
"dead". A model that fails to load leaves the server up, reporting why in ``/health`` and
``/api/status``, instead of a crash loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PrimaError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from aiohttp import web

    from ..cluster.head import ClusterHead, RingExecutor
    from ..cluster.node import ClusterNode, NodeConfig
    from .config import ServerConfig
    from .presence import Presence

_LOG = logging.getLogger("prima.server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, installed by "
                                    "scripts/setup)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 "
                   "lets Home Assistant and other devices reach it: set an API key then)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint "
                     "but /health and /openapi.json (also read from $PRIMA_API_KEY)")
    key.add_argument("--api-key-file", help="read the API key from this file (first line)")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    p.add_argument("--threads", type=int, default=None, help="default: every CPU allowed")
    p.add_argument("--queue-limit", type=int, default=32,
                   help="requests that may wait for the model; more are answered 429")
    p.add_argument("--cache-slots", type=int, default=2,
                   help="conversations whose KV cache is kept between requests (each may hold "
                   "up to --ctx positions)")
    p.add_argument("--state-dir", default=None,
                   help="where the node keeps its id (default $XDG_STATE_HOME/prima)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    c = p.add_argument_group("cluster", "several nodes running one model together (without "
                             "--cluster-secret the node serves alone)")
    secret = c.add_mutually_exclusive_group()
    secret.add_argument("--cluster-secret", help="shared by every node of the cluster; nodes "
                        "prove they know it without sending it (also $PRIMA_CLUSTER_SECRET)")
    secret.add_argument("--cluster-secret-file", help="read the cluster secret from this file")
    c.add_argument("--head", action="store_true",
                   help="this node is the head: it plans the ring and serves the API")
    c.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a worker node to include (repeat for each)")
    c.add_argument("--rounds", type=int, default=None, metavar="K",
                   help="force the number of rounds k (default: Halda chooses)")
    c.add_argument("--all-nodes", action="store_true",
                   help="every node takes part, even where Halda would leave it out")
    c.add_argument("--link-dtype", choices=["f32", "f16"], default="f32",
                   help="hidden states on the wire: f32 (exact) or f16 (half the bytes)")
    c.add_argument("--prefetch", choices=["on", "off"], default="on",
                   help="on: a node whose windows do not all fit in memory releases each after "
                   "use and reads the next ahead while the ring works elsewhere; off: leave "
                   "paging to the OS")
    p.add_argument("--no-discovery", action="store_true",
                   help="do not advertise this node over mDNS (_prima._tcp) nor look for "
                   "workers; --peer still works")
    t = p.add_argument_group("TLS", "HTTPS for the API and wss for the ring, with your own "
                             "certificates (every node of a cluster must use TLS alike)")
    t.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="this node's certificate (chain), for the names or IP addresses "
                   "it is reached at")
    t.add_argument("--tls-key", default=None, metavar="PEM", help="its private key (unencrypted)")
    t.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="the CA that signed the other nodes' certificates (default: the "
                   "system's CAs)")
    c.add_argument("--advertise", default=None, metavar="HOST",
                   help="the address other nodes reach this one at (default: --host, or the "
                   "host name when listening on every address)")


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise PrimaError(f"cannot read the API key file {args.api_key_file}: "
                             f"{exc.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise PrimaError(f"the API key file {args.api_key_file} is empty")
        return key
    given: str | None = args.api_key
    if given is None:
        given = os.environ.get("PRIMA_API_KEY")
    if given is not None and not given.strip():
        raise PrimaError("the API key is empty")
    return given.strip() if given else None


def _secret(args: argparse.Namespace) -> bytes | None:
    if args.cluster_secret_file:
        try:
            text = Path(args.cluster_secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PrimaError(f"cannot read the cluster secret file {args.cluster_secret_file}: "
                             f"{exc.strerror}") from None
    else:
        text = (args.cluster_secret or os.environ.get("PRIMA_CLUSTER_SECRET") or "").strip()
    if not text:
        if args.head or args.peer:
            raise PrimaError("--head and --peer need a cluster secret (--cluster-secret)")
        return None
    if len(text) < 8:
        raise PrimaError("the cluster secret must have at least 8 characters")
    return text.encode()


def _tls(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(what the listener presents, how peers are checked); (None, None) without TLS."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            raise PrimaError("--tls-ca needs --tls-cert and --tls-key (a TLS cluster is TLS "
                             "on every node)")
        return None, None
    if args.tls_cert is None or args.tls_key is None:
        raise PrimaError("TLS needs both --tls-cert and --tls-key")
    from ..cluster.tls import client_context, server_context

    return (server_context(Path(args.tls_cert), Path(args.tls_key)),
            client_context(Path(args.tls_ca) if args.tls_ca else None))


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "prima"


def cmd_serve(args: argparse.Namespace, model_path: Path) -> int:
    from ..model_file import ModelFile
    from .config import ServerConfig, node_id

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name, lo, hi in (("--ctx", 16, 1 << 20), ("--port", 0, 65535),
                         ("--queue-limit", 0, 1 << 16), ("--cache-slots", 1, 64)):
        value = getattr(args, name[2:].replace("-", "_"))
        if not lo <= value <= hi:
            raise PrimaError(f"{name} must be between {lo} and {hi}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise PrimaError("--threads must be at least 1")
    ModelFile.open(model_path).close()  # a wrong path or a broken file: say so now, not later
    config = ServerConfig(model_path=model_path, n_ctx=args.ctx, host=args.host, port=args.port,
                          api_key=_api_key(args), queue_limit=args.queue_limit,
                          cache_slots=args.cache_slots, node_id=node_id(_state_dir(args)))
    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        _LOG.warning("listening on %s without an API key: anyone on the network can use the "
                     "model (set --api-key or --api-key-file)", args.host)
    import socket

    from ..cluster.auth import cluster_id
    from .presence import Presence

    server_tls, client_tls = _tls(args)
    config.tls = server_tls
    secret = _secret(args)
    role = "standalone" if secret is None else "head" if args.head else "worker"
    presence = None if args.no_discovery else Presence(
        model_path, node_id=config.node_id, name=socket.gethostname(), role=role,
        host=args.host, cluster=None if secret is None else cluster_id(secret))
    if secret is None:
        return asyncio.run(_serve(config, args.threads, presence=presence))

    from ..cluster.node import NodeConfig

    if args.rounds is not None and args.rounds < 1:
        raise PrimaError("--rounds must be at least 1")
    node = NodeConfig(model_path=model_path, secret=secret, node_id=config.node_id,
                      name=socket.gethostname(), n_ctx=args.ctx, threads=args.threads,
                      profile_cache=Path(os.environ.get("PRIMA_PROFILE_CACHE")
                                         or Path.home() / ".cache" / "prima" / "profiles"),
                      link_dtype=args.link_dtype, prefetch=args.prefetch == "on",
                      tls_client=client_tls)
    advertise = args.advertise or (socket.gethostname() if args.host in ("0.0.0.0", "::")
                                   else args.host)
    if args.head:
        return asyncio.run(_serve(config, args.threads, node, args.peer, args.rounds,
                                  advertise, args.all_nodes, presence))
    return asyncio.run(_serve_worker(config, node, presence))


async def _serve(config: ServerConfig, threads: int | None, node_config: NodeConfig | None = None,
                 peers: Sequence[str] = (), rounds: int | None = None,
                 advertise: str = "127.0.0.1", all_nodes: bool = False,
                 presence: Presence | None = None) -> int:
    import threading

    from aiohttp import web

    from ..generate import Generator
    from .app import make_app

    loop = asyncio.get_running_loop()
    node: ClusterNode | None = None
    head: ClusterHead | None = None
    listening = threading.Event()  # the ring forms once the node's own address is known
    if node_config is not None:
        from ..cluster.head import ClusterHead
        from ..cluster.node import ClusterNode

        node = ClusterNode(node_config)
        head = ClusterHead(node, list(peers), "", rounds, all_nodes)

    def open_generator() -> Generator:
        if node is None:
            gen = Generator.open(config.model_path, threads=threads, n_ctx=config.n_ctx)
        else:
            from ..cluster.head import RingExecutor
            from ..text.chat_template import load_chat_template
            from ..text.tokenizer import Tokenizer

            assert head is not None
            node.open_model()
            listening.wait()
            _LOG.info("forming the ring with %d other node(s)", len(peers))
            asyncio.run_coroutine_threadsafe(head.setup(), loop).result()
            ring = RingExecutor(head, loop)
            rings.append(ring)
            gen = Generator(ring, Tokenizer.from_model_file(node.model.file),
                            load_chat_template(node.model.file))
        _LOG.info("warming up (first reads of the weights, the compute buffer)")
        gen.executor.warm_up()
        return gen

    rings: list[RingExecutor] = []

    def planner(k: int | None) -> dict[str, Any]:
        from ..errors import ClusterError

        if not rings:
            raise ClusterError("the ring is still forming")
        return rings[0].replan_now(k)

    app = make_app(config, open_generator, node.handler if node is not None else None)
    if head is not None:
        from .app import HUB, PLANNER, STATUS

        app[PLANNER] = planner
        app[STATUS].cluster_view = head.view
        head.on_change = app[HUB].changed  # Home Assistant learns of joins and departures
        _ring_metrics(app, head)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = await _listen(runner, config)
    if node is not None and head is not None:
        node.client = node.new_client()
        head.members[0].address = f"{advertise}:{port}"
    listening.set()
    from .app import STATUS

    app[STATUS].port = port
    host = f"[{config.host}]" if ":" in config.host else config.host
    _LOG.info("listening on %s://%s:%d (OpenAI API at /v1, status at /api/status)",
              "https" if config.tls else "http", host, port)
    if presence is not None:
        if head is not None:
            presence.on_change = head.on_discovered
        presence.start(port)
    try:
        return await _until_stopped(runner)
    finally:
        if presence is not None:
            await presence.stop()
        if head is not None:
            await head.close()
        if node is not None:
            await node.stop()


async def _listen(runner: web.AppRunner, config: ServerConfig) -> int:
    from aiohttp import web

    site = web.TCPSite(runner, config.host, config.port, ssl_context=config.tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise PrimaError(f"cannot listen on {config.host}:{config.port}: "
                         f"{exc.strerror or exc}") from None
    port = config.port
    for sock in getattr(site._server, "sockets", None) or ():  # the port chosen for --port 0
        port = sock.getsockname()[1]
        break
    return int(port)


def _ring_metrics(app: web.Application, head: ClusterHead) -> None:
    """Per-node gauges on the head's /metrics, read from the cluster view when scraped."""
    from .app import METRICS
    from .metrics import LabelledGauge

    seen: list[Any] = [0.0, []]  # (when, nodes): one view per scrape, not one per gauge

    def nodes() -> list[dict[str, Any]]:
        now = time.monotonic()
        if now - seen[0] > 0.5:
            seen[:] = [now, head.view()["nodes"]]
        return list(seen[1])

    def per_node(read: Callable[[dict[str, Any]], float | None]
                 ) -> Callable[[], list[tuple[tuple[tuple[str, str], ...], float]]]:
        def values() -> list[tuple[tuple[tuple[str, str], ...], float]]:
            out: list[tuple[tuple[tuple[str, str], ...], float]] = []
            for n in nodes():
                v = read(n)
                if v is not None:
                    out.append(((("node", str(n["name"])), ("node_id", str(n["node_id"]))),
                                float(v)))
            return out
        return values

    def paging(key: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda n: (n.get("paging") or {}).get(key)

    registry = app[METRICS].registry
    for name, help, read in (
            ("prima_node_online", "1 while the node is connected to the head.",
             lambda n: float(n["online"])),
            ("prima_node_layers", "Layers the plan gives the node.",
             lambda n: n["layer_count"]),
            ("prima_node_compute_ms_per_token", "Measured compute per decoded token.",
             lambda n: n["measured_compute_ms"]),
            ("prima_node_prefetch_hit_ratio", "Window uses that found at least 99% of the "
             "window in memory (residency measured before each use).", paging("hit_rate")),
            ("prima_node_window_residency_ratio", "Mean share of a window in memory before "
             "its use.", paging("mean_residency")),
            ("prima_node_bytes_prefetched", "Bytes the node asked the OS to read ahead.",
             paging("bytes_prefetched")),
            ("prima_node_bytes_released", "Bytes the node dropped after use (streaming).",
             paging("bytes_released"))):
        registry.add(LabelledGauge(name, help, per_node(read)))


async def _serve_worker(config: ServerConfig, node_config: NodeConfig,
                        presence: Presence | None = None) -> int:
    """A worker: the admitted cluster endpoint and a health check, no API of its own."""
    from aiohttp import web

    from ..cluster.node import RING_PATH, ClusterNode

    node = ClusterNode(node_config)

    async def health(request: web.Request) -> web.Response:
        ready = node.model is not None
        return web.json_response({"status": "ok" if ready else "loading", "role": "worker",
                                  "node_id": node_config.node_id,
                                  "assignment": node.info()["assignment"] if ready else None},
                                 status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get(RING_PATH, node.handler)
    app.on_startup.append(node.start)
    app.on_shutdown.append(node.stop)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = await _listen(runner, config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    _LOG.info("listening on %s://%s:%d (cluster worker %s: waiting for the head)",
              "https" if config.tls else "http", host, port, node_config.node_id)
    if presence is not None:
        presence.start(port)
    try:
        return await _until_stopped(runner)
    finally:
        if presence is not None:
            await presence.stop()


async def _until_stopped(runner: web.AppRunner) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        _LOG.info("stopping")
        await runner.cleanup()
        _LOG.info("stopped")
    return 0
