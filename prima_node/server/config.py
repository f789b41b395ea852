"""What a node's HTTP listener is told at start: kept apart from the API application so that a
worker, which serves no API, never imports it (nor the text layer it pulls in: tokenizers,
templates, grammars)."""

from __future__ import annotations

import contextlib
import os
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path


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


def node_id(state_dir: Path) -> str:
    """A stable id for this node, kept across restarts (Home Assistant's device identity)."""
    path = state_dir / "node-id"
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text:
            return text
    new = uuid.uuid4().hex
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(new + "\n")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the id lasts as long as the process
    return new
