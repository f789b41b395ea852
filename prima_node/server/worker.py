"""A cluster's worker: the admitted ``/cluster/ws`` endpoint and a health check, no API.

It opens its model at start (mapped and checked, no layer read) and waits for a head to hand it
windows. It imports nothing of the API or of the text layer: a worker's memory is page cache
its weights can use.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..cluster.node import RING_PATH, ClusterNode, NodeConfig
from . import lifecycle
from .config import ServerConfig
from .presence import Announcement, Presence

_LOG = logging.getLogger("prima.server")


def health_handler(node: ClusterNode
                   ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``/health``: 503 until the model is open, then the node's place in the plan."""
    async def health(request: web.Request) -> web.StreamResponse:
        ready = node.model is not None
        return web.json_response({"status": "ok" if ready else "loading", "role": "worker",
                                  "node_id": node.config.node_id,
                                  "assignment": node.info()["assignment"] if ready else None},
                                 status=200 if ready else 503)
    return health


async def run(config: ServerConfig, node_config: NodeConfig, announce: Announcement | None
              ) -> int:
    """Build the worker, serve it until SIGINT or SIGTERM, stop it; the exit status."""
    sock = lifecycle.bind(config)
    port = lifecycle.port_of(sock)
    node = ClusterNode(node_config)
    app = web.Application()
    app.router.add_get("/health", health_handler(node))
    app.router.add_get(RING_PATH, node.handler)
    app.on_startup.append(node.start)
    app.on_shutdown.append(node.stop)
    presence = None if announce is None else Presence(node_config.model_path, announce)
    runner = await lifecycle.serve(app, sock, config.tls)
    _LOG.info("listening on %s (cluster worker %s: waiting for the head)",
              lifecycle.where(config, port), node_config.node_id)
    return await lifecycle.announced_until_stopped(runner, presence, port)
