"""A real ``prima-node serve`` subprocess for end-to-end tests of the HTTP API.

The server's stderr is drained by a thread from the start, so a chatty log can never fill the
pipe and stall the server; every assertion about the server can quote the log collected so far.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_LISTENING = re.compile(r"listening on https?://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+)")


class ServerProcess:
    """One server on 127.0.0.1 with a free port; ``start()`` returns once it listens."""

    def __init__(self, model: Path, state_dir: Path, *, ctx: int = 2048,
                 api_key: str | None = None, queue_limit: int | None = None,
                 cache_slots: int | None = None, threads: int | None = 1,
                 extra: Sequence[str] = (), prefix: Sequence[str] = (),
                 url_host: str = "127.0.0.1", python: str = sys.executable) -> None:
        # one model thread by default: a tiny model gains nothing from two, and on a shared
        # machine a parallel kernel waits for its slowest (descheduled) thread at every step
        # prefix: e.g. ``ip netns exec NS`` to run the node in another network namespace;
        # url_host: where this process reaches it then; python: the node's interpreter (Home
        # Assistant's tests run on another one, without the node package)
        self.url_host = url_host
        self.scheme = "https" if "--tls-cert" in extra else "http"
        self.ssl_context: ssl.SSLContext | None = None  # how HTTPS answers are checked
        self.args = [*prefix, python, "-m", "prima_node.cli", "serve", "--model",
                     str(model), "--port", "0", "--ctx", str(ctx), "--state-dir", str(state_dir)]
        if threads is not None:
            self.args += ["--threads", str(threads)]
        if api_key is not None:
            self.args += ["--api-key", api_key]
        if queue_limit is not None:
            self.args += ["--queue-limit", str(queue_limit)]
        if cache_slots is not None:
            self.args += ["--cache-slots", str(cache_slots)]
        self.args += list(extra)
        self.api_key = api_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        #: (status, body) of every /health answer seen while waiting for the model.
        self.health_seen: list[tuple[int, dict[str, Any]]] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PRIMA_API_KEY", None)  # only the key given here counts
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self._reader = threading.Thread(target=self._drain, name="server-log", daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout):
            self.kill()
            raise AssertionError(f"the server did not start listening within {timeout} s:\n"
                                 f"{self.log()}")
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self._lines.append(line)
            m = _LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        """Poll ``/health`` from the first moment until it answers 200 (the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            status, body = self.get_json("/health", auth=False)
            self.health_seen.append((status, body))
            if status == 200:
                return self
            time.sleep(0.02)
        raise AssertionError(f"the model was not ready within {timeout} s; last /health "
                             f"answers {self.health_seen[-3:]}:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a supervisor stops it; the exit status (killed: an AssertionError)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the server did not stop within {timeout} s of SIGTERM:"
                                     f"\n{self.log()}") from None
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with status {self.proc.returncode}:\n"
                                 f"{self.log()}")

    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    # -- plain HTTP -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"{self.scheme}://{self.url_host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What OpenAI's clients take as ``base_url``."""
        return self.url + "/v1"

    def get(self, path: str, *, auth: bool = True, timeout: float = 10.0
            ) -> tuple[int, dict[str, str], bytes]:
        """A GET on a fresh connection: status, headers and body (errors included)."""
        req = urllib.request.Request(self.url + path)
        if auth and self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers), err.read()

    def get_json(self, path: str, *, auth: bool = True) -> tuple[int, Any]:
        status, _, body = self.get(path, auth=auth)
        return status, json.loads(body)

    def post(self, path: str, body: dict[str, Any], *, timeout: float = 60.0
             ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {'name{labels}': value}; the text must parse line by line."""
        status, _, body = self.get("/metrics")
        assert status == 200, (status, body)
        return parse_prometheus(body.decode())

    def status(self) -> dict[str, Any]:
        status, doc = self.get_json("/api/status")
        assert status == 200, (status, doc)
        return doc  # type: ignore[no-any-return]


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                     r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)?\})? '
                     r'(-?[0-9.eE+-]+|[+-]Inf|NaN)$')


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of Prometheus' text format (0.0.4); a line that is not one fails loudly."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out
