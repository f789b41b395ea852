"""Cluster benchmarks: what the piped ring costs and what it buys, in one table.

Five scenarios, each with real ``prima-node serve`` processes and the official ``openai``
client (streaming, greedy, end-of-generation tokens banned with ``logit_bias`` so every answer
has exactly N tokens):

1. ``ring``: 1, 2 and 4 node processes on loopback, the model fitting in memory: the price of
   the ring (hops, frames, a head that only plans) over one node. One node is a plain
   ``prima-node serve``; a ring is ``--head --all-nodes`` plus workers, k chosen by Halda
   (``--ring-k`` adds forced k on the same ring, to price the extra hops).
2. ``memory``: the paper's memory-limited home cluster. Every node is a process in its own
   cgroup-v1 memory group (page cache counts against the limit) with its own copy of the model
   file, so each is charged for its own pages as separate devices would be, and in its own
   blkio group with a read-bandwidth limit on the disk that holds its copy (``--disk``: a
   home's NVMe 2 GB/s, SATA SSD 500 MB/s, USB or SD-card Pi 100 MB/s; the machine's own disk
   is the ceiling). Every node profiles its own disk under its limit (a fresh profile cache
   per run), so Halda plans with the home's disks. The memory limit is the node's own
   anonymous memory (measured in a calibration run without memory limits) plus a fraction
   (``--mem-frac``) of its equal share of the layers; the head, which holds the output
   projection wherever the layers go, has room for it besides (a home's head is its biggest
   device). Rows, each with Halda's prediction:
   - ``halda, prefetch`` and ``halda, no prefetch``: limits in place from the start, as the
     product runs (Halda plans with them; ``serve --prefetch on|off``);
   - ``k=1, even split``: planned with room for 1.1 shares per node, then the real limits
     (one window per node: nothing can be prefetched without evicting what is used next, so
     the page cache re-reads what does not fit);
   - one node alone, and llama.cpp (llama-cpp-python, mmap, its defaults; ``--no-repack``
     where the OOM killer ends those) alone, under the head's memory and disk limits.
3. ``wifi``: nodes in network namespaces joined by a user-space switch with a one-way delay
   and a per-sender rate (this kernel has neither sch_netem nor sch_fq: see ``_hub_main``);
   Halda's k, k = 1 and a forced larger k, with Halda's predicted and the head's measured
   ms/token from ``/api/status``. The client runs inside the head's namespace.

4. ``prefill``: a long prompt's time to first token (``--prefill-tokens``, 1,500 by default:
   Home Assistant's system prompt) on one node (one thread, every core) and on a ring with the
   prompt pipelined in micro-batches and sent whole, one node at a time (as before).
5. ``kills``: a worker killed in the middle of each of ``--kills`` streamed answers and
   started again: every answer must be the undisturbed one (greedy), each pause at most 5 s
   beyond the time the head spent evaluating the conversation again on the new ring.

    scripts/bench-cluster [--quick] [--scenario ring,memory,wifi,prefill,kills]
        [--model M.gguf] [--tokens 32] [--threads 1,2] [--disk nvme,sata,sd] [--json out.json]

ms/token is measured by the client from token arrival times: (last token - first token) /
(tokens - 1), i.e. decode steps only, prefill excluded; the server's own ``timings`` figure is
shown beside it. Disk bytes (``/proc/PID/io`` read_bytes: real storage reads), major faults
(``/proc/PID/stat``; per cgroup ``memory.stat`` pgmajfault in the JSON) and memory pressure
(PSI from ``/proc/pressure/memory``: system-wide, cgroup v1 has no per-group PSI) are counted
over the same window, summed over the node processes. The memory and wifi scenarios need root
(cgroup and namespace set-up); everything they create has a unique name and is removed in
``finally`` blocks, on Ctrl-C and SIGTERM too. Page caches are dropped per file
(``posix_fadvise``), never machine-wide.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import itertools
import json
import os
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path.home() / ".cache" / "prima" / "bench"
BENCH_MODEL = BENCH_DIR / "llama-1b-Q8_0.gguf"
COPY_DIR = BENCH_DIR / "copies"
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
SECRET = "bench-cluster-secret-0123"
PROMPT = "The kitchen lights were still on when the family came home late that evening, so"
CTX = 512
WIFI_SUBNET = "10.77.0"
LOG_TAIL = 25


class BenchError(Exception):
    """A scenario could not run; the message says why (and quotes a node's log)."""


# -- counters -----------------------------------------------------------------------------------


def _proc_read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _proc_majflt(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[9])  # state ppid pgrp session tty tpgid flags minflt cminflt majflt


def _psi_totals() -> tuple[int, int]:
    """System-wide memory pressure: (some, full) stall time in microseconds since boot."""
    some = full = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/pressure/memory").read_text().splitlines():
            total = int(line.rsplit("total=", 1)[1])
            if line.startswith("some"):
                some = total
            elif line.startswith("full"):
                full = total
    return some, full


def _cg_stat(cg: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in (cg / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    return out


@dataclass
class Snapshot:
    t: float
    read_bytes: dict[int, int]
    majflt: dict[int, int]
    cg: dict[str, dict[str, int]]
    psi: tuple[int, int]


def snapshot(pids: Sequence[int], cgroups: Sequence[str]) -> Snapshot:
    rb, mf = {}, {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            rb[pid] = _proc_read_bytes(pid)
            mf[pid] = _proc_majflt(pid)
    return Snapshot(time.perf_counter(), rb, mf, {c: _cg_stat(Path(c)) for c in cgroups},
                    _psi_totals())


def counter_delta(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    window = max(b.t - a.t, 1e-9)
    cg = {c: {k: b.cg[c].get(k, 0) - a.cg[c].get(k, 0) for k in ("pgmajfault", "pgpgin")}
          for c in a.cg}
    return {
        "window_s": window,
        "read_bytes": {str(p): b.read_bytes[p] - a.read_bytes[p] for p in a.read_bytes
                       if p in b.read_bytes},
        "majflt": {str(p): b.majflt[p] - a.majflt[p] for p in a.majflt if p in b.majflt},
        "cgroup": cg,
        "psi_some_pct": 100 * (b.psi[0] - a.psi[0]) / 1e6 / window,
        "psi_full_pct": 100 * (b.psi[1] - a.psi[1]) / 1e6 / window,
    }


# -- the client ---------------------------------------------------------------------------------


def _extra(obj: Any, name: str) -> Any:
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get(name, getattr(obj, name, None))


def decode_once(base_url: str, tokens: int, eog: Sequence[int], pids: Sequence[int],
                cgroups: Sequence[str]) -> dict[str, Any]:
    """One streamed greedy completion of exactly ``tokens`` tokens, counters over its decode
    window (first token to last); BenchError with the server's reason if it fails."""
    import openai

    try:
        return _decode_once(base_url, tokens, eog, pids, cgroups)
    except openai.APIError as exc:
        raise BenchError(f"the answer failed: {exc}") from None


def _decode_once(base_url: str, tokens: int, eog: Sequence[int], pids: Sequence[int],
                 cgroups: Sequence[str]) -> dict[str, Any]:
    import openai

    with openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0,
                       timeout=1800) as client:
        stream = client.completions.create(
            model="m", prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
            logit_bias={str(t): -100 for t in eog})
        arrivals: list[float] = []
        first: Snapshot | None = None
        last: Snapshot | None = None
        t_end: float | None = None
        timings: dict[str, Any] | None = None
        usage = None
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.text:
                    arrivals.append(now)
                    if first is None:
                        first = snapshot(pids, cgroups)
                if choice.finish_reason is not None and t_end is None:
                    t_end = now
                    last = snapshot(pids, cgroups)
            t = _extra(chunk, "timings")
            if t:
                timings = t
            if chunk.usage is not None:
                usage = chunk.usage
    if first is None or last is None or t_end is None or usage is None:
        raise BenchError("the stream ended without text, a finish reason or usage")
    n = int(usage.completion_tokens)
    if n != tokens:
        raise BenchError(f"asked for {tokens} tokens, got {n} (finish before the limit)")
    gaps = [1e3 * (b - a) for a, b in itertools.pairwise(arrivals)]
    return {
        "tokens": n,
        "ms_per_token": 1e3 * (t_end - arrivals[0]) / max(n - 1, 1),
        "median_gap_ms": statistics.median(gaps) if len(arrivals) == n and gaps else None,
        "text_chunks": len(arrivals),
        "server_ms_per_token": (timings or {}).get("predicted_per_token_ms"),
        "counters": counter_delta(first, last),
    }


def get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict[str, Any], timeout: float = 600.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        with err:
            raise BenchError(f"POST {url} answered {err.code}: {err.read()[:400]!r}") from None


def measure(base_url: str, tokens: int, repeats: int, eog: Sequence[int], pids: Sequence[int],
            cgroups: Sequence[str], warmup: int = 4,
            after_warmup: Callable[[], None] | None = None) -> dict[str, Any]:
    """A warm-up answer, then ``repeats`` measured answers; and the head's status after."""
    decode_once(base_url, warmup, eog, [], [])
    if after_warmup is not None:
        after_warmup()
    runs = [decode_once(base_url, tokens, eog, pids, cgroups) for _ in range(repeats)]
    status = get_json(base_url + "/api/status")
    return {"runs": runs, "status": status}


def measure_in(netns: str | None, base_url: str, tokens: int, repeats: int, eog: Sequence[int],
               pids: Sequence[int], cgroups: Sequence[str]) -> dict[str, Any]:
    """``measure`` here, or in a subprocess inside a network namespace (the head's)."""
    if netns is None:
        return measure(base_url, tokens, repeats, eog, pids, cgroups)
    cmd = ["ip", "netns", "exec", netns, sys.executable, str(Path(__file__).resolve()),
           "_client", "--url", base_url, "--tokens", str(tokens), "--repeats", str(repeats),
           "--eog", ",".join(map(str, eog)), "--pids", ",".join(map(str, pids))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if res.returncode != 0:
        raise BenchError(f"the client in {netns} failed ({res.returncode}):\n"
                         f"{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout))


def _client_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_cluster.py _client")
    p.add_argument("--url", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--eog", default="")
    p.add_argument("--pids", default="")
    a = p.parse_args(argv)
    out = measure(a.url, a.tokens, a.repeats, _ints(a.eog), _ints(a.pids), [])
    print(json.dumps(out))
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- node processes -----------------------------------------------------------------------------

_LISTENING = re.compile(r"listening on http://(\S+?):(\d+) ")
_READY = {"worker": re.compile(r"ready for a plan"), "head": re.compile(r"ready in [\d.]+ s"),
          "single": re.compile(r"ready in [\d.]+ s")}
_FAILED = re.compile(r"the model could not be loaded|Traceback \(most recent call last\)")


@dataclass
class NodeSpec:
    name: str
    model: Path
    threads: int
    role: str = "single"  # single | head | worker
    host: str = "127.0.0.1"
    peers: list[str] = field(default_factory=list)
    rounds: int | None = None
    extra: list[str] = field(default_factory=list)
    netns: str | None = None
    cgroup: Path | None = None
    io_group: Path | None = None  # a blkio group: the node's own disk speed
    ctx: int = CTX
    all_nodes: bool = True  # head: every node takes part (else Halda chooses which)


class Node:
    """One ``prima-node serve`` process; its log is drained to a file from the start."""

    def __init__(self, spec: NodeSpec, scratch: Path) -> None:
        self.spec = spec
        self.log_path = scratch / "logs" / f"{spec.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        state = scratch / "state" / spec.name
        argv = [sys.executable, "-m", "prima_node.cli", "serve", "--model", str(spec.model),
                "--host", spec.host, "--port", "0", "--ctx", str(spec.ctx),
                "--threads", str(spec.threads), "--state-dir", str(state),
                "--name", spec.name]
        if spec.role != "single":
            argv += ["--cluster-secret", SECRET]
        if spec.role == "head":
            argv += ["--head", *(["--all-nodes"] if spec.all_nodes else [])]
            for peer in spec.peers:
                argv += ["--peer", peer]
            if spec.rounds is not None:
                argv += ["--rounds", str(spec.rounds)]
        if serve_has("--no-discovery"):  # exactly the nodes given, none found on the network
            argv.append("--no-discovery")
        argv += spec.extra
        if spec.netns is not None:
            argv = ["ip", "netns", "exec", spec.netns, *argv]
        # join the groups before exec: no page charged elsewhere, no read unthrottled
        argv = in_groups([g for g in (spec.cgroup, spec.io_group) if g is not None], argv)
        self.argv = argv
        self.lines: list[str] = []
        self.address: str | None = None
        self.ready = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PRIMA_API_KEY", None)
        env.pop("PRIMA_CLUSTER_SECRET", None)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # Ctrl-C reaches us, we stop it
        self._reader = threading.Thread(target=self._drain, daemon=True, name=spec.name)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        assert self.address is not None
        return f"http://{self.address}"

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        ready = _READY[self.spec.role]
        with self.log_path.open("w", encoding="utf-8") as log:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                with self._changed:
                    self.lines.append(line)
                    m = _LISTENING.search(line)
                    if m and self.address is None:
                        self.address = f"{m.group(1)}:{m.group(2)}"
                    if ready.search(line):
                        self.ready = True
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def tail(self, n: int = LOG_TAIL) -> str:
        with self._lock:
            return "\n".join(f"    | {line}" for line in self.lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (self.ready and self.address is not None):
                failed = next((ln for ln in self.lines if _FAILED.search(ln)), None)
                if self.proc.poll() is not None or failed is not None:
                    why = (f"exited with status {self.proc.returncode}"
                           if self.proc.poll() is not None else "failed to load its model: "
                           + str(failed).split("could not be loaded: ", 1)[-1])
                    raise BenchError(f"node {self.spec.name} {why} "
                                     f"(log {self.log_path}):\n{self._tail_locked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"node {self.spec.name} was not ready within "
                                     f"{timeout:.0f} s (log {self.log_path}):\n"
                                     f"{self._tail_locked()}")
                self._changed.wait(min(left, 1.0))

    def _tail_locked(self) -> str:
        return "\n".join(f"    | {line}" for line in self.lines[-LOG_TAIL:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


class Cluster:
    """One node alone (n = 1: plain serve) or workers then a head, each ready before the next
    starts; stops everything it started, head first."""

    def __init__(self, name: str, scratch: Path, models: Sequence[Path], threads: int, *,
                 rounds: int | None = None, extra: Sequence[str] = (),
                 hosts: Sequence[str] | None = None, netns: Sequence[str] | None = None,
                 cgroups: Sequence[Path | None] | None = None,
                 io_groups: Sequence[Path | None] | None = None, timeout: float = 600.0,
                 all_nodes: bool = True, ctx: int = CTX) -> None:
        self.name, self.scratch, self.models = name, scratch, list(models)
        self.threads, self.rounds, self.extra = threads, rounds, list(extra)
        n = len(self.models)
        self.hosts = list(hosts) if hosts is not None else ["127.0.0.1"] * n
        self.netns: list[str | None] = list(netns) if netns is not None else [None] * n
        self.cgroups: list[Path | None] = list(cgroups) if cgroups is not None else [None] * n
        self.io_groups: list[Path | None] = (list(io_groups) if io_groups is not None
                                             else [None] * n)
        self.timeout = timeout
        self.all_nodes = all_nodes
        self.ctx = ctx
        self.nodes: list[Node] = []  # head (or the single node) first

    def __enter__(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        n = len(self.models)
        if n == 1:
            node = Node(NodeSpec(f"{self.name}-single", self.models[0], self.threads,
                                 host=self.hosts[0], extra=self.extra, netns=self.netns[0],
                                 cgroup=self.cgroups[0], io_group=self.io_groups[0],
                                 ctx=self.ctx), self.scratch)
            self.nodes.append(node)
            node.wait_ready(self.timeout)
            return
        workers = []
        for i in range(1, n):
            w = Node(NodeSpec(f"{self.name}-worker{i}", self.models[i], self.threads, "worker",
                              host=self.hosts[i], extra=self.extra, netns=self.netns[i],
                              cgroup=self.cgroups[i], io_group=self.io_groups[i],
                              ctx=self.ctx), self.scratch)
            workers.append(w)
            self.nodes.append(w)
        for w in workers:
            w.wait_ready(self.timeout)
        peers = [w.address for w in workers if w.address is not None]
        head = Node(NodeSpec(f"{self.name}-head", self.models[0], self.threads, "head",
                             host=self.hosts[0], peers=peers, rounds=self.rounds,
                             extra=self.extra, netns=self.netns[0], cgroup=self.cgroups[0],
                             io_group=self.io_groups[0], ctx=self.ctx,
                             all_nodes=self.all_nodes),
                    self.scratch)
        self.nodes.insert(0, head)
        try:
            head.wait_ready(self.timeout)
        except BenchError as exc:
            dead = [w for w in workers if not w.alive()]
            more = "".join(f"\nworker {w.spec.name} exited ({w.proc.returncode}):\n{w.tail()}"
                           for w in dead)
            raise BenchError(f"{exc}{more}") from None

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def check_alive(self) -> None:
        for node in self.nodes:
            if not node.alive():
                raise BenchError(f"node {node.spec.name} exited with status "
                                 f"{node.proc.returncode} (log {node.log_path}):\n{node.tail()}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# -- memory cgroups (v1) ------------------------------------------------------------------------


def in_groups(groups: Sequence[Path], argv: list[str]) -> list[str]:
    """``argv`` run from its first instruction inside these cgroups (v1 folders)."""
    if not groups:
        return argv
    script = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1/cgroup.procs" || exit 97; '
              'shift; n=$((n - 1)); done; exec "$@"')
    return ["sh", "-c", script, "sh", str(len(groups)), *map(str, groups), *argv]


def own_memory_cgroup() -> Path | None:
    """This process's memory cgroup folder (cgroup v1), where children may be created."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = CGROUP_V1 / path.lstrip("/")
            return d if d.is_dir() else None
    return None


class MemoryGroups:
    """Child memory cgroups of our own; removed (after their processes are gone) on exit."""

    def __init__(self, tag: str) -> None:
        base = own_memory_cgroup()
        if base is None:
            raise BenchError("no cgroup-v1 memory controller for this process "
                             f"({CGROUP_V1} missing or /proc/self/cgroup has no memory line)")
        self.base, self.tag = base, tag
        self.made: list[Path] = []

    def make(self, name: str, limit: int | None) -> Path:
        d = self.base / f"{self.tag}-{name}"
        try:
            d.mkdir()
        except OSError as exc:
            raise BenchError(f"cannot create the memory cgroup {d}: {exc}") from None
        self.made.append(d)
        if limit is not None:
            (d / "memory.limit_in_bytes").write_text(str(limit))
        return d

    def __enter__(self) -> MemoryGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_all()

    def remove_all(self) -> None:
        self.remove(self.made)
        self.made.clear()

    @staticmethod
    def remove(made: Sequence[Path]) -> None:
        for d in reversed(made):
            for _ in range(50):  # a process just killed may take a moment to leave
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                print(f"[bench] warning: could not remove cgroup {d}", file=sys.stderr)


CGROUP_BLKIO = Path("/sys/fs/cgroup/blkio")
#: a home's disks, read MB/s (cgroup v1 blkio throttle: the device's own speed is the ceiling)
DISK_PRESETS = {"nvme": 2000, "sata": 500, "sd": 100}


def whole_disk(path: Path) -> str:
    """"MAJ:MIN" of the disk holding ``path`` (its parent disk when it is on a partition:
    the throttle applies to whole disks)."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        raise BenchError(f"{path} is not on a block device ({os.major(dev)}:{os.minor(dev)}): "
                         "no disk to throttle")
    if (node / "partition").exists():
        return (node.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


class DiskGroups:
    """blkio cgroups (v1) with a read-bandwidth limit each: a node's own disk speed. Removed
    on exit."""

    def __init__(self, tag: str) -> None:
        if not (CGROUP_BLKIO / "blkio.throttle.read_bps_device").exists():
            raise BenchError(f"no cgroup-v1 blkio controller with throttling at {CGROUP_BLKIO}")
        self.tag = tag
        self.made: list[Path] = []

    def make(self, name: str, path: Path, mb_per_s: float) -> Path:
        d = CGROUP_BLKIO / f"{self.tag}-{name}"
        try:
            d.mkdir()
            self.made.append(d)
            (d / "blkio.throttle.read_bps_device").write_text(
                f"{whole_disk(path)} {int(mb_per_s * 1e6)}")
        except OSError as exc:
            raise BenchError(f"cannot limit reads in {d}: {exc}") from None
        return d

    @staticmethod
    def read_bytes(d: Path) -> int:
        total = 0
        with contextlib.suppress(OSError):
            for line in (d / "blkio.throttle.io_service_bytes").read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    total += int(parts[2])
        return total

    def __enter__(self) -> DiskGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        MemoryGroups.remove(self.made)
        self.made.clear()


def drop_pages(path: Path) -> None:
    """Forget one file's cached pages (never the machine's whole cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def model_copies(model: Path, n: int, log: Callable[[str], None]) -> list[Path]:
    """``n`` copies of the model file (reused between runs while size and age match), one per
    simulated device, so each memory group is charged for its own page-cache pages."""
    COPY_DIR.mkdir(parents=True, exist_ok=True)
    st = model.stat()
    out = []
    for i in range(n):
        dst = COPY_DIR / f"{model.stem}.copy{i}{model.suffix}"
        if not (dst.exists() and dst.stat().st_size == st.st_size
                and dst.stat().st_mtime >= st.st_mtime):
            log(f"copying {model.name} to {dst} ({st.st_size / 1e9:.2f} GB)")
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(model, tmp)
            tmp.replace(dst)
            drop_pages(dst)
        out.append(dst)
    return out


# -- Wi-Fi-like links ---------------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def _hub_main(argv: Sequence[str]) -> int:
    """A user-space Ethernet switch between TAP devices: each frame leaves its sender's uplink
    at ``rate`` (a FIFO, 1000 frames deep, like netem's default limit) and arrives ``delay``
    later. It stands in for ``tc netem delay D rate R`` on each node's link, which this kernel
    does not have (no sch_netem, no sch_fq for BPF timestamps)."""
    p = argparse.ArgumentParser(prog="bench_cluster.py _hub")
    p.add_argument("--taps", required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--rate-mbit", type=float, required=True)
    p.add_argument("--queue", type=int, default=1000)
    a = p.parse_args(argv)
    names = a.taps.split(",")
    fds = []
    for name in names:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        fds.append(fd)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print("ready", flush=True)
    delay, rate = a.delay_ms / 1e3, a.rate_mbit * 1e6
    port_of = {fd: i for i, fd in enumerate(fds)}
    mac_port: dict[bytes, int] = {}
    free_at = [0.0] * len(fds)
    queued = [0] * len(fds)
    heap: list[tuple[float, int, int, int, bytes]] = []
    seq = forwarded = dropped = 0
    while not stop:
        now = time.monotonic()
        timeout = max(0.0, heap[0][0] - now) if heap else 0.5
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            i = port_of[fd]
            while True:
                try:
                    frame = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if len(frame) < 14:
                    continue
                dst, src = frame[:6], frame[6:12]
                mac_port[src] = i
                j = None if dst[0] & 1 else mac_port.get(dst)
                outs = [j] if j is not None else [k for k in range(len(fds)) if k != i]
                outs = [k for k in outs if k != i]
                if not outs:
                    continue
                if queued[i] >= a.queue:
                    dropped += 1
                    continue
                depart = max(now, free_at[i]) + 8 * len(frame) / rate
                free_at[i] = depart
                for k in outs:
                    heapq.heappush(heap, (depart + delay, seq, i, k, frame))
                    queued[i] += 1
                    seq += 1
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, i, k, frame = heapq.heappop(heap)
            queued[i] -= 1
            try:
                os.write(fds[k], frame)
                forwarded += 1
            except OSError:
                dropped += 1
    print(f"forwarded {forwarded} frames, dropped {dropped}", file=sys.stderr, flush=True)
    return 0


def _run(cmd: Sequence[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


class WifiLab:
    """n network namespaces, one TAP each, joined by the delaying switch (``_hub_main``)."""

    def __init__(self, tag: str, n: int, delay_ms: float, rate_mbit: float) -> None:
        self.tag, self.n = tag, n
        self.delay_ms, self.rate_mbit = delay_ms, rate_mbit
        self.namespaces = [f"{tag}-n{i}" for i in range(n)]
        self.taps = [f"{tag}t{i}" for i in range(n)]
        self.hosts = [f"{WIFI_SUBNET}.{i + 2}" for i in range(n)]
        self.made: list[str] = []
        self.hub: subprocess.Popen[str] | None = None

    def __enter__(self) -> WifiLab:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        if shutil.which("ip") is None:
            raise BenchError("the `ip` tool (iproute2) is missing")
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            self.made.append(ns)
        self.hub = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_hub", "--taps",
             ",".join(self.taps), "--delay-ms", str(self.delay_ms), "--rate-mbit",
             str(self.rate_mbit)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert self.hub.stdout is not None
        line = self.hub.stdout.readline()
        if line.strip() != "ready":
            err = self.hub.stderr.read() if self.hub.stderr else ""
            raise BenchError(f"the switch did not start: {line!r} {err[-2000:]}")
        for ns, tap, host in zip(self.namespaces, self.taps, self.hosts, strict=True):
            _run(["ip", "link", "set", tap, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{host}/24", "dev", tap])
            _run(["ip", "-n", ns, "link", "set", tap, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def close(self) -> None:
        if self.hub is not None and self.hub.poll() is None:
            self.hub.send_signal(signal.SIGTERM)
            try:
                self.hub.wait(10)
            except subprocess.TimeoutExpired:
                self.hub.kill()
                self.hub.wait(5)
        for ns in reversed(self.made):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                 check=False)
            if res.returncode != 0:
                print(f"[bench] warning: could not delete netns {ns}: {res.stderr.strip()}",
                      file=sys.stderr)
        self.made.clear()


# -- llama.cpp reference ------------------------------------------------------------------------


def _llama_main(argv: Sequence[str]) -> int:
    """llama.cpp (its own default settings, mmap) decoding greedily; run inside the memory
    group. ``--no-repack`` is llama.cpp's ``--no-repack``: its default copies the matrices it
    can repack into anonymous memory, which a limit below the model's size cannot hold."""
    p = argparse.ArgumentParser(prog="bench_cluster.py _llama")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--cgroup", default=None)
    p.add_argument("--no-repack", action="store_true")
    a = p.parse_args(argv)
    import numpy as np

    from prima_node.model_file import ModelFile
    from prima_node.reference import LlamaCpp
    from prima_node.text.tokenizer import Tokenizer

    with contextlib.closing(ModelFile.open(a.model)) as mf:
        ids = Tokenizer.from_model_file(mf).encode(PROMPT)  # llama.cpp's ids (tested parity)
    llm = LlamaCpp.defaults(a.model, n_ctx=CTX, threads=a.threads,
                            repack=False if a.no_repack else None)
    cgroups = [a.cgroup] if a.cgroup else []
    # warm-up: a few tokens (the first touches every page), as the engine's runs have
    llm.greedy(ids, 4)
    llm.reset()
    token = int(np.argmax(llm.eval(ids)))
    first = snapshot([os.getpid()], cgroups)
    t0 = time.perf_counter()
    steps = []
    for _ in range(a.tokens - 1):  # never stops at end-of-generation
        t = time.perf_counter()
        token = int(np.argmax(llm.eval([token])))
        steps.append(1e3 * (time.perf_counter() - t))
    t_end = time.perf_counter()
    last = snapshot([os.getpid()], cgroups)
    llm.close()
    print(json.dumps({"tokens": a.tokens, "ms_per_token": 1e3 * (t_end - t0) / (a.tokens - 1),
                      "median_gap_ms": statistics.median(steps),
                      "counters": counter_delta(first, last)}))
    return 0


# -- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    variant: str
    nodes: int
    k: int | None
    threads: int
    ms_per_token: float | None = None
    server_ms_per_token: float | None = None
    vs_one_node: float | None = None
    vs_llama: float | None = None
    disk_mb_per_token: float | None = None
    majflt_per_token: float | None = None
    cg_majflt_per_token: float | None = None
    psi_some_pct: float | None = None
    psi_full_pct: float | None = None
    predicted_ms: float | None = None
    status_ms: float | None = None
    ttft_s: float | None = None  # prefill: time to the first token of a long prompt
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def row_from(scenario: str, variant: str, nodes: int, threads: int, m: dict[str, Any],
             note: str = "") -> Row:
    runs = m["runs"]
    ms = statistics.median(r["ms_per_token"] for r in runs)
    srv = [r["server_ms_per_token"] for r in runs if r.get("server_ms_per_token") is not None]
    steps = sum(max(r["tokens"] - 1, 1) for r in runs)
    rb = sum(sum(r["counters"]["read_bytes"].values()) for r in runs)
    mf = sum(sum(r["counters"]["majflt"].values()) for r in runs)
    cgm = [sum(c["pgmajfault"] for c in r["counters"]["cgroup"].values()) for r in runs
           if r["counters"]["cgroup"]]
    window = sum(r["counters"]["window_s"] for r in runs)
    some = sum(r["counters"]["psi_some_pct"] * r["counters"]["window_s"] for r in runs) / window
    full = sum(r["counters"]["psi_full_pct"] * r["counters"]["window_s"] for r in runs) / window
    cluster = (m.get("status") or {}).get("cluster") or {}
    plan = cluster.get("plan") or {}
    held = [nd.get("layer_count") for nd in cluster.get("nodes", []) if nd.get("layer_count")]
    if len(held) > 1:
        note = (note + "; " if note else "") + "layers " + "+".join(map(str, held))
    if nodes > 1 and len(held) != nodes:
        note = ((note + "; " if note else "")
                + f"WARNING: only {len(held)} of {nodes} nodes hold layers")
    return Row(scenario, variant, nodes, plan.get("k", 1 if nodes == 1 else None), threads,
               ms_per_token=ms, server_ms_per_token=statistics.median(srv) if srv else None,
               disk_mb_per_token=rb / 1e6 / steps, majflt_per_token=mf / steps,
               cg_majflt_per_token=sum(cgm) / steps if cgm else None,
               psi_some_pct=some, psi_full_pct=full,
               predicted_ms=plan.get("predicted_ms_per_token"),
               status_ms=plan.get("measured_ms_per_token"), note=note,
               detail={"runs": runs, "cluster": cluster or None})


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: Sequence[Row]) -> str:
    head = ["scenario", "variant", "nodes", "k", "thr", "ms/tok", "server", "÷1node",
            "÷llama", "disk MB/tok", "majflt/tok", "PSI some/full %", "pred ms", "status ms",
            "TTFT s"]
    body = []
    for r in rows:
        psi = ("-" if r.psi_some_pct is None
               else f"{r.psi_some_pct:.1f}/{_f(r.psi_full_pct, '.1f')}")
        body.append([r.scenario, r.variant, str(r.nodes), _f(r.k, "d"), str(r.threads),
                     _f(r.ms_per_token, ".1f"), _f(r.server_ms_per_token, ".1f"),
                     _f(r.vs_one_node, ".2f"), _f(r.vs_llama, ".2f"),
                     _f(r.disk_mb_per_token, ".1f"), _f(r.majflt_per_token, ".0f"), psi,
                     _f(r.predicted_ms, ".1f"), _f(r.status_ms, ".1f"), _f(r.ttft_s, ".2f")])
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i])
              for i in range(len(head))]
    right = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    notes = [f"  [{r.scenario}/{r.variant}] {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


# -- scenarios ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    model: Path
    eog: list[int]
    scratch: Path
    tag: str
    log: Callable[[str], None]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def one_node_ms(self, threads: int) -> float | None:
        for r in self.rows:
            if r.scenario == "ring" and r.nodes == 1 and r.threads == threads:
                return r.ms_per_token
        return None


def scenario_ring(ctx: Ctx) -> None:
    a = ctx.args
    for threads in a.threads:
        for n in a.nodes:
            name = f"ring{n}-t{threads}"
            ctx.log(f"ring: {n} node(s), {threads} thread(s) each")
            measured: list[tuple[str, dict[str, Any]]] = []
            try:
                with Cluster(name, ctx.scratch, [ctx.model] * n, threads) as cl:
                    measured.append(("loopback" if n > 1 else "alone",
                                     measure(cl.head.url, a.tokens, a.repeats, ctx.eog, cl.pids,
                                             [])))
                    for k in (a.ring_k if n > 1 else []):
                        ctx.log(f"ring: {n} nodes, planning again with k={k}")
                        post_json(cl.head.url + "/api/plan", {"k": k})
                        measured.append((f"loopback, forced k={k}",
                                         measure(cl.head.url, a.tokens, a.repeats, ctx.eog,
                                                 cl.pids, [])))
                    cl.check_alive()
            except BenchError as exc:
                ctx.log(f"ring: {name} failed: {exc}")
                ctx.rows.append(Row("ring", f"{n} node(s)", n, None, threads,
                                    note=f"failed: {_first_line(exc)}"))
            for variant, m in measured:
                row = row_from("ring", variant, n, threads, m)
                one = ctx.one_node_ms(threads)
                if one and row.ms_per_token:
                    row.vs_one_node = row.ms_per_token / one
                ctx.rows.append(row)
                ctx.log(f"ring: {n} node(s), {variant}: {row.ms_per_token:.1f} ms/token")


def scenario_wifi(ctx: Ctx) -> None:
    a = ctx.args
    threads = a.threads[0]
    n = a.wifi_nodes
    with WifiLab(ctx.tag, n, a.wifi_delay_ms, a.wifi_rate_mbit) as lab:
        ctx.log(f"wifi: {n} namespaces, one-way {a.wifi_delay_ms} ms, "
                f"{a.wifi_rate_mbit} Mbit/s per sender")
        with Cluster("wifi", ctx.scratch, [ctx.model] * n, threads, hosts=lab.hosts,
                     netns=lab.namespaces) as cl:
            done: set[int] = set()  # rounds measured (Halda's choice included)
            for want in a.wifi_k:
                k: int | None = None if want == "plan" else int(want)
                if k is not None and k in done:
                    continue
                if k is not None or done:  # the first measurement uses the start-up plan
                    ctx.log(f"wifi: planning again with k={k if k is not None else 'Halda'}")
                    _replan_in(lab.namespaces[0], cl.head.url, k)
                m = measure_in(lab.namespaces[0], cl.head.url, a.tokens, a.repeats, ctx.eog,
                               cl.pids, [])
                cl.check_alive()
                row = row_from("wifi", "Halda k" if k is None else f"forced k={k}", n, threads,
                               m, note=(f"one-way delay {a.wifi_delay_ms} ms, "
                                        f"{a.wifi_rate_mbit} Mbit/s per sender (user-space "
                                        "switch)" if not done else ""))
                one = ctx.one_node_ms(threads)
                if one and row.ms_per_token:
                    row.vs_one_node = row.ms_per_token / one
                if row.k is not None:
                    done.add(row.k)
                ctx.rows.append(row)
                ctx.log(f"wifi: k={row.k}: {row.ms_per_token:.1f} ms/token, Halda predicted "
                        f"{_f(row.predicted_ms, '.1f')}")


def stream_answer(base_url: str, prompt: str, tokens: int,
                  on_piece: Callable[[int], None] | None = None) -> tuple[str, list[float]]:
    """A greedy streamed chat answer of at most ``tokens`` tokens: its text and the seconds
    between its pieces after the first (the pauses)."""
    import openai

    with openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0,
                       timeout=600) as client:
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
            temperature=0, stream=True)
        text: list[str] = []
        gaps: list[float] = []
        last: float | None = None
        for chunk in stream:
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            text.append(chunk.choices[0].delta.content)
            if on_piece is not None:
                on_piece(len(text))
    return "".join(text), gaps


def time_to_first_token(base_url: str, prompt: list[int]) -> float:
    """Seconds from sending a prompt (token ids) to its one-token answer."""
    t0 = time.perf_counter()
    post_json(base_url + "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 1,
                                             "temperature": 0}, timeout=3600)
    return time.perf_counter() - t0


def scenario_prefill(ctx: Ctx) -> None:
    """A long prompt's time to first token: one node (one thread, then every core), and a
    ring with its prompt pipelined in micro-batches and sent whole one node at a time (as
    before). Every prompt starts with another token, so no cache serves any of it."""
    a = ctx.args
    n_tok, nodes = a.prefill_tokens, a.prefill_nodes
    cores = os.cpu_count() or 1
    base = [1000 + (i * 7919) % 20000 for i in range(n_tok)]
    counter = itertools.count(1)
    setups = [("one node", 1, 1, []), (f"one node, {cores} threads", 1, cores, []),
              ("ring, whole chunks (before)", nodes, 1, ["--prefill-pipeline", "off"]),
              ("ring, pipelined", nodes, 1, ["--prefill-pipeline", "on"])]
    results: dict[str, float] = {}
    for variant, count, threads, extra in setups:
        if extra and not serve_has("--prefill-pipeline"):
            continue
        ctx.log(f"prefill: {variant}")
        try:
            with Cluster(f"prefill-{len(ctx.rows)}", ctx.scratch, [ctx.model] * count,
                         threads, extra=extra if count > 1 else [], ctx=n_tok + 64) as cl:
                time_to_first_token(cl.head.url, [next(counter) + 50, *base[:64]])  # warm-up
                times = [time_to_first_token(cl.head.url, [next(counter) + 50, *base])
                         for _ in range(a.repeats)]
                status = get_json(cl.head.url + "/api/status")
        except BenchError as exc:
            ctx.rows.append(Row("prefill", variant, count, None, threads,
                                note=f"failed: {_first_line(exc)}"))
            continue
        ttft = statistics.median(times)
        results[variant] = ttft
        plan = ((status.get("cluster") or {}).get("plan") or {})
        held = [nd.get("layer_count") for nd in (status.get("cluster") or {}).get("nodes", [])]
        row = Row("prefill", variant, count, plan.get("k", 1 if count == 1 else None), threads,
                  ttft_s=ttft, note=f"{n_tok}-token prompt, runs "
                  + ", ".join(f"{t:.2f}" for t in times) + " s"
                  + (f"; layers {'+'.join(map(str, held))}" if count > 1 else ""))
        ctx.rows.append(row)
        ctx.log(f"prefill: {variant}: {ttft:.2f} s")
    piped = results.get("ring, pipelined")
    before = results.get("ring, whole chunks (before)")
    if piped and before:
        ctx.notes.append(f"prefill: pipelined ring / ring before = {piped / before:.2f} "
                         "(target <= 0.5)")
    for variant in ("one node", f"one node, {cores} threads"):
        if piped and results.get(variant):
            ctx.notes.append(f"prefill: pipelined ring / {variant} = "
                             f"{piped / results[variant]:.2f} (target <= 1.3)")


def scenario_kills(ctx: Ctx) -> None:
    """A worker killed (SIGKILL) in the middle of each of ``--kills`` streamed answers and
    started again before the next: every answer must be the undisturbed one (greedy), and
    each pause at most 5 s plus the time the head spent evaluating the conversation again."""
    import random

    a = ctx.args
    rng = random.Random(2026)
    prompt = "Tell me a long story about a lighthouse keeper and her cat."
    with Cluster("kills", ctx.scratch, [ctx.model] * a.kill_nodes, a.threads[0]) as cl:
        reference, _ = stream_answer(cl.head.url, prompt, a.kill_tokens)
        if len(reference) < 40:
            raise BenchError(f"the reference answer is too short to interrupt: {reference!r}")
        pieces = len(stream_answer(cl.head.url, prompt, a.kill_tokens)[1]) + 1
        results: list[dict[str, Any]] = []
        for i in range(a.kills):
            victim = cl.nodes[1 + i % (len(cl.nodes) - 1)]
            at = rng.randrange(3, max(4, pieces - 3))
            port = (victim.address or ":").rsplit(":", 1)[1]

            def kill(n: int, v: Node = victim, at: int = at) -> None:
                if n == at and v.alive():
                    v.proc.kill()

            log_before = len(cl.head.lines)
            text, gaps = stream_answer(cl.head.url, prompt, a.kill_tokens, kill)
            replayed = [float(m.group(1)) for line in cl.head.lines[log_before:]
                        if (m := re.search(r"evaluated \d+ position\(s\) again in "
                                           r"([\d.]+) s", line))]
            pause = max(gaps) if gaps else 0.0
            ok = text == reference
            results.append({"kill": i + 1, "at_piece": at, "same_answer": ok,
                            "pause_s": round(pause, 3), "replay_s": replayed,
                            "pause_minus_replay_s": round(pause - sum(replayed), 3)})
            ctx.log(f"kills: {i + 1}/{a.kills}: {victim.spec.name} killed at piece {at}: "
                    f"{'same answer' if ok else 'ANSWER DIFFERS'}, pause {pause:.2f} s, "
                    f"evaluating again {sum(replayed):.2f} s")
            victim.proc.wait(10)
            victim.stop()
            restarted = Node(replace(victim.spec, extra=[*victim.spec.extra, "--port", port]),
                             ctx.scratch)
            cl.nodes[cl.nodes.index(victim)] = restarted
            restarted.wait_ready(120)
            _wait_online(cl.head.url, len(cl.nodes), 60)
    same = sum(r["same_answer"] for r in results)
    worst = max((r["pause_minus_replay_s"] for r in results), default=0.0)
    ctx.details["kills"] = results
    ctx.rows.append(Row("kills", f"{a.kills} kills", a.kill_nodes, None, a.threads[0],
                        note=f"{same}/{a.kills} answers identical to the undisturbed one; "
                             f"longest pause beyond evaluating again {worst:.2f} s "
                             f"(target <= 5 s); pauses "
                             + ", ".join(f"{r['pause_s']:.1f}" for r in results) + " s"))


def _wait_online(base_url: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            nodes = get_json(base_url + "/api/status")["cluster"]["nodes"]
            if sum(1 for nd in nodes if nd.get("online")) >= n:
                return
        time.sleep(0.2)
    raise BenchError(f"the head did not see {n} nodes online within {timeout:.0f} s")


def _replan_in(netns: str, url: str, k: int | None) -> None:
    """POST /api/plan from inside the head's namespace."""
    body = json.dumps({"k": k} if k is not None else {})
    code = ("import sys,urllib.request as u;r=u.Request(sys.argv[1]+'/api/plan',"
            "data=sys.argv[2].encode(),headers={'Content-Type':'application/json'});"
            "print(u.urlopen(r,timeout=600).read().decode()[:200])")
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, url, body],
                         capture_output=True, text=True, timeout=900, check=False)
    if res.returncode != 0:
        raise BenchError(f"POST /api/plan k={k} failed: {res.stderr[-1500:]}")


_SERVE_HELP: list[str] = []


def serve_has(flag: str) -> bool:
    """Whether this checkout's ``prima-node serve`` knows a flag (the product is moving)."""
    if not _SERVE_HELP:
        res = subprocess.run([sys.executable, "-m", "prima_node.cli", "serve", "--help"],
                             cwd=ROOT, capture_output=True, text=True, check=False)
        _SERVE_HELP.append(res.stdout)
    return flag in _SERVE_HELP[0]


def _repacked_bytes(base_url: str, wait_s: float = 15.0) -> dict[str, int]:
    """Each node's repacked copies by name, once every node has reported since holding its
    windows (a worker's figures reach the head with its next poll, every 2 s)."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = get_json(base_url + "/api/status")["cluster"]["nodes"]
        if all(n.get("paging") is not None for n in nodes) or time.monotonic() > deadline:
            return {n["name"]: n.get("repacked_bytes") or 0 for n in nodes}
        time.sleep(0.5)


def _anon_bytes(cg: Path) -> int:
    st = _cg_stat(cg)
    return st.get("total_rss", st.get("rss", 0))


def scenario_memory(ctx: Ctx) -> None:
    a = ctx.args
    n = a.mem_nodes
    MemoryGroups(ctx.tag)  # no memory cgroup to work in: say so before copying gigabytes
    disks = a.disk * n if len(a.disk) == 1 else a.disk
    if len(disks) != n:
        raise BenchError(f"--disk gives {len(a.disk)} speeds for {n} nodes")
    copies = model_copies(ctx.model, n, ctx.log)
    # every node measures its own (throttled) disk afresh: no profile from another run
    old_cache = os.environ.get("PRIMA_PROFILE_CACHE")
    os.environ["PRIMA_PROFILE_CACHE"] = str(ctx.scratch / "profiles-memory")
    try:
        with DiskGroups(f"{ctx.tag}-disk") as dg:
            io = [dg.make(f"n{i}", c, mb) for i, (c, mb) in enumerate(zip(copies, disks,
                                                                          strict=True))]
            ctx.log("memory: node disks " + ", ".join(f"{mb:g} MB/s" for mb in disks))
            _memory_rows(ctx, copies, io, disks)
    finally:
        if old_cache is None:
            os.environ.pop("PRIMA_PROFILE_CACHE", None)
        else:
            os.environ["PRIMA_PROFILE_CACHE"] = old_cache


def _memory_rows(ctx: Ctx, copies: list[Path], io: list[Path], disks: list[float]) -> None:
    """The memory scenario's rows, every node in its blkio group ``io`` (its own disk)."""
    from prima_node.planner.model_profile import ModelProfile

    a = ctx.args
    threads = a.threads[0]
    n = a.mem_nodes
    size = ctx.model.stat().st_size
    mp = ModelProfile.load(ctx.model)
    # the layers are shared out; the output projection is the head's alone, wherever the
    # layers go, so the head (a home's biggest device) has room for it on top of its share
    share = (size - mp.output_bytes) / n
    budget = int(a.mem_frac * share)
    head_budget = budget + mp.output_bytes
    if size < 2 * head_budget:
        ctx.log(f"memory: warning: the model ({size / 2**20:.0f} MiB) is less than twice the "
                f"head's page budget ({head_budget / 2**20:.0f} MiB): lower --mem-frac")
    has_prefetch = serve_has("--prefetch")
    info: dict[str, Any] = {"copies": [str(c) for c in copies], "share_bytes": int(share),
                            "disk_mb_per_s": disks,
                            "page_budget_bytes": budget, "prefetch_flag": has_prefetch,
                            "layer_bytes_mean": mp.mean_layer_bytes,
                            "output_bytes": mp.output_bytes}
    ctx.details["memory"] = info

    def drop_all() -> None:
        from prima_node.device.disk import resident_fraction

        for c in copies:
            drop_pages(c)
        left = max(resident_fraction(c) for c in copies)
        info.setdefault("resident_after_drop", []).append(round(left, 4))
        if left > 0.01:
            ctx.log(f"memory: warning: {left:.0%} of a copy stayed in the page cache after "
                    "dropping it (mapped by another process?)")

    # calibration: the same ring without limits, to learn each node's own (anonymous) memory;
    # it also fills the device-profile cache for each copy (the profile's 256 MiB bandwidth
    # buffer would not fit under the limits)
    ctx.log(f"memory: calibrating {n} nodes without limits")
    drop_all()
    with MemoryGroups(f"{ctx.tag}-cal") as groups:
        cgs = [groups.make(f"n{i}", None) for i in range(n)]
        with Cluster("mem-cal", ctx.scratch, copies, threads, cgroups=cgs, io_groups=io) as cl:
            measure(cl.head.url, 4, 1, ctx.eog, [], [])
            # without limits every node holds its windows resident and repacks them: those
            # copies are weights, not its own memory (under the limits it does not repack)
            repacked = _repacked_bytes(cl.head.url)
            anon = [_anon_bytes(cg) - repacked.get(node.spec.name, 0)
                    for cg, node in zip(cgs, cl.nodes, strict=True)]
            info["repacked_bytes"] = [repacked.get(node.spec.name, 0) for node in cl.nodes]
    slack = a.mem_slack_mb << 20
    limits = [x + slack + (head_budget if i == 0 else budget) for i, x in enumerate(anon)]
    # room for an even split to fit (k = 1 must fit: the planner never plans a thrashing k=1)
    fit = [x + slack + mp.scratch_bytes(256) + int(1.1 * share)
           + (mp.output_bytes if i == 0 else 0) for i, x in enumerate(anon)]
    info.update(anon_bytes=anon, limits_bytes=limits, slack_bytes=slack,
                fit_plan_limits_bytes=fit)
    ctx.log("memory: limits " + ", ".join(f"{x / 2**20:.0f} MiB" for x in limits)
            + f" (own memory + {slack >> 20} MiB slack + {a.mem_frac:.0%} of a "
            f"{share / 2**20:.0f} MiB share of the layers; the head also the "
            f"{mp.output_bytes / 2**20:.0f} MiB output projection)")
    limit_note = (f"limits {'/'.join(f'{x / 2**20:.0f}' for x in limits)} MiB = each node's "
                  f"own memory + {slack >> 20} + a page budget of {a.mem_frac:.0%} of its "
                  f"{share / 2**20:.0f} MiB share of the layers ({budget / 2**20:.0f} MiB; the "
                  f"head {head_budget / 2**20:.0f} MiB with the output): the model is "
                  f"{size / head_budget:.1f}x the head's budget")

    def ring(variant: str, rounds: int | None, extra: list[str], note: str,
             plan_limits: Sequence[int]) -> None:
        """The ring in memory groups limited to ``plan_limits`` at start-up (what Halda plans
        with), lowered to ``limits`` after the warm-up answer when they differ."""
        drop_all()
        with MemoryGroups(f"{ctx.tag}-{len(ctx.rows)}") as groups:
            cgs = [groups.make(f"n{i}", lim) for i, lim in enumerate(plan_limits)]

            def lower() -> None:
                for cg, lim in zip(cgs, limits, strict=True):
                    try:
                        (cg / "memory.limit_in_bytes").write_text(str(lim))
                    except OSError as exc:
                        raise BenchError(f"cannot lower {cg.name}'s limit to {lim >> 20} MiB: "
                                         f"{exc}") from None

            try:
                # Halda's rows: Halda also chooses which nodes take part (all three cannot
                # share 16 layers in equal rounds when a node holds at most one layer a round)
                with Cluster(f"mem-{len(ctx.rows)}", ctx.scratch, copies, threads,
                             rounds=rounds, extra=extra, cgroups=cgs, io_groups=io,
                             all_nodes=rounds is not None) as cl:
                    m = measure(cl.head.url, a.mem_tokens, 1, ctx.eog, cl.pids,
                                [str(c) for c in cgs],
                                after_warmup=lower if list(plan_limits) != limits else None)
                    cl.check_alive()
                    m["cgroups"] = [_cg_summary(c) for c in cgs]
            except BenchError as exc:
                ctx.log(f"memory: {variant} failed: {exc}")
                ctx.rows.append(Row("memory", variant, n, rounds, threads,
                                    note=f"failed: {_first_line(exc)}"))
                return
        row = row_from("memory", variant, n, threads, m, note)
        row.detail["cgroups"] = m["cgroups"]
        nodes_view = (row.detail.get("cluster") or {}).get("nodes", [])
        regimes = [nd.get("regime") for nd in nodes_view]
        profiled = [nd.get("disk_read_bytes_per_s") for nd in nodes_view]
        if profiled and all(isinstance(x, (int, float)) for x in profiled):
            row.note = (row.note + "; " if row.note else "") + "profiled disks " + "/".join(
                f"{x / 1e6:.0f}" for x in profiled) + " MB/s"
        if regimes:
            row.note = (row.note + "; " if row.note else "") + "Halda regimes " + ",".join(
                str(x) for x in regimes)
        paging = [nd.get("paging") or {} for nd in nodes_view]
        if any(pg.get("enabled") for pg in paging):
            row.note += "; pager " + ", ".join(
                f"{pg.get('mode')} hit {_f(pg.get('hit_rate'), '.2f')}" for pg in paging)
        ctx.rows.append(row)
        ctx.log(f"memory: {variant}: {row.ms_per_token:.1f} ms/token, "
                f"{row.disk_mb_per_token:.1f} MB read/token")

    on = ["--prefetch", "on"] if has_prefetch else []
    off = ["--prefetch", "off"] if has_prefetch else []
    # Halda plans with the real limits, as the product runs
    if has_prefetch:
        ring("halda, prefetch", None, on, limit_note, limits)
        ring("halda, no prefetch", None, off, "", limits)
    else:
        ring("halda", None, [], limit_note + "; serve has no --prefetch flag (engine default)",
             limits)
    # (c): k = 1, an even split planned where it fits, then the real limits
    for k in a.mem_k:
        ring(f"k={k}, even split", k, on,
             "planned with room for a 1.1x share, then the real limit" if k == a.mem_k[0]
             else "", fit)

    # one node alone, then llama.cpp alone, under the head's limit (page budget of one share)
    alone_limit = limits[0]
    drop_all()
    with MemoryGroups(f"{ctx.tag}-alone") as groups:
        cg = groups.make("single", alone_limit)
        try:
            with Cluster("mem-alone", ctx.scratch, copies[:1], threads, cgroups=[cg],
                         io_groups=io[:1]) as cl:
                m = measure(cl.head.url, a.mem_tokens, 1, ctx.eog, cl.pids, [str(cg)])
                cl.check_alive()
                summary = _cg_summary(cg)
            row = row_from("memory", "alone (prima)", 1, threads, m,
                           f"whole model under one node's limit ({alone_limit / 2**20:.0f} MiB)")
            row.detail["cgroups"] = [summary]
            ctx.rows.append(row)
            ctx.log(f"memory: alone: {row.ms_per_token:.1f} ms/token")
        except BenchError as exc:
            ctx.rows.append(Row("memory", "alone (prima)", 1, 1, threads,
                                note=f"failed: {_first_line(exc)}"))
    llama_row = _llama_under_limit(ctx, copies[0], alone_limit, threads, io[0])
    if llama_row is not None:
        ctx.rows.append(llama_row)
        for r in ctx.rows:
            if r.scenario == "memory" and r.ms_per_token and llama_row.ms_per_token:
                r.vs_llama = r.ms_per_token / llama_row.ms_per_token
    _memory_targets(ctx)


def _memory_targets(ctx: Ctx) -> None:
    """The memory scenario's figures against the issue's targets, one line each."""
    rows = {r.variant: r for r in ctx.rows if r.scenario == "memory"}
    on, off = rows.get("halda, prefetch"), rows.get("halda, no prefetch")
    llama = rows.get("alone (llama.cpp)")
    if on and llama and on.ms_per_token and llama.ms_per_token:
        ctx.notes.append(f"memory: llama.cpp alone / Halda with prefetch = "
                         f"{llama.ms_per_token / on.ms_per_token:.1f}x (target >= 5)")
    if on and off and on.ms_per_token and off.ms_per_token:
        ctx.notes.append(f"memory: no prefetch / prefetch = "
                         f"{off.ms_per_token / on.ms_per_token:.2f}x (target >= 1.5)")
    for r in rows.values():
        if r.predicted_ms and r.ms_per_token:
            ctx.notes.append(f"memory: {r.variant}: Halda predicted {r.predicted_ms:.0f} ms, "
                             f"measured {r.ms_per_token:.0f} ms "
                             f"({r.predicted_ms / r.ms_per_token - 1:+.0%}; target within 25 %)")


def _cg_summary(cg: Path) -> dict[str, Any]:
    def read(name: str) -> int | None:
        try:
            return int((cg / name).read_text())
        except (OSError, ValueError):
            return None

    st = _cg_stat(cg)
    return {"cgroup": cg.name, "limit": read("memory.limit_in_bytes"),
            "max_usage": read("memory.max_usage_in_bytes"), "failcnt": read("memory.failcnt"),
            "rss": st.get("rss"), "cache": st.get("cache"), "mapped_file": st.get("mapped_file"),
            "pgmajfault": st.get("pgmajfault")}


def _llama_under_limit(ctx: Ctx, model: Path, limit: int, threads: int, io_group: Path
                       ) -> Row | None:
    """llama.cpp alone under the head's limits, as its user would run it: its defaults, and
    where the OOM killer ends those (its repacked copy is anonymous memory, which a limit below
    the model's size cannot hold), again with ``--no-repack``."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        ctx.rows.append(Row("memory", "alone (llama.cpp)", 1, 1, threads,
                            note="llama_cpp is not installed"))
        return None
    how = "llama.cpp's defaults, mmap"
    res, summary = _llama_run(ctx, model, limit, threads, io_group, no_repack=False)
    if res.returncode == -signal.SIGKILL:
        ctx.log("memory: llama.cpp was killed (the OOM killer: its repacked copy is anonymous "
                "memory); again with --no-repack")
        how = ("llama.cpp with --no-repack, mmap (its defaults were killed by the OOM killer: "
               "the repacked copy does not fit)")
        res, summary = _llama_run(ctx, model, limit, threads, io_group, no_repack=True)
    if res.returncode != 0:
        tail = "\n".join(f"    | {x}" for x in res.stderr.splitlines()[-LOG_TAIL:])
        ctx.log(f"memory: llama.cpp failed ({res.returncode}):\n{tail}")
        return Row("memory", "alone (llama.cpp)", 1, 1, threads,
                   note=f"failed with status {res.returncode} (killed by the OOM killer if -9)")
    run = json.loads(res.stdout.strip().splitlines()[-1])
    row = row_from("memory", "alone (llama.cpp)", 1, threads, {"runs": [run], "status": None},
                   f"{how}, same limits as the head: {limit / 2**20:.0f} MiB, its disk")
    row.detail["cgroups"] = [summary]
    ctx.log(f"memory: llama.cpp alone: {row.ms_per_token:.1f} ms/token")
    return row


def _llama_run(ctx: Ctx, model: Path, limit: int, threads: int, io_group: Path, *,
               no_repack: bool) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    drop_pages(model)
    with MemoryGroups(f"{ctx.tag}-llama") as groups:
        cg = groups.make("llama", limit)
        cmd = in_groups([cg, io_group], [
            sys.executable, str(Path(__file__).resolve()), "_llama", "--model", str(model),
            "--threads", str(threads), "--tokens", str(ctx.args.mem_tokens), "--cgroup",
            str(cg), *(["--no-repack"] if no_repack else [])])
        ctx.log("memory: llama.cpp alone under the same limit"
                + (" (--no-repack)" if no_repack else ""))
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False,
                             start_new_session=True)
        return res, _cg_summary(cg)


# -- main ---------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem,
            "kernel": os.uname().release}


def _default_model(log: Callable[[str], None]) -> Path:
    if BENCH_MODEL.exists():
        return BENCH_MODEL
    from prima_node.synth.writer import write_model

    log(f"writing the benchmark model {BENCH_MODEL} (Llama-3.2-1B shapes, Q8_0, random "
        "weights; a few minutes, once)")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    return Path(write_model(BENCH_MODEL, "llama", "1b", "Q8_0"))


def _eog_ids(model: Path) -> list[int]:
    from prima_node.model_file import ModelFile
    from prima_node.text.tokenizer import Tokenizer

    mf = ModelFile.open(model)
    try:
        return sorted(Tokenizer.from_model_file(mf).eog_ids)
    finally:
        mf.close()


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _disk_speed(text: str) -> float:
    if text in DISK_PRESETS:
        return float(DISK_PRESETS[text])
    value = float(text)
    if value <= 0:
        raise ValueError(f"a disk speed must be positive, not {text}")
    return value


SCENARIOS = ("ring", "memory", "wifi", "prefill", "kills")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-cluster", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scenarios: ring (loopback overhead), memory (nodes with their own memory and "
               "disk limits vs one node and llama.cpp), wifi (namespaces with a delaying "
               "switch), prefill (a long prompt's first token), kills (workers killed "
               "mid-answer). The memory and wifi scenarios need root.")
    p.add_argument("--scenario", type=_csv(str), default=list(SCENARIOS),
                   help="comma-separated subset of ring,memory,wifi,prefill,kills (default: "
                        "all)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: fewer tokens, one repeat, 1 and 2 nodes, 1 thread")
    p.add_argument("--model", type=Path, default=None,
                   help=f"GGUF file (default {BENCH_MODEL}, written if missing)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per measured answer (default 32; quick 16)")
    p.add_argument("--repeats", type=int, default=None,
                   help="measured answers per configuration, median reported (default 3; "
                        "quick 1)")
    p.add_argument("--threads", type=_csv(int), default=None,
                   help="model threads per node; ring sweeps the list, memory and wifi use "
                        "the first (default 1,2; quick 1)")
    p.add_argument("--nodes", type=_csv(int), default=None,
                   help="ring: node counts (default 1,2,4; quick 1,2)")
    p.add_argument("--ring-k", type=_csv(int), default=[],
                   help="ring: also measure these forced rounds on each ring (POST /api/plan), "
                        "to price the extra hops (default: none, Halda's k only)")
    p.add_argument("--mem-nodes", type=int, default=3)
    p.add_argument("--mem-frac", type=float, default=1.0,
                   help="memory: page budget as a share of a node's equal share of the "
                        "layers (the head has room for the output projection besides); 1: "
                        "together the nodes can just hold the model, none of them alone, as "
                        "in the paper's home")
    p.add_argument("--mem-slack-mb", type=int, default=16,
                   help="memory: added to each node's measured own memory")
    p.add_argument("--mem-k", type=_csv(int), default=[1],
                   help="memory: rounds forced on an even split planned where it fits, then "
                        "run under the limits (default 1)")
    p.add_argument("--disk", type=_csv(_disk_speed), default=None,
                   help="memory: each node's disk read speed, MB/s or a preset "
                        f"({', '.join(f'{k} {v}' for k, v in DISK_PRESETS.items())}); one "
                        "value for all or one per node, the head first (default nvme,sata,sd: "
                        "a home's PC, a mini PC and a Pi). The machine's own disk is the "
                        "ceiling")
    p.add_argument("--mem-tokens", type=int, default=None,
                   help="memory: tokens per answer (default 12; quick 8)")
    p.add_argument("--wifi-nodes", type=int, default=3)
    p.add_argument("--wifi-delay-ms", type=float, default=3.0, help="one-way, per frame")
    p.add_argument("--wifi-rate-mbit", type=float, default=200.0, help="per sender")
    p.add_argument("--wifi-k", type=_csv(str), default=None,
                   help="wifi: rounds to measure, 'plan' = Halda's choice (default plan,1,4; "
                        "quick plan,1)")
    p.add_argument("--prefill-tokens", type=int, default=1500,
                   help="prefill: prompt tokens (default 1500: Home Assistant's system prompt)")
    p.add_argument("--prefill-nodes", type=int, default=3)
    p.add_argument("--kills", type=int, default=20, help="kills: answers, one kill in each")
    p.add_argument("--kill-nodes", type=int, default=3)
    p.add_argument("--kill-tokens", type=int, default=200, help="kills: tokens per answer")
    p.add_argument("--json", type=Path, default=None, help="also save the raw figures here")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the node logs (always kept when something failed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    internal = {"_hub": _hub_main, "_client": _client_main, "_llama": _llama_main}
    if argv and argv[0] in internal:
        return internal[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    defaults: dict[str, Any] = {"tokens": 32, "repeats": 3, "mem_tokens": 12, "threads": [1, 2],
                                "disk": [float(DISK_PRESETS[d]) for d in ("nvme", "sata", "sd")],
                                "nodes": [1, 2, 4], "wifi_k": ["plan", "1", "4"]}
    if args.quick:
        defaults.update(tokens=16, repeats=1, mem_tokens=8, threads=[1], nodes=[1, 2],
                        wifi_k=["plan", "1"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [s for s in args.scenario if s not in SCENARIOS]
    if unknown:
        build_parser().error(f"unknown scenario {unknown[0]!r} (choose from "
                             f"{','.join(SCENARIOS)})")
    if any(k != "plan" and not (k.isdigit() and int(k) >= 1) for k in args.wifi_k):
        build_parser().error("--wifi-k takes 'plan' and positive integers")
    if args.tokens < 2 or args.mem_tokens < 2:
        build_parser().error("--tokens and --mem-tokens must be at least 2")

    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[bench {time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    signalled: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if signalled:  # already cleaning up: let it finish
            log(f"signal {signum} again: still stopping what was started")
            return
        signalled.append(signum)
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    model = args.model.expanduser().resolve() if args.model else _default_model(log)
    if not model.is_file():
        print(f"bench-cluster: no model file {model}", file=sys.stderr)
        return 2
    tag = f"pbc{os.getpid() % 100000}"
    scratch = Path(f"/tmp/{tag}-{int(time.time())}")
    scratch.mkdir(parents=True)
    ctx = Ctx(args, model, _eog_ids(model), scratch, tag, log)
    machine = _machine()
    load_start = os.getloadavg()
    failed = False
    interrupted = False
    try:
        for name, fn in (("ring", scenario_ring), ("wifi", scenario_wifi),
                         ("memory", scenario_memory), ("prefill", scenario_prefill),
                         ("kills", scenario_kills)):
            if name not in args.scenario:
                continue
            try:
                fn(ctx)
            except BenchError as exc:
                failed = True
                log(f"{name}: {exc}")
                ctx.rows.append(Row(name, "-", 0, None, args.threads[0],
                                    note=f"did not run: {_first_line(exc)}"))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: everything started was stopped and removed")
    size = model.stat().st_size
    header = [
        f"prima cluster benchmark: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['mem_bytes'] / 2**30:.1f} GiB RAM, kernel {machine['kernel']}",
        f"model {model} ({size / 1e9:.2f} GB); {args.tokens} tokens per answer "
        f"(memory: {args.mem_tokens}), {args.repeats} measured answer(s) per ring/wifi "
        f"configuration after a warm-up answer; load average {load_start[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end (other work here makes figures noisy: compare "
        "rows of one run)",
        f"notes: all node processes share these {machine['cores']} cores (a ring computes one "
        "node at a time, so nodes mostly take turns); ms/tok = client-side mean decode step "
        "(first to last token), server = the head's timings; ÷1node and ÷llama are time "
        "ratios (<1 faster); disk = read_bytes from storage, majflt = major faults, both summed "
        "over the node processes per decode step; PSI is system-wide (% of the window), "
        "cgroup v1 has no per-group PSI; pred/status = Halda's predicted and the head's "
        "measured (EMA) ms/token from /api/status.",
    ]
    print("\n".join(header))
    print()
    print(format_table(ctx.rows))
    if ctx.notes:
        print("\n".join(["", "against the targets:", *(f"  {x}" for x in ctx.notes)]))
    if args.json is not None:
        doc = {"machine": machine, "model": {"path": str(model), "bytes": size},
               "loadavg": {"start": load_start, "end": os.getloadavg()},
               "args": {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in vars(args).items()},
               "rows": [asdict(r) for r in ctx.rows], "details": ctx.details,
               "interrupted": interrupted}
        args.json.write_text(json.dumps(doc, indent=1))
        log(f"raw figures in {args.json}")
    if failed or interrupted or args.keep_logs or any("failed" in r.note for r in ctx.rows):
        log(f"node logs kept in {scratch / 'logs'}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
