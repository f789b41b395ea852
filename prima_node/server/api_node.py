"""A node that serves the OpenAI-compatible API: alone (the whole model on this machine) or as a
cluster's head (the model around the ring of nodes).

``run`` builds the node in one straight line, then serves it until it is stopped: the socket
first (so the head's own address is known to every part from the start), the cluster's parts
(this machine's ring node and the head), the API application (which loads the model in the
background once it listens: ``/health`` says 503 until the model answers, so a supervisor can
tell "loading" from "dead"; a model that fails to load leaves the server up, saying why), the
mDNS presence. A generator is opened on the model thread by ``open_local`` or ``open_ring``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from dataclasses import dataclass

from ..cluster.head import ClusterHead, HeadRingLink
from ..cluster.node import ClusterNode, NodeConfig
from ..cluster.ring import RingExecutor
from ..engine.model import DEFAULT_BATCH
from ..generate import Generator
from ..text.chat_template import load_chat_template
from ..text.tokenizer import Tokenizer
from . import lifecycle
from .app import ClusterHooks, make_app
from .config import ServerConfig
from .presence import Announcement, Presence

_LOG = logging.getLogger("prima.server")


@dataclass(frozen=True)
class HeadOptions:
    """How a head forms its ring."""

    node: NodeConfig
    peers: tuple[str, ...] = ()
    rounds: int | None = None  # force k rounds (None: Halda chooses)
    advertise: str = "127.0.0.1"  # the host the other nodes reach this one at
    all_nodes: bool = False  # give every node layers, even one that only slows the ring


def open_local(config: ServerConfig, threads: int | None) -> Generator:
    """The whole model on this machine (model thread)."""
    gen = Generator.open(config.model_path, threads=threads, n_ctx=config.n_ctx,
                         gpu=config.gpu, gpu_layers=config.gpu_layers)
    _LOG.info("warming up (first reads of the weights, the compute buffer)")
    gen.executor.warm_up()
    return gen


def open_ring(head: ClusterHead, link: HeadRingLink) -> Generator:
    """The first ring, planned and loaded, behind a generator (model thread)."""
    model = head.node.model
    assert model is not None  # the node opened it when it started
    _LOG.info("forming the ring with %d other node(s)", len(head.membership.peers))
    asyncio.run_coroutine_threadsafe(head.setup(), link.loop).result()
    ring = RingExecutor(model, link, DEFAULT_BATCH, pipeline=head.node.config.pipeline)
    ring.warm_up()
    return Generator(ring, Tokenizer.from_model_file(model.file),
                     load_chat_template(model.file))


async def run(config: ServerConfig, threads: int | None, announce: Announcement | None,
              head_options: HeadOptions | None = None) -> int:
    """Build the node, serve it until SIGINT or SIGTERM, stop it; the exit status."""
    sock = lifecycle.bind(config)
    port = lifecycle.port_of(sock)
    config = dataclasses.replace(config, port=port)
    node = head = None
    cluster = None
    if head_options is None:
        opener = functools.partial(open_local, config, threads)
    else:
        node = ClusterNode(head_options.node)
        await node.start()  # the model mapped and checked, the client session open
        head = ClusterHead(node, list(head_options.peers), f"{head_options.advertise}:{port}",
                           head_options.rounds, head_options.all_nodes)
        link = HeadRingLink(head, asyncio.get_running_loop())
        opener = functools.partial(open_ring, head, link)
        cluster = ClusterHooks(node.handler, head.view, link.plan_now,
                               head.membership.listeners, link.wants_idle_plan,
                               link.idle_measure, link.idle_plan)
    app = make_app(config, opener, cluster)
    presence = None if announce is None else Presence(
        config.model_path, announce, on_change=head.membership.on_discovered if head else None)
    runner = await lifecycle.serve(app, sock, config.tls)
    _LOG.info("listening on %s (OpenAI API at /v1, status at /api/status)",
              lifecycle.where(config, port))
    # the head first: it stops using the workers before this node's links go
    closers = [head.close, node.stop] if head is not None and node is not None else []
    return await lifecycle.announced_until_stopped(runner, presence, port, *closers)
