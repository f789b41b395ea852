"""``prima-node demo``: a cluster of node processes on this machine, answering one chat request.

The product in one command: worker processes, then a head that admits them with a fresh
cluster secret, plans the ring with Halda and serves the OpenAI API. The demo prints the plan
(who holds which layers, rounds, predicted time per token), streams an answer to a chat prompt
through ``/v1/chat/completions``, prints each node's measured timings, and stops every node
(SIGTERM, as a supervisor would) at the end or on Ctrl-C. It talks to the nodes only through
their public HTTP API, like any client.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from .errors import PrimaError

_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 180.0  # a first start reads the model from a cold disk (slow on a Pi)


class DemoError(PrimaError):
    """The demo cluster could not be started or did not answer."""


class NodeProcess:
    """One ``prima-node serve`` child on 127.0.0.1 with a free port; its log is kept."""

    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "prima_node.cli", *argv],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.port: int | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            m = _LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()
        self._listening.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float) -> None:
        if not self._listening.wait(timeout) or self.port is None:
            raise DemoError(f"{self.name} did not start:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        return "\n".join(f"    | {line}" for line in self.lines[-n:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _get(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_ready(node: NodeProcess, timeout: float = START_TIMEOUT_S) -> None:
    """Until ``/health`` says the model (on a head: the planned ring) answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise DemoError(f"{node.name} exited ({node.proc.returncode}):\n{node.tail()}")
        try:
            status, body = _get(f"{node.url}/health", timeout=5)
        except (OSError, ValueError):
            status, body = 0, None
        if status == 200:
            return
        if isinstance(body, dict) and body.get("status") == "failed":
            raise DemoError(f"{node.name} failed: {body.get('error')}\n{node.tail()}")
        time.sleep(0.2)
    raise DemoError(f"{node.name} was not ready within {timeout:.0f} s:\n{node.tail()}")


def stream_chat(url: str, prompt: str, max_tokens: int) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed chat completion (server-sent events), sampled greedily: the
    demo shows the cluster answering, the same answer every time."""
    body = json.dumps({"model": "demo", "stream": True, "max_tokens": max_tokens,
                       "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise DemoError(f"the answer failed: {chunk['error'].get('message')}")
            yield chunk


def print_plan(doc: dict[str, Any], labels: dict[str, str], out: TextIO) -> None:
    cluster = doc["cluster"]
    plan = cluster.get("plan") or {}
    print(f"\nplan: k = {plan.get('k')} round(s) per token, ring "
          f"{' -> '.join(n['name'] for n in _ring(doc, labels))}, "
          f"predicted {plan.get('predicted_ms_per_token')} ms/token ({plan.get('bound')})",
          file=out)
    for n in _ring(doc, labels):
        windows = ", ".join(f"[{a}, {b})" for a, b in n.get("ranges") or [])
        print(f"  {n['name']:<10} {n['role']:<6} layers {windows or '-'}  "
              f"({n.get('layer_count')} held, {n.get('regime')})", file=out)
    for node_id, why in (plan.get("dropped") or {}).items():
        print(f"  left out: {node_id}: {why}", file=out)


def _ring(doc: dict[str, Any], labels: dict[str, str]) -> list[dict[str, Any]]:
    """The nodes in ring order, each named by ``labels`` (address -> the demo's name for the
    process: they all share this machine's host name)."""
    nodes = {n["node_id"]: n for n in doc["cluster"]["nodes"]}
    order = (doc["cluster"].get("plan") or {}).get("ring") or list(nodes)
    return [{**nodes[i], "name": labels.get(str(nodes[i].get("address")), nodes[i]["name"])}
            for i in order if i in nodes]


def print_timings(doc: dict[str, Any], labels: dict[str, str], out: TextIO) -> None:
    last = doc.get("last_request") or {}
    plan = doc["cluster"].get("plan") or {}
    print(f"\ntimings: {last.get('completion_tokens')} tokens, first token after "
          f"{last.get('first_token_s')} s, decode {last.get('decode_tokens_per_s')} tokens/s; "
          f"ring measured {plan.get('measured_ms_per_token')} ms/token against "
          f"{plan.get('predicted_ms_per_token')} predicted", file=out)
    for n in _ring(doc, labels):
        print(f"  {n['name']:<10} compute {n.get('measured_compute_ms')} ms/token "
              f"(predicted {n.get('predicted_compute_ms')})", file=out)


def run_demo(model: Path, *, nodes: int = 3, prompt: str, max_tokens: int, ctx: int = 2048,
             threads: int = 1, out: TextIO = sys.stdout) -> int:
    """Start the cluster, answer the prompt, stop everything; 0 on success."""
    if nodes < 1:
        raise DemoError("a cluster needs at least one node")
    if not model.is_file():
        raise DemoError(f"no model file at {model} (give --model a GGUF file, or leave it out "
                        "for the built-in demo model)")
    secret = secrets.token_hex(16)  # this run's cluster only
    started: list[NodeProcess] = []
    with tempfile.TemporaryDirectory(prefix="prima-demo-") as state:
        common = ["serve", "--model", str(model), "--port", "0", "--ctx", str(ctx),
                  "--threads", str(threads), "--no-discovery", "--cluster-secret", secret]
        try:
            print(f"starting {nodes} nodes on 127.0.0.1 with {model.name} "
                  f"({model.stat().st_size / 1e6:.0f} MB)", file=out, flush=True)
            for i in range(1, nodes):
                started.append(NodeProcess(f"worker{i}", [*common, "--state-dir",
                                                           f"{state}/worker{i}"]))
            for w in started:
                w.wait_listening(START_TIMEOUT_S)
                wait_ready(w)
            peers = [arg for w in started for arg in ("--peer", f"127.0.0.1:{w.port}")]
            head = NodeProcess("head", [*common, "--state-dir", f"{state}/head", "--head",
                                        "--all-nodes", *peers])
            started.insert(0, head)
            head.wait_listening(START_TIMEOUT_S)
            print(f"head at {head.url} (OpenAI API at {head.url}/v1); planning the ring",
                  file=out, flush=True)
            wait_ready(head)
            labels = {f"127.0.0.1:{n.port}": n.name for n in started}
            print_plan(_get(f"{head.url}/api/status")[1], labels, out)
            print(f"\n> {prompt}\n", file=out, flush=True)
            for chunk in stream_chat(head.url, prompt, max_tokens):
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        out.write(text)
                        out.flush()
            print("", file=out)
            print_timings(_get(f"{head.url}/api/status")[1], labels, out)
            return 0
        finally:
            print("\nstopping the nodes", file=out, flush=True)
            for node in started:  # the head first: it stops using the workers
                node.stop()
