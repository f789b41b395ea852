"""The piped ring with real processes on loopback: workers are ``prima-node serve`` processes,
the head is either a ``prima-node serve --head`` process (through the OpenAI API) or, where the
test needs the logits themselves, the same head code run in this process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import numpy as np
import openai
import pytest
from aiohttp import web
from conftest import ModelFactory
from server_process import ServerProcess
from test_openapi import _check
from test_server import API_DOC

from prima_node.cluster.auth import AuthError, connect
from prima_node.cluster.head import ClusterHead, HeadRingLink
from prima_node.cluster.node import RING_PATH, ClusterNode, NodeConfig
from prima_node.cluster.ring import MIN_MICRO, RingExecutor, micro_batches
from prima_node.engine.model import DEFAULT_BATCH, Model
from prima_node.engine.weights import Repacker

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


@pytest.fixture(scope="module", params=[("llama", "Q8_0", 8), ("qwen2", "F16", None),
                                        ("qwen3moe", "F16", None),
                                        ("gpt-oss", "MXFP4_MOE", None)],
                ids=["llama-small-Q8_0-8-layers", "qwen2-small-F16", "qwen3moe-small-F16",
                     "gpt-oss-small-MXFP4_MOE"])
def cluster_model(request: pytest.FixtureRequest, make_model: ModelFactory) -> Path:
    """Four models; the first has 8 layers, so two rounds over three nodes give ragged
    windows (3 + 3 + 2 layers: two nodes' windows differ by a layer); the last two are
    mixtures of experts (windows of expert layers; gpt-oss's also alternate sliding-window
    layers, and its answers come in harmony's channels)."""
    arch, quant, layers = request.param
    return make_model(arch, "small", quant, layers=layers)


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
        self.call(self.head.membership.connect_peers())
        self.ring = RingExecutor(self.node.model, HeadRingLink(self.head, self.loop),
                                 DEFAULT_BATCH)

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
        self.call(self.head.replan(k))
        return self.head.plan

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
            sizes = {len({b - a for a, b in d.ranges}) for d in p.devices}
            assert (sizes == {1, 2}) == (alone.config.n_layer % (3 * k) != 0 and k > 1)
            rng = np.random.default_rng(k)
            prompt = rng.integers(0, alone.n_vocab, 40).tolist()
            want = alone.forward(prompt, session="s")
            got = head.ring.forward(prompt, session="s")
            # bit for bit: the same kernels on the same rows (the last layer on the last
            # token's row only, as one node computes it: ggml may multiply one row and
            # several with different kernels)
            np.testing.assert_array_equal(got, want)
            # decode steps after the prompt, then a truncation every node applies
            for t in (5, 17):
                np.testing.assert_array_equal(head.ring.forward([t], session="s"),
                                              alone.forward([t], session="s"))
            head.ring.truncate("s", 20)
            alone.truncate("s", 20)
            np.testing.assert_array_equal(head.ring.forward([9, 10], session="s"),
                                          alone.forward([9, 10], session="s"))
            assert head.ring.n_cached("s") == 22
        # every node's compute time in every round came back with the token
        assert sorted(i for i, _ in head.ring.last_marks) == sorted([0, 1, 2] * k)
        # the model fits: the head holds its windows resident, repacked where the CPU repacks
        # the file's types (as one node would), and counts the copies as free for the next plan
        model = head.node.model
        assert model is not None
        repacked = model.repacked_bytes
        packable = Repacker()
        try:
            wanted = any(packable.can_repack(t) for n, t in model.file.tensors.items()
                         if n.startswith("blk.") and len(t.shape) >= 2)
        finally:
            packable.close()
        assert (repacked > 0) == wanted
        mem = head.node.profile()["memory"]
        if mem["cgroup_available"] is None:
            assert mem["available"] == mem["os_available"] + repacked
    finally:
        head.close()


@pytest.mark.parametrize("k", [1, 2])
def test_a_pipelined_prefill_equals_its_micro_batches_one_after_another(
        cluster_model: Path, workers: list[ServerProcess], profile_cache: Path, k: int) -> None:
    """A long chunk crosses the ring as micro-batches that follow each other (every node
    busy at once): the logits are bit for bit those of the same micro-batches sent one at a
    time and waited for, and those of one node evaluating the same micro-batches (ggml's
    results depend on how a prompt is cut into batches, in llama.cpp as here: compare like
    with like); every position lands in every node's cache."""
    head = InProcessHead(cluster_model, [f"127.0.0.1:{w.port}" for w in workers], profile_cache)
    try:
        p = head.plan(k)
        assert len(p.ring) == 3
        n = 400
        parts = micro_batches(n, 3, DEFAULT_BATCH)
        assert len(parts) >= 3, parts  # a real pipeline
        with Model.open(cluster_model, threads=1, n_ctx=CTX) as alone:
            prompt = np.random.default_rng(k).integers(0, alone.n_vocab, n).tolist()
            pipelined = head.ring.forward(prompt, session="p")
            for a, b in parts:
                one_by_one = head.ring.forward(prompt[a:b], session="q")
            np.testing.assert_array_equal(pipelined, one_by_one)
            for a, b in parts:
                want = alone.forward(prompt[a:b], session="p")
            np.testing.assert_array_equal(pipelined, want)
            assert head.ring.n_cached("p") == head.ring.n_cached("q") == n
            # and the decode step after it, on every node's cache
            np.testing.assert_array_equal(head.ring.forward([7], session="p"),
                                          head.ring.forward([7], session="q"))
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
        # a prompt of one micro-batch: the ring evaluates it as one node does (a longer one
        # crosses it in micro-batches, whose results differ from one batch's in the last bits,
        # in llama.cpp alike: test_a_pipelined_prefill_equals_... compares like with like)
        prompt = np.random.default_rng(3).integers(3, 2000, MIN_MICRO // 2).tolist()
        answers, chats = [], []
        for srv in (head, alone):
            with openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0,
                               timeout=120) as client:
                c = client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                              temperature=0)
                answers.append((c.choices[0].text, c.usage.completion_tokens
                                if c.usage else None))
                r = client.chat.completions.create(model="m", messages=messages,  # type: ignore[arg-type]
                                                   max_tokens=12, temperature=0)
                chats.append((r.choices[0].message.content,
                              r.usage.completion_tokens if r.usage else None))
        assert answers[0] == answers[1] and answers[0][1] == 12
        assert chats[0][1] == chats[1][1] == 12  # a chat (micro-batches on the ring) too
        assert "plan: k=2, ring" in head.log()
        # the status document shows the ring: who holds what, predicted and measured times
        doc = head.status()
        _check("StatusDocument", doc)
        cluster = doc["cluster"]
        assert cluster["mode"] == "ring" and cluster["plan"]["k"] == 2
        assert [n["role"] for n in cluster["nodes"]] == ["head", "worker", "worker"]
        assert all(n["online"] and n["measured_compute_ms"] is not None
                   for n in cluster["nodes"])
        # the model fits: each node's windows stay resident, repacked where the CPU can
        assert all(isinstance(n["repacked_bytes"], int) and n["repacked_bytes"] >= 0
                   for n in cluster["nodes"])
        n_layer = doc["model"]["n_layers"]
        held = sorted(i for n in cluster["nodes"] for a, b in n["ranges"] for i in range(a, b))
        assert held == list(range(n_layer))
        assert cluster["plan"]["measured_ms_per_token"] > 0
        # every ordered pair of the three nodes, measured over loopback
        ids = {n["node_id"] for n in cluster["nodes"]}
        assert {(h["from"], h["to"]) for h in cluster["links"]} == {
            (x, y) for x in ids for y in ids if x != y}
        assert all(h["latency_ms"] > 0 and h["mbit_per_s"] > 0 for h in cluster["links"])
        # the workers' paging arrives with the head's next poll of them: the model fits, so
        # every node keeps its windows resident and releases nothing
        deadline = time.monotonic() + 10
        while any(n["paging"] is None for n in head.status()["cluster"]["nodes"]):
            assert time.monotonic() < deadline, head.status()["cluster"]["nodes"]
            time.sleep(0.2)
        nodes = head.status()["cluster"]["nodes"]
        assert all(n["paging"]["mode"] == "resident" and n["paging"]["releases"] == 0
                   and n["paging"]["held_bytes"] > 0 for n in nodes), nodes
        # each node's vital signs for dashboards: its memory now, its disk from its profile
        assert all(n["version"] == doc["version"] and n["disk_read_bytes_per_s"] > 0
                   and 0 < n["memory"]["available_bytes"] <= n["memory"]["total_bytes"]
                   for n in nodes), nodes
        metrics = head.metrics()
        online = {k: v for k, v in metrics.items() if k.startswith("prima_node_online{")}
        assert len(online) == 3 and set(online.values()) == {1.0}, online
        body = head.get("/metrics")[2].decode()
        per_node = dict(re.findall(r"^# TYPE (prima_node_\w+) (gauge)$", body, re.M))
        documented = dict(re.findall(r"^\| `(prima_node_\w+)` \| (gauge) \|",
                                     API_DOC.read_text(encoding="utf-8"), re.M))
        assert per_node == documented and per_node
        # plan again on demand, with one round
        status, raw = head.post("/api/plan", {"k": 1}, timeout=120)
        view = json.loads(raw)
        assert status == 200 and view["plan"]["k"] == 1, view
        _check("ClusterView", view)
        assert head.post("/api/plan", {"k": 0})[0] == 400
        assert head.post("/api/plan", {"rounds": 2})[0] == 400
        with openai.OpenAI(base_url=head.base_url, api_key="x", max_retries=0,
                           timeout=120) as client:
            c = client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                          temperature=0)
            r = client.chat.completions.create(model="m", messages=messages,  # type: ignore[arg-type]
                                               max_tokens=12, temperature=0)
        assert c.choices[0].text == answers[1][0]
        # the same three nodes cut the chat's prompt alike in every plan
        assert r.choices[0].message.content == chats[0][0]
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


