"""Listening and stopping, the same for every kind of node.

A node binds its socket before it builds anything else, so that its address (the port a
``--port 0`` got) is known to every part that needs it from the start; it then serves until
SIGINT or SIGTERM and stops cleanly (answers in progress end with an error, not a hang).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import PrimaError
from .config import ServerConfig
from .presence import Presence

_LOG = logging.getLogger("prima.server")


def bind(config: ServerConfig) -> socket.socket:
    """The node's listening socket on ``config.host``:``config.port`` (0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise PrimaError(f"cannot listen on {config.host}:{config.port}: "
                         f"{exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


async def serve(app: web.Application, sock: socket.socket, tls: ssl.SSLContext | None
                ) -> web.AppRunner:
    """Start answering on the bound socket."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=tls)
    await site.start()
    return runner


async def announced_until_stopped(runner: web.AppRunner, presence: Presence | None, port: int,
                                  *after: Callable[[], Awaitable[None]]) -> int:
    """Announce the node on the network, serve until stopped, then say goodbye and close what
    ``after`` names, in that order; the exit status."""
    if presence is not None:
        presence.start(port)
    try:
        return await until_stopped(runner)
    finally:
        if presence is not None:
            await presence.stop()
        for close in after:
            await close()


async def until_stopped(runner: web.AppRunner) -> int:
    """Serve until SIGINT or SIGTERM, then stop the application; the exit status."""
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


def where(config: ServerConfig, port: int) -> str:
    """The listening address as a URL, for the log."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{'https' if config.tls else 'http'}://{host}:{port}"
