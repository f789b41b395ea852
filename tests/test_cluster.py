"""The piped ring with real processes on loopback: workers are ``prima-node serve`` processes,
the head is either a ``prima-node serve --head`` process (through the OpenAI API) or, where the
test needs the logits themselves, the same head code run in this process."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
from aiohttp import web
from conftest import ModelFactory
from server_process import ServerProcess
from test_openapi import _check

from prima_node.cluster.auth import AuthError, connect
from prima_node.cluster.head import ClusterHead, RingExecutor
from prima_node.cluster.node import RING_PATH, ClusterNode, NodeConfig
from prima_node.engine.model import Model

pytestmark = pytest.mark.timeout(300)

SECRET = "loopback-cluster-secret"
CTX = 512


@pytest.fixture(scope="module")
def profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profiles")


def _node(model: Path, state: Path, cache: Path, *extra: str) -> ServerProcess:
    old = os.environ.get("PRIMA_PROFILE_CACHE")
    os.environ["PRIMA_PROFILE_CACHE"] = str(cache)  # one machine: measure once for all nodes
    try:
        srv = ServerProcess(model, state, ctx=CTX, extra=("--cluster-secret", SECRET, *extra))
        srv.start()
    finally:
        if old is None:
            os.environ.pop("PRIMA_PROFILE_CACHE", None)
        else:
            os.environ["PRIMA_PROFILE_CACHE"] = old
    return srv


@pytest.fixture(scope="module", params=[("llama", "Q8_0"), ("qwen2", "F16")],
                ids=["llama-small-Q8_0", "qwen2-small-F16"])
def cluster_model(request: pytest.FixtureRequest, make_model: ModelFactory) -> Path:
    arch, quant = request.param
    return make_model(arch, "small", quant)


@pytest.fixture(scope="module")
def workers(cluster_model: Path, tmp_path_factory: pytest.TempPathFactory,
            profile_cache: Path) -> Iterator[list[ServerProcess]]:
    nodes = [_node(cluster_model, tmp_path_factory.mktemp("worker"), profile_cache)
             for _ in range(2)]
    try:
        for n in nodes:
            n.wait_ready()
        yield nodes
    finally:
        for n in nodes:
            rc = n.stop()
            assert rc == 0, n.log()


class InProcessHead:
    """The head's code on an event loop in a thread of this process, listening on loopback."""

    def __init__(self, model: Path, peers: list[str], cache: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.node = ClusterNode(NodeConfig(model_path=model, secret=SECRET.encode(),
                                           node_id="test-head", name="test", n_ctx=CTX,
                                           threads=1, profile_cache=cache))
        self.node.open_model()
        self.runner: web.AppRunner | None = None
        port = self.call(self._listen())
        self.head = ClusterHead(self.node, peers, f"127.0.0.1:{port}", use_all=True)
        self.call(self.head.connect_peers())
        self.ring = RingExecutor(self.head, self.loop)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    async def _listen(self) -> int:
        self.node.client = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get(RING_PATH, self.node.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def plan(self, k: int) -> Any:
        p = self.call(self.head.make_plan(k))
        self.call(self.head.apply(p))
        return p

    def close(self) -> None:
        async def shut() -> None:
            await self.head.close()
            await self.node.stop()
            if self.runner is not None:
                await self.runner.cleanup()

        self.call(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.parametrize("k", [1, 2])
def test_ring_logits_equal_one_node(cluster_model: Path, workers: list[ServerProcess],
                                    profile_cache: Path, k: int) -> None:
    head = InProcessHead(cluster_model, [f"127.0.0.1:{w.port}" for w in workers], profile_cache)
    try:
        p = head.plan(k)
        assert p.k == k and len(p.ring) == 3  # every node holds layers
        held = sorted(i for d in p.devices for a, b in d.ranges for i in range(a, b))
        with Model.open(cluster_model, threads=1, n_ctx=CTX) as alone:
            assert held == list(range(alone.config.n_layer))
            rng = np.random.default_rng(k)
            prompt = rng.integers(0, alone.n_vocab, 40).tolist()
            want = alone.forward(prompt, session="s")
            got = head.ring.forward(prompt, session="s")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            # decode steps after the prompt, then a truncation every node applies
            for t in (5, 17):
                np.testing.assert_allclose(head.ring.forward([t], session="s"),
                                           alone.forward([t], session="s"), rtol=1e-5,
                                           atol=1e-5 * np.abs(want).max())
            head.ring.truncate("s", 20)
            alone.truncate("s", 20)
            np.testing.assert_allclose(head.ring.forward([9, 10], session="s"),
                                       alone.forward([9, 10], session="s"), rtol=1e-5,
                                       atol=1e-5 * np.abs(want).max())
            assert head.ring.n_cached("s") == 22
        # every node's compute time came back with the token
        assert sorted(i for i, _ in head.ring.last_marks) == [0, 1, 2]
    finally:
        head.close()


def test_a_head_process_answers_like_one_node(cluster_model: Path, workers: list[ServerProcess],
                                              profile_cache: Path,
                                              tmp_path: Path) -> None:
    peers = [arg for w in workers for arg in ("--peer", f"127.0.0.1:{w.port}")]
    head = _node(cluster_model, tmp_path / "head", profile_cache, "--head", "--rounds", "2",
                 "--all-nodes", *peers)
    alone = ServerProcess(cluster_model, tmp_path / "alone", ctx=CTX).start()
    try:
        head.wait_ready()
        alone.wait_ready()
        messages = [{"role": "user", "content": "Which lights are on in the kitchen?"}]
        answers = []
        for srv in (head, alone):
            with openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0,
                               timeout=120) as client:
                r = client.chat.completions.create(model="m", messages=messages,  # type: ignore[arg-type]
                                                   max_tokens=12, temperature=0)
                answers.append((r.choices[0].message.content, r.usage.completion_tokens
                                if r.usage else None))
        assert answers[0] == answers[1] and answers[0][1] == 12
        assert "plan: k=2, ring" in head.log()
        # the status document shows the ring: who holds what, predicted and measured times
        doc = head.status()
        _check("StatusDocument", doc)
        cluster = doc["cluster"]
        assert cluster["mode"] == "ring" and cluster["plan"]["k"] == 2
        assert [n["role"] for n in cluster["nodes"]] == ["head", "worker", "worker"]
        assert all(n["online"] and n["measured_compute_ms"] is not None
                   for n in cluster["nodes"])
        n_layer = doc["model"]["n_layers"]
        held = sorted(i for n in cluster["nodes"] for a, b in n["ranges"] for i in range(a, b))
        assert held == list(range(n_layer))
        assert cluster["plan"]["measured_ms_per_token"] > 0
        # plan again on demand, with one round
        status, raw = head.post("/api/plan", {"k": 1}, timeout=120)
        view = json.loads(raw)
        assert status == 200 and view["plan"]["k"] == 1, view
        _check("ClusterView", view)
        assert head.post("/api/plan", {"k": 0})[0] == 400
        assert head.post("/api/plan", {"rounds": 2})[0] == 400
        with openai.OpenAI(base_url=head.base_url, api_key="x", max_retries=0,
                           timeout=120) as client:
            r = client.chat.completions.create(model="m", messages=messages,  # type: ignore[arg-type]
                                               max_tokens=12, temperature=0)
        assert r.choices[0].message.content == answers[1][0]
    finally:
        assert head.stop() == 0, head.log()
        assert alone.stop() == 0


def test_a_wrong_secret_is_refused_on_both_sides(cluster_model: Path,
                                                 workers: list[ServerProcess]) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            url = f"ws://127.0.0.1:{workers[0].port}{RING_PATH}"
            with pytest.raises(AuthError, match="refused our cluster secret"):
                await connect(s, url, b"not-the-secret", "intruder", "control")

    before = workers[0].log().count("refused a cluster connection")
    asyncio.run(run())
    deadline = time.monotonic() + 5
    while workers[0].log().count("refused a cluster connection") == before:
        assert time.monotonic() < deadline, workers[0].log()
        time.sleep(0.05)
    assert "does not know the cluster secret" in workers[0].log()


def test_a_corrupt_frame_closes_that_link_and_the_node_lives_on(
        cluster_model: Path, workers: list[ServerProcess]) -> None:
    async def run() -> tuple[int | None, str]:
        async with aiohttp.ClientSession() as s:
            url = f"ws://127.0.0.1:{workers[1].port}{RING_PATH}"
            ws, _ = await connect(s, url, SECRET.encode(), "tester", "ring")
            await ws.send_bytes(b"PRMA" + bytes(40))  # a header that lies about its size
            msg = await ws.receive(timeout=10)
            return ws.close_code, str(msg.extra)

    code, reason = asyncio.run(run())
    assert code == aiohttp.WSCloseCode.UNSUPPORTED_DATA and "bad frame" in reason
    status, body = workers[1].get_json("/health", auth=False)
    assert status == 200 and body["role"] == "worker"
    deadline = time.monotonic() + 5  # the node logs just after closing: give it a moment
    while "closed the ring link from tester" not in workers[1].log():
        assert time.monotonic() < deadline, workers[1].log()
        time.sleep(0.05)


def test_a_worker_killed_mid_answer_ends_it_fast_and_the_ring_heals(
        make_model: ModelFactory, tmp_path: Path, profile_cache: Path) -> None:
    model = make_model("llama", "small", "Q8_0")
    a = _node(model, tmp_path / "a", profile_cache)
    b = _node(model, tmp_path / "b", profile_cache)
    head: ServerProcess | None = None
    try:
        a.wait_ready()
        b.wait_ready()
        peers = ["--peer", f"127.0.0.1:{a.port}", "--peer", f"127.0.0.1:{b.port}"]
        head = _node(model, tmp_path / "head", profile_cache, "--head", "--rounds", "2",
                     "--all-nodes", *peers)
        head.wait_ready()
        client = openai.OpenAI(base_url=head.base_url, api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Tell me a long story."}]

        def short() -> str | None:
            r = client.chat.completions.create(model="m", messages=messages,  # type: ignore[arg-type]
                                               max_tokens=6, temperature=0)
            assert r.choices[0].finish_reason == "length"
            return r.choices[0].message.content

        reference = short()  # greedy: every healthy ring must give exactly this
        stream = client.chat.completions.create(model="m", messages=messages,  # type: ignore[arg-type]
                                                max_tokens=2000, temperature=0, stream=True)
        killed_at = None
        with pytest.raises(openai.APIError) as err:
            for i, _ in enumerate(stream):
                if i == 3:
                    assert b.proc is not None
                    b.proc.kill()
                    killed_at = time.monotonic()
        assert killed_at is not None
        assert time.monotonic() - killed_at < 5, "the answer did not end within 5 s"
        assert "went away" in str(err.value) and "retry" in str(err.value)
        # the next request is answered by the ring without the dead node, from an empty cache
        assert short() == reference
        assert "planning again with 2 node(s)" in head.log()
        # the node comes back on its port: the head takes it in again
        assert b.proc is not None and b.proc.wait(10) is not None
        b2 = _node(model, tmp_path / "b", profile_cache, "--port", str(b.port))
        b = b2
        b.wait_ready()
        deadline = time.monotonic() + 20
        while head.log().count("joined with the same model") < 3:
            assert time.monotonic() < deadline, head.log()
            time.sleep(0.2)
        assert short() == reference
        assert "planning again with 3 node(s)" in head.log()
        client.close()
    finally:
        for srv in (head, a, b):
            if srv is not None and srv.proc is not None and srv.proc.poll() is None:
                assert srv.stop() == 0, srv.log()
