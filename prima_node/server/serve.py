"""``prima-node serve``: its options, and which node they make.

A node without a cluster secret serves the OpenAI-compatible API with the whole model
(``api_node``); with one, it is a worker of a cluster (``worker``) or, with ``--head``, the
head that forms the ring and serves the API (``api_node`` again). This module checks the
options and builds the configuration; the node itself is built and run there.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import ssl
import sys
from pathlib import Path

from ..cli_text import add_gpu_args
from ..cluster.auth import cluster_id
from ..cluster.node import NodeConfig
from ..cluster.tls import client_context, server_context
from ..errors import PrimaError
from ..model_file import ModelFile
from .config import ServerConfig, claimed_state, node_name
from .presence import Announcement

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
    add_gpu_args(p)
    p.add_argument("--queue-limit", type=int, default=32,
                   help="requests that may wait for the model; more are answered 429")
    p.add_argument("--cache-slots", type=int, default=2,
                   help="conversations whose KV cache is kept between requests (each may hold "
                   "up to --ctx positions)")
    p.add_argument("--name", default=None,
                   help="the node's name in Home Assistant, the plan and the logs (also "
                   "$PRIMA_NODE_NAME; default: the host name)")
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
    c.add_argument("--prefill-pipeline", choices=["on", "off"], default="on",
                   help="on (head): a long prompt crosses the ring as micro-batches that follow "
                   "each other, so every node works at once; off: each chunk goes around "
                   "whole, one node at a time (to compare)")
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


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PrimaError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        lines = _read(args.api_key_file, "API key").splitlines()
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
        text = _read(args.cluster_secret_file, "cluster secret").strip()
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
    return (server_context(Path(args.tls_cert), Path(args.tls_key)),
            client_context(Path(args.tls_ca) if args.tls_ca else None))


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "prima"


def cmd_serve(args: argparse.Namespace, model_path: Path) -> int:
    """Check the options, build the node's configuration, run it as what the options say: a
    lone node, a cluster's head or a worker."""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    _check_ranges(args)
    ModelFile.open(model_path).close()  # a wrong path or a broken file: say so now, not later
    with claimed_state(_state_dir(args)) as node_id:
        return _serve(args, model_path, node_id)


def _serve(args: argparse.Namespace, model_path: Path, node_id: str) -> int:
    """Run the node the options describe, as ``node_id``, until it is stopped."""
    server_tls, client_tls = _tls(args)
    config = _server_config(args, model_path, server_tls, node_id)
    secret = _secret(args)
    role = "standalone" if secret is None else "head" if args.head else "worker"
    announce = None if args.no_discovery else Announcement(
        config.node_id, config.name, role, args.host,
        None if secret is None else cluster_id(secret))
    if secret is None:
        from . import api_node  # the API and the text layer: only where they run

        return asyncio.run(api_node.run(config, args.threads, announce))
    if args.gpu_layers != 0:
        _LOG.warning("--gpu-layers is for a node serving alone: in a ring the plan gives each "
                     "node its GPU layers (from the GPU its profile measured)")
    node = _node_config(args, model_path, config, secret, client_tls)
    if args.head:
        from . import api_node

        advertise = args.advertise or (socket.gethostname()
                                       if args.host in ("0.0.0.0", "::") else args.host)
        head = api_node.HeadOptions(node, tuple(args.peer), args.rounds, advertise,
                                    args.all_nodes)
        return asyncio.run(api_node.run(config, args.threads, announce, head))
    from . import worker  # no API, no text layer: a worker's memory is its weights' cache

    return asyncio.run(worker.run(config, node, announce))


def _check_ranges(args: argparse.Namespace) -> None:
    for name, lo, hi in (("--ctx", 16, 1 << 20), ("--port", 0, 65535),
                         ("--queue-limit", 0, 1 << 16), ("--cache-slots", 1, 64)):
        value = getattr(args, name[2:].replace("-", "_"))
        if not lo <= value <= hi:
            raise PrimaError(f"{name} must be between {lo} and {hi}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise PrimaError("--threads must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        raise PrimaError("--rounds must be at least 1")


def _server_config(args: argparse.Namespace, model_path: Path, tls: ssl.SSLContext | None,
                   node_id: str) -> ServerConfig:
    config = ServerConfig(model_path=model_path, n_ctx=args.ctx, host=args.host,
                          port=args.port, api_key=_api_key(args), queue_limit=args.queue_limit,
                          cache_slots=args.cache_slots, node_id=node_id,
                          tls=tls, name=node_name(args.name, socket.gethostname()),
                          gpu=args.gpu, gpu_layers=args.gpu_layers)
    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        _LOG.warning("listening on %s without an API key: anyone on the network can use the "
                     "model (set --api-key or --api-key-file)", args.host)
    return config


def _node_config(args: argparse.Namespace, model_path: Path, config: ServerConfig,
                 secret: bytes, tls: ssl.SSLContext | None) -> NodeConfig:
    return NodeConfig(model_path=model_path, secret=secret, node_id=config.node_id,
                      name=config.name, n_ctx=args.ctx, threads=args.threads,
                      profile_cache=Path(os.environ.get("PRIMA_PROFILE_CACHE")
                                         or Path.home() / ".cache" / "prima" / "profiles"),
                      link_dtype=args.link_dtype, prefetch=args.prefetch == "on",
                      pipeline=args.prefill_pipeline == "on",
                      tls_client=tls, gpu=args.gpu)