class ProcessRing:
    """A head process (k = 2, every node used) and two worker processes a and b on a fresh
    small model, with an OpenAI client and a short greedy question to compare answers by."""

    MESSAGES: ClassVar[list[dict[str, str]]] = [
        {"role": "user", "content": "Tell me a long story."}]

    def __init__(self, make_model: ModelFactory, tmp_path: Path, cache: Path) -> None:
        self.model = make_model("llama", "small", "Q8_0")
        self.tmp_path, self.cache = tmp_path, cache
        self.a = _node(self.model, tmp_path / "a", cache)
        self.b = _node(self.model, tmp_path / "b", cache)
        self.head: ServerProcess | None = None
        self.client: openai.OpenAI | None = None

    def __enter__(self) -> ProcessRing:
        self.a.wait_ready()
        self.b.wait_ready()
        peers = ["--peer", f"127.0.0.1:{self.a.port}", "--peer", f"127.0.0.1:{self.b.port}"]
        self.head = _node(self.model, self.tmp_path / "head", self.cache, "--head", "--rounds",
                          "2", "--all-nodes", *peers)
        self.head.wait_ready()
        self.client = openai.OpenAI(base_url=self.head.base_url, api_key="x", max_retries=0,
                                    timeout=60)
        return self

    def short(self) -> str | None:
        assert self.client is not None
        r = self.client.chat.completions.create(
            model="m", messages=self.MESSAGES,  # type: ignore[arg-type]
            max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason == "length"
        return r.choices[0].message.content

    def stream(self, max_tokens: int = 2000) -> Any:
        assert self.client is not None
        return self.client.chat.completions.create(
            model="m", messages=self.MESSAGES,  # type: ignore[arg-type]
            max_tokens=max_tokens, temperature=0, stream=True)

    def streamed(self, kill: dict[int, ServerProcess] | None = None, max_tokens: int = 120
                 ) -> tuple[list[str], str | None]:
        """A greedy streamed answer's pieces and finish reason, killing (SIGKILL) the given
        node when the piece of that index arrives; ``gaps`` has the seconds between pieces
        after the first token (the pauses of the answer, not its prompt's evaluation)."""
        pieces: list[str] = []
        reason = None
        self.gaps: list[float] = []
        last = None
        for i, chunk in enumerate(self.stream(max_tokens)):
            now = time.monotonic()
            if last is not None:
                self.gaps.append(now - last)
            if i > 0:
                last = now
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
            victim = (kill or {}).get(i)
            if victim is not None:
                assert victim.proc is not None
                victim.proc.kill()
        return pieces, reason

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        for srv in (self.head, self.a, self.b):
            if srv is not None and srv.proc is not None and srv.proc.poll() is None:
                assert srv.stop() == 0, srv.log()


def _replayed_s(log: str) -> float:
    """The time the head's log says its last recovery spent evaluating positions again."""
    found = re.findall(r"evaluated \d+ position\(s\) again in ([\d.]+) s", log)
    assert found, log
    return float(found[-1])


def test_a_worker_killed_mid_answer_costs_a_pause_not_the_answer(
        make_model: ModelFactory, tmp_path: Path, profile_cache: Path) -> None:
    """Both workers killed, one after the other, in one streamed answer: the stream pauses
    (within 5 s plus the time to evaluate the conversation again) and goes on with exactly
    the undisturbed answer; the workers come back and the head takes them in again."""
    with ProcessRing(make_model, tmp_path, profile_cache) as ring:
        head = ring.head
        assert head is not None
        short = ring.short()
        reference, reason = ring.streamed()
        assert len(reference) > 60, "the answer is too short to kill a node in the middle"
        victims = {10: ring.b, 40: ring.a}
        text, got_reason = ring.streamed(victims)
        assert "".join(text) == "".join(reference) and got_reason == reason
        assert head.log().count("planning the ring again to go on with the answer") == 2
        assert "planning again with 2 node(s)" in head.log()
        assert "planning again with 1 node(s)" in head.log()
        assert max(ring.gaps) < 5.0 + _replayed_s(head.log()), ring.gaps
        # the nodes come back on their ports: the head takes them in again
        for name in ("a", "b"):
            old = getattr(ring, name)
            assert old.proc is not None and old.proc.wait(10) is not None
            setattr(ring, name, _node(ring.model, tmp_path / name, profile_cache, "--port",
                                      str(old.port)))
            getattr(ring, name).wait_ready()
        deadline = time.monotonic() + 20
        while head.log().count("joined with the same model") < 4:
            assert time.monotonic() < deadline, head.log()
            time.sleep(0.2)
        assert ring.short() == short
        assert "planning again with 3 node(s)" in head.log()


class FrozenThreads:
    """Every thread of a process but its main one (the event loop: it still answers pings and
    control requests) frozen by the cgroup-v1 freezer: a node that hangs in its model thread,
    as one stuck on a dying disk does."""

    ROOT = Path("/sys/fs/cgroup/freezer")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.group = self.ROOT / f"prima-test-{os.getpid()}-{pid}"

    def __enter__(self) -> FrozenThreads:
        assert self.ROOT.is_dir(), "this test needs the cgroup-v1 freezer (see env-notes.md)"
        self.group.mkdir()
        return self

    def freeze(self) -> None:
        tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task") if int(t) != self.pid]
        assert tids, "the node has no thread besides its event loop"
        for tid in tids:
            (self.group / "tasks").write_text(str(tid))
        (self.group / "freezer.state").write_text("FROZEN")

    def __exit__(self, *exc: object) -> None:
        (self.group / "freezer.state").write_text("THAWED")
        for tid in (self.group / "tasks").read_text().split():
            (self.ROOT / "tasks").write_text(tid)
        self.group.rmdir()


def test_a_worker_that_hangs_but_answers_pings_is_left_out_and_the_answer_goes_on(
        make_model: ModelFactory, tmp_path: Path, profile_cache: Path) -> None:
    with ProcessRing(make_model, tmp_path, profile_cache) as ring:
        head, b = ring.head, ring.b
        assert head is not None and b.proc is not None
        reference, reason = ring.streamed(max_tokens=40)
        ring.short()  # any new plan the measurements call for, made while b is well
        b_id = b.get_json("/health", auth=False)[1]["node_id"]
        time.sleep(0.5)  # b's model thread back to waiting for work, without the GIL
        with FrozenThreads(b.proc.pid) as hung:
            # frozen while idle: a thread frozen holding the GIL would stop the event loop too,
            # and that is a node whose pings stop (the killed-worker case)
            hung.freeze()
            text, got_reason = ring.streamed(max_tokens=40)
            assert "".join(text) == "".join(reference) and got_reason == reason
            log = head.log()
            assert re.search(f"node vm \\({b_id}\\) stalled the ring.*planning the ring "
                             "again to go on with the answer", log), log
            assert max(ring.gaps) < 5.0 + _replayed_s(log), ring.gaps
            assert b.get_json("/health", auth=False)[0] == 200  # its event loop lives on
            assert "planning again with 2 node(s)" in log


def test_a_round_that_does_not_come_back_names_the_hung_node_and_goes_on_without_it(
        make_model: ModelFactory, tmp_path: Path, profile_cache: Path) -> None:
    model = make_model("llama", "small", "Q8_0")
    a = _node(model, tmp_path / "a", profile_cache)
    b = _node(model, tmp_path / "b", profile_cache)
    head: InProcessHead | None = None
    try:
        a.wait_ready()
        b.wait_ready()
        head = InProcessHead(model, [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                             profile_cache)
        head.plan(2)
        b_id = b.get_json("/health", auth=False)[1]["node_id"]
        with Model.open(model, threads=1, n_ctx=CTX) as alone:
            prompt = [3, 1, 4, 1, 5]
            want = alone.logits([*prompt, 9])
            head.ring.forward(prompt, session="s")
            time.sleep(0.5)  # b's model thread idle again, without the GIL
            assert b.proc is not None
            with FrozenThreads(b.proc.pid) as hung:
                hung.freeze()
                t0 = time.monotonic()
                got = head.ring.forward([9], session="s")  # straight into a round: no KV op
                assert time.monotonic() - t0 < 5
                # the new ring holds the session's cache again and computed what one node does
                assert b_id not in head.head.plan.ring  # type: ignore[union-attr]
                assert head.ring.n_cached("s") == len(prompt) + 1
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
                more = head.ring.forward([2], session="s")
                want_more = alone.logits([*prompt, 9, 2])
                np.testing.assert_allclose(more, want_more, rtol=1e-5,
                                           atol=1e-5 * np.abs(want_more).max())
    finally:
        if head is not None:
            head.close()
        for srv in (a, b):
            if srv.proc is not None and srv.proc.poll() is None:
                assert srv.stop() == 0, srv.log()


@pytest.fixture
def multicast_netns() -> Iterator[tuple[str, str]]:
    """A network namespace where mDNS works (loopback with MULTICAST on), reached from here
    through a veth pair: (its name, its address)."""
    name, tag = f"prima-ct-{os.getpid()}", f"{os.getpid() % 250 + 1}"
    outer, inner = f"pct{os.getpid()}a", f"pct{os.getpid()}b"

    def ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        assert done.returncode == 0, (f"ip {' '.join(args)} failed (this test needs root and "
                                      f"iproute2): {done.stderr}")

    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "set", "lo", "multicast", "on")
        ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", name)
        ip("addr", "add", f"10.215.{tag}.1/24", "dev", outer)
        ip("link", "set", outer, "up")
        ip("-n", name, "addr", "add", f"10.215.{tag}.2/24", "dev", inner)
        ip("-n", name, "link", "set", inner, "up")
        yield name, f"10.215.{tag}.2"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes the veth


def test_the_head_adopts_workers_it_discovers_over_mdns_and_lists_the_others(
        make_model: ModelFactory, tmp_path: Path, profile_cache: Path,
        multicast_netns: tuple[str, str]) -> None:
    ns, address = multicast_netns
    model = make_model("llama", "small", "Q8_0")
    inside = ("ip", "netns", "exec", ns)

    def start(state: str, *extra: str, secret: str = SECRET) -> ServerProcess:
        srv = ServerProcess(model, tmp_path / state, ctx=CTX, prefix=inside, url_host=address,
                            extra=("--cluster-secret", secret, "--host", "0.0.0.0", *extra))
        os.environ["PRIMA_PROFILE_CACHE"] = str(profile_cache)
        try:
            return srv.start()
        finally:
            os.environ.pop("PRIMA_PROFILE_CACHE", None)

    nodes = [start("worker"), start("stranger", secret="another-cluster-secret")]
    try:
        for n in nodes:
            n.wait_ready()
        head = start("head", "--head", "--all-nodes")
        nodes.append(head)
        head.wait_ready()
        worker_id = nodes[0].get_json("/health", auth=False)[1]["node_id"]
        deadline = time.monotonic() + 30
        while "joined with the same model" not in head.log():
            assert time.monotonic() < deadline, head.log()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=head.base_url, api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="m", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content is not None
        client.close()
        cluster = head.status()["cluster"]
        assert len(cluster["plan"]["ring"]) == 2, cluster  # the head and the adopted worker
        seen = {d["role"] + "/" + str(d["adopted"]): d for d in cluster["discovered"]}
        assert set(seen) == {"worker/True", "worker/False"}, cluster["discovered"]
        assert seen["worker/True"]["node_id"] == worker_id in cluster["plan"]["ring"]
        assert "another cluster" in seen["worker/False"]["reason"]
    finally:
        for srv in nodes:
            if srv.proc is not None and srv.proc.poll() is None:
                assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A home cluster's own CA and a certificate for 127.0.0.1 it signed (openssl CLI), and a
    second CA that signed nothing of ours."""
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=d)
        assert done.returncode == 0, done.stderr

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=prima test {ca}")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=prima node")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.pem", "-days", "2", "-extfile", "san.ext")
    return {name: d / f"{name}" for name in ("ca.pem", "other-ca.pem", "node.pem", "node.key")}


def test_a_tls_cluster_answers_over_https_and_refuses_plain_or_unknown_peers(
        make_model: ModelFactory, tmp_path: Path, profile_cache: Path,
        tls_files: dict[str, Path]) -> None:
    import ssl

    model = make_model("llama", "small", "Q8_0")
    tls = ("--tls-cert", str(tls_files["node.pem"]), "--tls-key", str(tls_files["node.key"]),
           "--tls-ca", str(tls_files["ca.pem"]))
    trust = ssl.create_default_context(cafile=str(tls_files["ca.pem"]))
    workers = [_node(model, tmp_path / f"w{i}", profile_cache, *tls) for i in range(2)]
    nodes = list(workers)
    try:
        for w in workers:
            w.ssl_context = trust
            w.wait_ready()
        peers = [a for w in workers for a in ("--peer", f"127.0.0.1:{w.port}")]
        head = _node(model, tmp_path / "head", profile_cache, "--head", "--all-nodes", *peers,
                     *tls)
        nodes.append(head)
        head.ssl_context = trust
        head.wait_ready()
        assert head.base_url.startswith("https://")
        with openai.DefaultHttpxClient(verify=trust) as http:
            client = openai.OpenAI(base_url=head.base_url, api_key="x", max_retries=0,
                                   http_client=http)
            r = client.chat.completions.create(model="m", max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "Hi"}])
            assert r.choices[0].finish_reason == "length"
        assert len(head.status()["cluster"]["plan"]["ring"]) == 3

        async def attempt(url: str, ctx: ssl.SSLContext | None) -> str:
            connector = aiohttp.TCPConnector(ssl=ctx) if ctx is not None else None
            async with aiohttp.ClientSession(connector=connector) as s:
                try:
                    ws, _ = await connect(s, url, SECRET.encode(), "tester", "probe")
                except ConnectionError as exc:
                    return str(exc)
                await ws.close()
                return "admitted"

        target = f"127.0.0.1:{workers[0].port}{RING_PATH}"
        assert asyncio.run(attempt(f"wss://{target}", trust)) == "admitted"
        assert "cannot reach" in asyncio.run(attempt(f"ws://{target}", None))
        other = ssl.create_default_context(cafile=str(tls_files["other-ca.pem"]))
        assert "certificate verify failed" in asyncio.run(attempt(f"wss://{target}", other))
    finally:
        for srv in nodes:
            if srv.proc is not None and srv.proc.poll() is None:
                assert srv.stop() == 0, srv.log()


def test_one_worker_under_two_addresses_joins_once_and_a_second_head_is_refused(
        cluster_model: Path, workers: list[ServerProcess], profile_cache: Path) -> None:
    w0, w1 = (w.port for w in workers)
    # the same worker as 127.0.0.1 and as localhost (a --peer and an mDNS address, say)
    first = InProcessHead(cluster_model, [f"127.0.0.1:{w0}", f"localhost:{w0}",
                                          f"127.0.0.1:{w1}"], profile_cache)
    second: InProcessHead | None = None
    try:
        assert len(first.head.members) == 3, [m.address for m in first.head.members]
        assert first.head.membership.aliases == {
            f"localhost:{w0}": first.head.members[1].node_id}
        p = first.plan(2)
        assert len(set(p.ring)) == len(p.ring) == 3
        # another head of the same cluster cannot take the workers over while this one lives
        second = InProcessHead(cluster_model, [f"127.0.0.1:{w0}"], profile_cache)
        assert len(second.head.members) == 1
        assert "another head controls this node" in workers[0].log()
    finally:
        for h in (second, first):
            if h is not None:
                h.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_two_node_ring_of_the_tiny_preset_gives_one_node_s_logits(
        arch: str, make_model: ModelFactory, tmp_path: Path, profile_cache: Path) -> None:
    model = make_model(arch, "tiny", "Q8_0")  # two layers: one per node
    worker = _node(model, tmp_path / "w", profile_cache)
    head: InProcessHead | None = None
    try:
        worker.wait_ready()
        head = InProcessHead(model, [f"127.0.0.1:{worker.port}"], profile_cache)
        p = head.plan(1)
        assert [d.layers for d in p.devices] == [1, 1]
        with Model.open(model, threads=1, n_ctx=CTX) as alone:
            prompt = np.random.default_rng(5).integers(0, alone.n_vocab, 30).tolist()
            want = alone.forward(prompt, session="s")
            got = head.ring.forward(prompt, session="s")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            np.testing.assert_allclose(head.ring.forward([7], session="s"),
                                       alone.forward([7], session="s"), rtol=1e-5,
                                       atol=1e-5 * np.abs(want).max())
    finally:
        if head is not None:
            head.close()
        assert worker.stop() == 0, worker.log()


def test_a_long_prompt_evaluated_again_after_a_kill_is_cut_as_it_was_the_first_time(
        make_model: ModelFactory, tmp_path: Path, profile_cache: Path) -> None:
    """A prompt long enough to cross the ring in micro-batches, then decode steps; both
    workers die. The head alone would cut the prompt into other micro-batches, and ggml's
    results depend on the cut: the cache must be evaluated again in the cuts it was first
    evaluated in, so that the next step's logits are bit for bit the undisturbed ones (a
    greedy answer then goes on unchanged, whatever the prompt's length)."""
    model = make_model("llama", "small", "Q8_0", layers=8)
    nodes = [_node(model, tmp_path / f"w{i}", profile_cache) for i in range(2)]
    head: InProcessHead | None = None
    try:
        for n in nodes:
            n.wait_ready()
        head = InProcessHead(model, [f"127.0.0.1:{n.port}" for n in nodes], profile_cache)
        assert len(head.plan(1).ring) == 3
        n_prompt = 300
        assert micro_batches(n_prompt, 3, DEFAULT_BATCH) != micro_batches(n_prompt, 1,
                                                                          DEFAULT_BATCH)
        prompt = np.random.default_rng(11).integers(0, 1000, n_prompt).tolist()
        steps = [5, 9, 13, 17]
        for session in ("undisturbed", "killed"):
            head.ring.forward(prompt, session=session)
            for t in steps:
                head.ring.forward([t], session=session)
        want = head.ring.forward([21], session="undisturbed")
        for victim in nodes:
            assert victim.proc is not None
            victim.proc.kill()
            victim.proc.wait(10)
        got = head.ring.forward([21], session="killed")  # the head alone, evaluating again
        assert len(head.head.plan.ring) == 1
        np.testing.assert_array_equal(got, want)
        assert head.ring.n_cached("killed") == n_prompt + len(steps) + 1
    finally:
        if head is not None:
            head.close()
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                assert n.stop() == 0, n.log()


def _spoil_profiles(cache: Path, factor: float = 50.0) -> dict[Path, dict[str, float]]:
    """Divide the cached profiles' decode speeds by ``factor`` (a profile "measured" while
    something else ran); the real speeds, per file."""
    cached = sorted(cache.glob("device-*.json"))
    assert cached
    real = {}
    for path in cached:
        doc = json.loads(path.read_text())
        real[path] = {t: k["decode_flops"] for t, k in doc["kernels"].items()}
        for k in doc["kernels"].values():
            k["decode_flops"] /= factor
        path.write_text(json.dumps(doc))
    return real


def test_a_profile_the_ring_contradicts_is_calibrated_then_measured_again_when_idle(
        make_model: ModelFactory, tmp_path: Path) -> None:
    """A device profile is cached; one taken while the device was busy says it computes
    many times slower than it does. Once decode steps show it, the head scales the node's
    figures by what the ring measured and asks for a plan when idle (never before the next
    request), which measures the node again and prices its real speed. The same steps
    teach the head what a hop costs beyond its link."""
    from prima_node.cluster.planning import REPROFILE_EVERY_S, STALE_AFTER_STEPS

    model = make_model("llama", "tiny", "Q8_0")
    cache = tmp_path / "profiles"  # this test's own: it spoils the cached profile
    worker = _node(model, tmp_path / "w", cache)
    head: InProcessHead | None = None
    try:
        worker.wait_ready()
        head = InProcessHead(model, [f"127.0.0.1:{worker.port}"], cache)
        head.plan(1)  # measures both nodes and caches their profiles
        real = _spoil_profiles(cache)
        slow = head.plan(1)
        ring = head.head.planning
        ids = [d.name for d in slow.devices]
        head.ring.forward(list(range(1, 9)), session="s")
        for t in range(STALE_AFTER_STEPS - 1):
            head.ring.forward([t + 1], session="s")
            assert not ring.stale_profiles  # too few steps to judge
        head.ring.forward([3], session="s")
        assert ring.stale_profiles == set(ids) and ring.replan_when_idle
        assert not ring.needs_plan  # the next request does not wait for it
        assert set(ring.calibration) == set(ids)
        assert all(c < 0.5 for c in ring.calibration.values()), ring.calibration
        assert ring.hop_overhead_s is not None and ring.hop_overhead_s >= 0
        head.call(head.head.replan(1))
        for path, speeds in real.items():
            fresh = json.loads(path.read_text())["kernels"]
            assert all(fresh[t]["decode_flops"] > speeds[t] / 5 for t in speeds), (fresh, speeds)
        assert not ring.stale_profiles and set(ring.reprofiled_at) == set(ids)
        assert not ring.calibration and not ring.replan_when_idle  # measured afresh
        assert ring.plan is not None
        for old, new in zip(slow.devices, ring.plan.devices, strict=True):
            assert new.compute_s < old.compute_s / 10
        # measured again once: the same contradiction within REPROFILE_EVERY_S is only
        # calibrated; after that it is measured again too
        ring.measured_ms = {i: 50e3 * d.compute_s for i, d in enumerate(slow.devices)}
        ring._check_profiles(slow)
        assert not ring.stale_profiles and set(ring.calibration) == set(ids)
        for node_id in ids:
            ring.reprofiled_at[node_id] -= REPROFILE_EVERY_S + 1
        ring._check_profiles(slow)
        assert ring.stale_profiles == set(ids)
        ring.stale_profiles.clear()
        assert head.head.view()["plan"]["hop_overhead_ms"] >= 0
    finally:
        if head is not None:
            head.close()
        assert worker.stop() == 0, worker.log()


def test_twenty_conversations_on_a_ring_never_stall_and_keep_their_cache(
        make_model: ModelFactory, tmp_path: Path) -> None:
    """As Home Assistant talks to a ring: one long system prompt, a new question each time.
    The nodes' cached profiles are 50x too slow, so the ring contradicts them at the first
    answer; no conversation waits for a re-measure or a re-plan (the first token of each
    within 2x the first one's), every one after the first finds the system prompt cached,
    and the plan made while idle keeps the windows, so the cache survives it."""
    from prima_node.server.app import IDLE_S

    model = make_model("llama", "tiny", "Q8_0")
    cache = tmp_path / "profiles"
    worker = _node(model, tmp_path / "w", cache)
    worker.wait_ready()
    peers = ("--head", "--all-nodes", "--peer", f"127.0.0.1:{worker.port}")
    head = _node(model, tmp_path / "h", cache, *peers)
    try:
        head.wait_ready()
        assert head.stop() == 0  # the profiles are cached now: spoil them
        _spoil_profiles(cache)
        head = _node(model, tmp_path / "h", cache, *peers)
        head.wait_ready()
        system = "You are the voice assistant of a home. " * 30
        first: list[float] = []
        cached: list[int] = []
        with openai.OpenAI(base_url=head.base_url, api_key="x", max_retries=0,
                           timeout=60) as client:
            for i in range(20):
                if i == 10:  # idle for a while: the nodes are measured again meanwhile
                    deadline = time.monotonic() + IDLE_S + 60
                    while "measuring node" not in head.log():
                        assert time.monotonic() < deadline, head.log()
                        time.sleep(0.05)
                t0 = time.monotonic()
                ttft = None
                for chunk in client.chat.completions.create(
                        model="m", messages=[{"role": "system", "content": system},
                                             {"role": "user", "content": f"Question {i}?"}],
                        max_tokens=12, temperature=0, stream=True,
                        stream_options={"include_usage": True}):
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.monotonic() - t0
                    if chunk.usage is not None:
                        details = chunk.usage.prompt_tokens_details
                        cached.append(details.cached_tokens or 0 if details else 0)
                assert ttft is not None
                first.append(ttft)
        log = head.log()
        assert "its figures are scaled by what the ring measured" in log, log
        # the plan made once the measuring was over (between two requests) kept the ring,
        # and the next conversation finds its cache
        deadline = time.monotonic() + 60
        while "the ring and its caches stay" not in head.log():
            assert time.monotonic() < deadline, head.log()
            time.sleep(0.1)
        with openai.OpenAI(base_url=head.base_url, api_key="x", max_retries=0,
                           timeout=60) as client:
            after = client.chat.completions.create(
                model="m", messages=[{"role": "system", "content": system},
                                     {"role": "user", "content": "Question 20?"}],
                max_tokens=4, temperature=0)
        assert after.usage is not None and after.usage.prompt_tokens_details is not None
        assert (after.usage.prompt_tokens_details.cached_tokens or 0) > 0
        assert all(t < 2 * first[0] for t in first), " ".join(f"{t:.3f}" for t in first)
        assert all(c > 0 for c in cached[1:]), cached
    finally:
        head.stop()
        assert worker.stop() == 0, worker.log()
