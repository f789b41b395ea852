"""Node discovery over mDNS/DNS-SD with real zeroconf instances on real (virtual) networks.

Multicast does not work on a plain loopback interface (Linux's ``lo`` lacks the MULTICAST flag),
so the tests build their own networks out of network namespaces: two "hosts" joined by a veth
pair, or one namespace whose ``lo`` has multicast switched on. Each host runs an agent (this file
run as a script under ``ip netns exec``) that drives the module's Advertiser and Browser and
reports every callback, warning and loop error as a JSON line; the tests send it commands and
assert on what it reports. Needs root and iproute2 (as in CI); without them the tests fail with
a message saying so, they do not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import prima_node.cluster.discovery as discovery
from prima_node.cluster.discovery import (
    SERVICE_TYPE,
    Advertiser,
    Browser,
    Mdns,
    NodeAnnouncement,
)
from prima_node.cluster.fingerprint import fingerprint

pytestmark = pytest.mark.timeout(120)

EVENT_TIMEOUT_S = 10.0  # registration probes for ~1.3 s; resolution answers within ms

ALPHA: dict[str, Any] = {
    "node_id": "alpha", "name": "kitchen-pi", "role": "worker", "model": "big-Q4_K_M.gguf",
    "size": 41_234_567_890, "hash": "0123456789abcdef0123456789abcdef", "api_port": 8421,
    "version": "9.8.7-test", "path": "/cluster/ws", "cluster": "home-1"}
BETA: dict[str, Any] = {
    "node_id": "beta", "name": "study-desktop", "role": "head", "model": "big-Q4_K_M.gguf",
    "size": 41_234_567_890, "hash": "0123456789abcdef0123456789abcdef", "api_port": 9001,
    "version": "9.8.7-test", "path": "/cluster/ws", "cluster": None}


def _txt(entries: list[bytes]) -> str:
    """DNS TXT wire format (length-prefixed strings), hex-encoded for the agent."""
    return b"".join(bytes([len(e)]) + e for e in entries).hex()


def _valid_txt(**override: bytes | None) -> list[bytes]:
    props = {k.encode(): v.encode() for k, v in NodeAnnouncement(**ALPHA).properties().items()}
    props[b"id"] = b"placeholder"
    for key, value in override.items():
        if value is None:
            props.pop(key.encode(), None)
        else:
            props[key.encode()] = value
    return [k + b"=" + v for k, v in props.items()]


# Services advertised by hand with values the TXT contract rules out; each must be skipped.
MALFORMED = {
    "bad-size": _valid_txt(id=b"bad-size", size=b"lots"),
    "bad-role": _valid_txt(id=b"bad-role", role=b"king"),
    "bad-txtvers": _valid_txt(id=b"bad-txtvers", txtvers=b"2"),
    "bad-missing": _valid_txt(id=b"bad-missing", hash=None),
    "bad-utf8": _valid_txt(id=b"bad-utf8", name=b"\xff\xfe"),
    "bad-api": _valid_txt(id=b"bad-api", api=b"99999"),
    "bad-id": _valid_txt(id=b"has space"),
    "bad-wire": [b"\x05size\xff", b"", b"=x"],
}


# -- the networks -------------------------------------------------------------------------------

_COUNTER = itertools.count()


def _ip(*args: str) -> None:
    cmd = ["ip", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot build the test network (the mDNS tests need root and iproute2's "
                    f"'ip' to create network namespaces): {' '.join(cmd)}: {exc}")
    if done.returncode != 0:
        pytest.fail(f"cannot build the test network (the mDNS tests need root and iproute2's "
                    f"'ip' to create network namespaces): {' '.join(cmd)}: "
                    f"{done.stderr.strip()}")


class Agent:
    """This file run as a script inside a namespace: commands in, JSON events out."""

    def __init__(self, netns: str, log_dir: Path) -> None:
        self.netns = netns
        self.stderr_path = log_dir / f"{netns}-{next(_COUNTER)}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, __file__, "agent"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            bufsize=1, cwd=Path(__file__).parent)
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def expect(self, pred: Callable[[dict[str, Any]], bool], what: str,
               timeout: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        """The first event (seen so far or arriving within timeout) that matches."""
        for seen in self.events:
            if pred(seen):
                return seen
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event = self._queue.get(timeout=max(0.0, left))
            except queue.Empty:
                pytest.fail(f"{self.netns}: no {what} within {timeout} s; events: "
                            f"{self.events}\nagent stderr:\n{self.log_tail()}")
            if event is None:
                self._queue.put(None)
                pytest.fail(f"{self.netns}: the agent exited (rc {self.proc.wait()}) before "
                            f"{what}; events: {self.events}\nagent stderr:\n{self.log_tail()}")
            self.events.append(event)
            if pred(event):
                return event

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send a command and wait for its reply (the agent handles commands in order)."""
        seq = next(_COUNTER)
        self.send(op, seq=seq, **args)
        reply = self.expect(lambda e: e.get("reply") == seq, f"a reply to {op}")
        assert "error" not in reply, f"{op} failed in the agent: {reply['error']}"
        return reply

    def node_events(self, node_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("ev") == "node"
                and (node_id is None or e["node"]["node_id"] == node_id)]

    def log_tail(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()[-4000:]

    def quit(self) -> dict[str, Any]:
        closed = self.call("quit")
        rc = self.proc.wait(timeout=10)
        assert rc == 0, f"agent exited with {rc}:\n{self.log_tail()}"
        return closed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stderr.close()


class Net:
    """Network namespaces (and the agents inside them), all removed on close."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.namespaces: list[str] = []
        self.agents: list[Agent] = []
        self._tag = f"{os.getpid() % 10**6}"

    def host(self, lo_multicast: bool = False) -> str:
        name = f"prima-dt-{os.getpid()}-{next(_COUNTER)}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up", *(["multicast", "on"] if lo_multicast else []))
        return name

    def link(self, ns1: str, addr1: str, ns2: str, addr2: str) -> None:
        """A veth pair from ns1 to ns2 (which may be the same), with /24 addresses."""
        n = next(_COUNTER)
        end1, end2 = f"pv{self._tag}{n}a", f"pv{self._tag}{n}b"  # at most 15 characters
        _ip("-n", ns1, "link", "add", end1, "type", "veth", "peer", "name", end2, "netns", ns2)
        for ns, end, addr in ((ns1, end1, addr1), (ns2, end2, addr2)):
            if addr:
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", end)
            _ip("-n", ns, "link", "set", end, "up")

    def agent(self, netns: str) -> Agent:
        agent = Agent(netns, self.log_dir)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        failures = []
        for name in reversed(self.namespaces):  # deleting a namespace deletes its veth ends
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if done.returncode != 0:
                failures.append(f"{name}: {done.stderr.strip()}")
        assert not failures, f"could not remove test namespaces: {failures}"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    network = Net(tmp_path)
    try:
        yield network
    finally:
        network.close()


def _added(node_id: str, change: str = "added") -> Callable[[dict[str, Any]], bool]:
    return lambda e: (e.get("ev") == "node" and e["change"] == change
                      and e["node"]["node_id"] == node_id)


def _warning_about(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (e.get("ev") == "log" and e["level"] == logging.WARNING
                      and f"{name}.{SERVICE_TYPE}" in e["msg"])


def _assert_clean(closed: dict[str, Any], agent: Agent) -> None:
    """No lingering tasks or threads after stop, no loop errors, no error logs."""
    assert closed["tasks"] == [], closed["tasks"]
    assert closed["threads"] == [], closed["threads"]
    problems = [e for e in agent.events if e.get("ev") == "loop_error"
                or (e.get("ev") == "log" and e["level"] >= logging.ERROR)]
    assert problems == [], f"{problems}\n{agent.log_tail()}"


# -- the tests ------------------------------------------------------------------------------------


def test_nodes_on_two_hosts_find_each_other_and_follow_updates_and_goodbyes(net: Net) -> None:
    a_ip, b_ip = "10.213.7.1", "10.213.7.2"
    host_a, host_b = net.host(), net.host()
    net.link(host_a, a_ip, host_b, b_ip)
    a, b = net.agent(host_a), net.agent(host_b)
    t0 = time.monotonic()

    # each host browses, ignoring its own id, and advertises itself on every interface
    assert b.call("browse", key="b", own_id="beta")["active"] is True
    assert a.call("browse", key="a", own_id="alpha")["active"] is True
    b.send("advertise", key="beta", announcement=BETA, port=9001, host="0.0.0.0")
    ad = a.call("advertise", key="alpha", announcement=ALPHA, port=8421, host="0.0.0.0")
    assert ad["active"] is True
    assert ad["addresses"] == [a_ip]  # lo (no MULTICAST here) is neither used nor advertised

    seen = b.expect(_added("alpha"), "alpha on host b")["node"]
    assert abs(seen.pop("last_seen") - time.time()) < 60
    assert seen == {**ALPHA, "addresses": [a_ip], "port": 8421, "server": "prima-alpha.local.",
                    "service_name": f"alpha.{SERVICE_TYPE}"}
    # the control for "own id ignored": beta's advertisement does reach the network
    other = a.expect(_added("beta"), "beta on host a")["node"]
    assert (other["cluster"], other["addresses"], other["port"]) == (None, [b_ip], 9001)
    found_s = time.monotonic() - t0

    # a change of role and model is seen as an update of the same node
    a.call("update", key="alpha", changes={"role": "head", "model": "other.gguf"})
    updated = b.expect(_added("alpha", "updated"), "alpha's update")["node"]
    assert (updated["role"], updated["model"]) == ("head", "other.gguf")
    assert {k: v for k, v in updated.items() if k not in ("role", "model", "last_seen")} == {
        k: v for k, v in seen.items() if k not in ("role", "model")}

    # services with malformed TXT: one warning each, never a node, never a crash
    services = {name: _txt(txt) for name, txt in MALFORMED.items()}
    services["delta"] = _txt(_valid_txt(id=b"delta"))  # valid now, malformed below
    a.call("raw", services=services, ip=a_ip)
    for name in MALFORMED:
        b.expect(_warning_about(name), f"the warning about {name}")
    delta = b.expect(_added("delta"), "delta on host b")["node"]
    assert (delta["addresses"], delta["port"], delta["role"]) == ([a_ip], 1234, "worker")
    # a node whose TXT turns malformed is removed (with a warning), not kept stale
    a.call("raw_update", name="delta", txt=_txt(_valid_txt(id=b"delta", role=b"boss")), ip=a_ip)
    b.expect(_added("delta", "removed"), "delta's removal")
    # a second bad TXT for the same service is skipped without another warning
    a.call("raw_update", name="bad-size", txt=_txt(_valid_txt(id=b"bad-size", size=b"-1")),
           ip=a_ip)
    # ... and the browser still works: a valid node advertised afterwards is found
    gamma = {**ALPHA, "node_id": "gamma", "api_port": 8500}
    a.call("advertise", key="gamma", announcement=gamma, port=8500, host=a_ip)
    b.expect(_added("gamma"), "gamma on host b")
    assert set(b.call("nodes")["nodes"]) == {"alpha", "gamma"}
    assert set(a.call("nodes")["nodes"]) == {"beta", "gamma"}  # gamma runs on host a itself

    # goodbye: unregistering removes the node at once (not after the TTL)
    t_bye = time.monotonic()
    a.call("unadvertise", key="alpha")
    removed = b.expect(_added("alpha", "removed"), "alpha's removal")["node"]
    assert removed["role"] == "head"
    bye_s = time.monotonic() - t_bye
    assert set(b.call("nodes")["nodes"]) == {"gamma"}

    closed_b, closed_a = b.quit(), a.quit()
    _assert_clean(closed_a, a)
    _assert_clean(closed_b, b)
    warnings = [e["msg"] for e in b.events if e.get("ev") == "log"
                and e["level"] == logging.WARNING]
    for name in MALFORMED:
        assert sum(f"{name}.{SERVICE_TYPE}" in m for m in warnings) == 1, (name, warnings)
    assert sum(f"delta.{SERVICE_TYPE}" in m and "'boss'" in m for m in warnings) == 1
    assert {e["node"]["node_id"] for e in b.node_events()} == {"alpha", "delta", "gamma"}
    assert [e["change"] for e in b.node_events("alpha")] == ["added", "updated", "removed"]
    print(f"found after {found_s:.2f} s, goodbye seen after {bye_s:.2f} s")


def test_a_node_bound_to_loopback_advertises_only_loopback_there(net: Net) -> None:
    host = net.host(lo_multicast=True)
    net.link(host, "10.213.8.1", host, "")  # a second interface the loopback node must not use
    agent = net.agent(host)
    assert agent.call("browse", key="lo", own_id=None, host="127.0.0.1")["active"] is True
    solo = agent.call("advertise", key="solo", announcement={**ALPHA, "node_id": "solo"},
                      port=8080, host="127.0.0.1")
    assert (solo["addresses"], solo["interfaces"], solo["senders"]) == (
        ["127.0.0.1"], ["127.0.0.1"], ["127.0.0.1"])
    wide = agent.call("advertise", key="wide", announcement={**ALPHA, "node_id": "wide"},
                      port=8081, host="0.0.0.0")
    assert wide["addresses"] == ["10.213.8.1"]  # loopback is not advertised beside a real one
    assert sorted(wide["senders"]) == ["10.213.8.1", "127.0.0.1"]
    node = agent.expect(_added("solo"), "the loopback node")["node"]
    assert (node["addresses"], node["port"]) == (["127.0.0.1"], 8080)
    node = agent.expect(_added("wide"), "the wildcard node")["node"]
    assert (node["addresses"], node["port"]) == (["10.213.8.1"], 8081)
    _assert_clean(agent.quit(), agent)


def test_without_a_multicast_interface_discovery_warns_and_stays_off(net: Net) -> None:
    host = net.host(lo_multicast=False)  # lo is up but, as on a plain Linux box, not multicast
    agent = net.agent(host)
    for where in ("127.0.0.1", "0.0.0.0"):
        ad = agent.call("advertise", key=f"ad-{where}", announcement=ALPHA, port=8421,
                        host=where)
        assert (ad["active"], ad["addresses"]) == (False, [])
        assert agent.call("browse", key=f"b-{where}", own_id=None, host=where)["active"] is False
    warnings = [e["msg"] for e in agent.events if e.get("ev") == "log"
                and e["level"] == logging.WARNING]
    assert len(warnings) == 4 and all("--peer" in m for m in warnings), warnings
    assert "lo lacks MULTICAST" in warnings[0]
    # updates and stops of inactive parts are harmless
    agent.call("update", key="ad-127.0.0.1", changes={"role": "head"})
    _assert_clean(agent.quit(), agent)


# -- the contract, without a network ----------------------------------------------------------


def test_txt_properties_are_the_documented_keys_and_parse_back() -> None:
    ann = NodeAnnouncement(**ALPHA)
    props = ann.properties()
    assert list(props) == ["txtvers", "id", "name", "version", "role", "model", "size", "hash",
                           "api", "path", "cluster"]
    assert props["size"] == "41234567890" and props["api"] == "8421"
    doc = discovery.__doc__ or ""
    for key in props:
        assert f"\n  {key} " in doc, f"TXT key {key} is not documented in the module docstring"
    raw = {k.upper().encode(): v.encode() for k, v in props.items()}  # keys are case-insensitive
    assert NodeAnnouncement.from_properties(raw) == ann
    no_cluster = NodeAnnouncement(**{**ALPHA, "cluster": None})
    assert "cluster" not in no_cluster.properties()
    every = b"".join(len(f"{k}={v}".encode()).to_bytes(1, "big") + f"{k}={v}".encode()
                     for k, v in props.items())
    assert len(every) < 400  # small enough for one mDNS packet with room to spare


@pytest.mark.parametrize("change", [
    {"node_id": "has space"}, {"node_id": "x" * 58}, {"node_id": ""}, {"role": "king"},
    {"name": ""}, {"name": "tab\there"}, {"name": "n" * 101}, {"model": "dir/file.gguf"},
    {"size": -1}, {"size": True}, {"hash": "XYZ"}, {"hash": "0123456789ABCDEF0123"},
    {"api_port": 0}, {"api_port": 65536}, {"path": "cluster/ws"}, {"cluster": "a b"},
    {"version": ""},
])
def test_an_announcement_out_of_contract_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NodeAnnouncement(**{**ALPHA, **change})


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_txt_raises_value_error(name: str) -> None:
    txt = bytes.fromhex(_txt(MALFORMED[name]))
    props: dict[bytes, bytes | None] = {}
    pos = 0
    while pos < len(txt):
        n = txt[pos]
        entry = txt[pos + 1:pos + 1 + n]
        pos += 1 + n
        key, sep, value = entry.partition(b"=")
        props[key] = value if sep else None
    with pytest.raises(ValueError):
        NodeAnnouncement.from_properties(props)


def test_announcement_from_a_model_file(make_model: Callable[..., Path]) -> None:
    path = make_model()
    ann = NodeAnnouncement.from_model(path, node_id="n1", name="h" * 150, role="worker",
                                      api_port=8080)
    assert (ann.model, ann.size, ann.hash) == (path.name, path.stat().st_size,
                                               fingerprint(path))
    assert len(ann.name.encode()) <= 100 and ann.name.startswith("hhh")


def test_update_cannot_change_the_node_id() -> None:
    async def main() -> None:
        adv = Advertiser(NodeAnnouncement(**ALPHA), 8421)
        with pytest.raises(ValueError):
            await adv.update(node_id="other")
        await adv.update(role="head")  # not started: kept for start, nothing sent
        assert adv.announcement.role == "head" and not adv.active

    asyncio.run(main())


# -- the agent (this file run as a script inside a namespace) -----------------------------------


async def _agent() -> None:
    loop = asyncio.get_running_loop()

    def emit(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    loop.set_exception_handler(lambda _loop, ctx: emit(
        ev="loop_error", msg=str(ctx.get("message")), exc=repr(ctx.get("exception"))))

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            emit_event(record)

    def emit_event(record: logging.LogRecord) -> None:
        emit(ev="log", level=record.levelno, logger=record.name, msg=record.getMessage())

    logging.getLogger("prima.cluster.discovery").addHandler(Forward(logging.INFO))
    logging.getLogger("zeroconf").addHandler(Forward(logging.ERROR))

    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    advertisers: dict[str, Advertiser] = {}
    browsers: dict[str, Browser] = {}
    raw: dict[str, Any] = {}  # name -> AsyncServiceInfo, on raw_mdns
    raw_mdns: list[Mdns] = []

    def on_change(change: str, node: discovery.DiscoveredNode) -> None:
        emit(ev="node", change=change, node=dataclasses.asdict(node))

    def raw_info(name: str, txt: str, ip: str) -> Any:
        from zeroconf.asyncio import AsyncServiceInfo

        return AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=1234,
                                properties=bytes.fromhex(txt), server=f"{name}.local.",
                                parsed_addresses=[ip])

    async def handle(op: str, cmd: dict[str, Any]) -> dict[str, Any]:
        if op == "browse":
            browser = Browser(own_id=cmd["own_id"], on_change=on_change,
                              host=cmd.get("host", "0.0.0.0"))
            browsers[cmd["key"]] = browser
            return {"active": await browser.start()}
        if op == "advertise":
            adv = Advertiser(NodeAnnouncement(**cmd["announcement"]), cmd["port"],
                             host=cmd["host"])
            advertisers[cmd["key"]] = adv
            active = await adv.start()
            mdns = adv._mdns  # what it really opened, for the tests of interface choice
            senders = [] if mdns is None else [
                s.transport.get_extra_info("sockname")[0]
                for s in mdns.aiozc.zeroconf.engine.senders]
            return {"active": active, "addresses": list(adv.addresses),
                    "interfaces": [] if mdns is None else list(mdns.plan.interfaces),
                    "senders": senders}
        if op == "update":
            await advertisers[cmd["key"]].update(**cmd["changes"])
            return {}
        if op == "unadvertise":
            await advertisers.pop(cmd["key"]).stop()
            return {}
        if op == "raw":
            if not raw_mdns:
                mdns = await Mdns.open(cmd["ip"])
                assert mdns is not None
                raw_mdns.append(mdns)
            infos = {name: raw_info(name, txt, cmd["ip"]) for name, txt in cmd["services"].items()}
            waits = await asyncio.gather(*(raw_mdns[0].aiozc.async_register_service(info)
                                           for info in infos.values()))
            await asyncio.gather(*waits)
            raw.update(infos)
            return {}
        if op == "raw_update":
            info = raw_info(cmd["name"], cmd["txt"], cmd["ip"])
            await (await raw_mdns[0].aiozc.async_update_service(info))
            return {}
        if op == "nodes":
            return {"nodes": {k: dataclasses.asdict(v)
                              for b in browsers.values() for k, v in b.nodes.items()}}
        raise ValueError(f"unknown op {op}")

    while line := await reader.readline():
        cmd = json.loads(line)
        op, seq = cmd.pop("op"), cmd.pop("seq", None)
        if op == "quit":
            break
        try:
            emit(reply=seq, **await handle(op, cmd))
        except Exception as exc:
            emit(reply=seq, error=repr(exc))
    for adv in advertisers.values():
        await adv.stop()
    for browser in browsers.values():
        await browser.stop()
    for mdns in raw_mdns:
        await mdns.close()
    transport.close()
    await asyncio.sleep(0)
    tasks = [repr(t) for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    threads = [t.name for t in threading.enumerate()
               if t is not threading.main_thread() and not t.name.startswith("asyncio_")]
    emit(reply=seq, tasks=tasks, threads=threads)


if __name__ == "__main__" and sys.argv[1:] == ["agent"]:
    logging.basicConfig(level=logging.DEBUG if os.environ.get("PRIMA_DT_DEBUG") else logging.INFO,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_agent())
