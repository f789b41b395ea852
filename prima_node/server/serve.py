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
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PrimaError

if TYPE_CHECKING:
    from .app import ServerConfig

_LOG = logging.getLogger("prima.server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file (default: the built-in demo model, random weights)")
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


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "prima"


def cmd_serve(args: argparse.Namespace, model_path: Path) -> int:
    from ..model_file import ModelFile
    from .app import ServerConfig
    from .status import node_id

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
    return asyncio.run(_serve(config, args.threads))


async def _serve(config: ServerConfig, threads: int | None) -> int:
    from aiohttp import web

    from ..generate import Generator
    from .app import make_app

    def open_generator() -> Generator:
        gen = Generator.open(config.model_path, threads=threads, n_ctx=config.n_ctx)
        _LOG.info("compiling kernels (the first start on a machine takes about a minute)")
        gen.executor.warm_up()
        return gen

    app = make_app(config, open_generator)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
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
    from .app import STATUS

    app[STATUS].port = port
    host = f"[{config.host}]" if ":" in config.host else config.host
    _LOG.info("listening on http://%s:%d (OpenAI API at /v1, status at /api/status)", host, port)
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
