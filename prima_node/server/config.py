"""What a node's HTTP listener is told at start: kept apart from the API application so that a
worker, which serves no API, never imports it (nor the text layer it pulls in: tokenizers,
templates, grammars)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrimaError

_LOG = logging.getLogger("prima.server")


@dataclass
class ServerConfig:
    model_path: Path
    n_ctx: int
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    queue_limit: int = 32
    cache_slots: int = 2
    node_id: str = "local"
    tls: ssl.SSLContext | None = None  # set: the listener speaks HTTPS (and wss)
    name: str = "node"  # what people see: Home Assistant's device, the plan, the logs
    gpu: str | None = None  # the GPU by ggml's name (None: the first, where layers go to one)
    gpu_layers: int | str = 0  # a lone node's first layers on the GPU: a number, all, auto


MAX_NAME = 64


def node_name(given: str | None, host: str) -> str:
    """The node's name: ``--name`` (or $PRIMA_NODE_NAME), else the host name. Three nodes on
    one box would otherwise all be called after it (and Home Assistant's devices ``vm``,
    ``vm_2``, ``vm_3``)."""
    name = (given if given is not None else os.environ.get("PRIMA_NODE_NAME") or host).strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise PrimaError(f"--name must be 1 to {MAX_NAME} printable characters, got {name!r}")
    return name


@contextlib.contextmanager
def claimed_state(state_dir: Path) -> Iterator[str]:
    """This node's id, with its state directory held for as long as the node runs.

    The id is the node's identity for the ring and for Home Assistant's device registry, so two
    nodes reading one directory would be one node to everybody: a head would take its own
    workers for itself. A second node on a held directory is refused, naming ``--state-dir``.
    The hold is a ``flock`` on the directory, which the kernel drops when the process ends,
    however it ends: no stale lock after a crash."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:  # a read-only home: an id of its own that lasts as long as the process
        _LOG.warning("cannot use the state directory %s (%s): this node gets a new id each start "
                     "(choose a writable one with --state-dir)", state_dir, exc.strerror or exc)
        yield uuid.uuid4().hex
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrimaError(
                f"another prima-node on this machine is using the state directory {state_dir} "
                f"(it holds the node's identity): give each node its own --state-dir") from None
        yield node_id(state_dir)
    finally:
        os.close(fd)


def node_id(state_dir: Path) -> str:
    """A stable id for this node, kept across restarts (Home Assistant's device identity)."""
    path = state_dir / "node-id"
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text:
            return text
    new = uuid.uuid4().hex
    try:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(new + "\n")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the id lasts as long as the process
    return new
