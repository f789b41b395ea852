"""Halda: which device runs which layers, how many on its GPU, and how many rounds a token makes.

The cost model starts from prima.cpp's (shared/prima-digest.md §2): a device computes its layers
at its measured speed per weight type; GPU layers run at GPU speed within free VRAM; a token goes
k times around the ring, L = k * sum(w). Three things differ from the paper's code:

- Each ring hop costs the measured link latency plus the activation bytes over the link's
  throughput, k hops per device per token, so more rounds are no longer free.
- Disk. In the paper's formula the re-read time (overflow bytes / disk speed) is added to the
  latency and depends on the layers a device holds, k * w, not on k, so more rounds could never
  pay. What makes them pay in the running system is prefetching: a device whose share does not
  fit streams it window by window, loading the next window while the token is elsewhere. That
  needs room for two windows (the one in use and the one arriving), and it costs latency only
  where streaming is slower than the rest of the token's path: latency = max(compute path +
  hops + output, each streaming device's bytes / disk speed). A window too big for two to fit
  would thrash the page cache and is not planned. Small windows (large k) make streaming
  possible on memory-poor devices; hops make large k expensive.
- The memory regimes (M1-M4) are not guessed and refined: a binary per device chooses "all its
  windows fit" or "it streams", inside one integer program per k, which is therefore exact over
  every regime at once; the regime each device ends in is reported. The paper's set-refinement
  and calibration loop, which can stop in a local optimum, is not needed.

Device selection is exact too for small clusters (every subset holding the head is solved);
above ``EXHAUSTIVE_DEVICES`` the paper's rule drops devices that hold a single layer and
re-solves. The ring order minimises the summed hop cost (exhaustive up to 7 devices, nearest
neighbour with 2-opt above); it does not interact with the layer assignment, whose cost does not
depend on the order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .model_profile import ModelProfile

EXHAUSTIVE_DEVICES = 5
MIN_DISK_BYTES_PER_S = 0.1e9  # below this, overflowing to disk is not an option (prima.cpp)


@dataclass(frozen=True)
class Device:
    """A device as the planner sees it (from a profile, or written by hand for what-ifs)."""

    name: str
    mem_available: float  # bytes the node can count on
    disk_bytes_per_s: float  # sequential on Linux, random page reads elsewhere
    cpu_flops: Mapping[str, float]  # decode FLOP/s by weight type
    os: str = "Linux"  # Linux | Android | macOS
    metal: bool = False  # macOS with Metal: GPU and CPU share memory
    gpu_flops: Mapping[str, float] | None = None
    vram_free: float = 0.0
    compute_buffer: float = 300 * 2**20  # activations and scratch, bytes
    gpu_compute_buffer: float = 0.0
    swap_out: float = 0.0  # Android: anonymous memory the OS can swap out for us

    @property
    def has_gpu(self) -> bool:
        return self.gpu_flops is not None and self.vram_free > 0


@dataclass(frozen=True)
class Link:
    latency_s: float
    bytes_per_s: float

    def hop_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Options:
    n_ctx: int = 4096
    k: int | None = None  # force the number of rounds
    head: int = 0  # index of the head device (holds embedding and output, samples)
    activation_bytes: int = 4  # float32 hidden states on the wire
    exhaustive_devices: int = EXHAUSTIVE_DEVICES


@dataclass
class DevicePlan:
    name: str
    window: int  # w_m: layers per round
    gpu_layers: int  # n_m: of those, on the GPU
    layers: int  # k * w_m
    regime: str  # M1..M4 (M4: everything fits in memory)
    compute_s: float
    disk_s: float
    network_s: float  # its outgoing hops, k per token
    memory_bytes: float  # what it holds: its layers (up to what fits), KV, buffers


@dataclass
class Plan:
    k: int
    ring: list[str]  # device names in ring order, the head first
    devices: list[DevicePlan]
    latency_s: float  # predicted per-token latency
    output_s: float  # the head's output projection
    dropped: dict[str, str] = field(default_factory=dict)  # device -> why
    n_layer: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "ring": self.ring, "latency_ms": round(1e3 * self.latency_s, 3),
                "output_ms": round(1e3 * self.output_s, 3), "n_layer": self.n_layer,
                "devices": [{**d.__dict__, "compute_ms": round(1e3 * d.compute_s, 3),
                             "disk_ms": round(1e3 * d.disk_s, 3),
                             "network_ms": round(1e3 * d.network_s, 3)} for d in self.devices],
                "dropped": self.dropped}


class PlanError(ValueError):
    """No assignment satisfies the constraints (e.g. not even disk can hold the model)."""


# -- per-device coefficients ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Coef:
    alpha: float  # s per layer per round on the CPU
    beta: float  # s per layer per round, GPU minus CPU (<= 0 usually)
    layer_mem: float  # b': bytes per layer (weights + KV)
    fixed_mem: float  # buffers (+ embedding row and output on the head)
    avail: float
    disk: float
    can_overflow: bool
    gpu_cap_bytes: float  # VRAM for layers (0 without a GPU)
    metal: bool


def _seconds(flops: Mapping[str, int], speed: Mapping[str, float], who: str) -> float:
    total = 0.0
    for t, f in flops.items():
        s = speed.get(t)
        if s is None or s <= 0:
            raise PlanError(f"{who} has no measured speed for {t} weights (profile it with the "
                            "model: prima-node profile --model M)")
        total += f / s
    return total


def _mean_flops(model: ModelProfile) -> dict[str, int]:
    acc: dict[str, int] = {}
    for layer in model.layers:
        for t, f in layer.flops_by_type.items():
            acc[t] = acc.get(t, 0) + f
    return {t: f // model.n_layer for t, f in acc.items()}


def _coefficients(dev: Device, model: ModelProfile, opts: Options, is_head: bool) -> _Coef:
    flops = _mean_flops(model)
    alpha = _seconds(flops, dev.cpu_flops, dev.name)
    beta = 0.0
    if dev.has_gpu:
        assert dev.gpu_flops is not None
        beta = _seconds(flops, dev.gpu_flops, f"{dev.name}'s GPU") - alpha
    layer_mem = model.mean_layer_bytes + model.kv_bytes_per_layer(opts.n_ctx)
    fixed = dev.compute_buffer + (model.embedding_row_bytes + model.output_bytes
                                  if is_head else 0.0)
    avail = dev.mem_available + (dev.swap_out if dev.os == "Android" else 0.0)
    gpu_cap = max(0.0, dev.vram_free - dev.gpu_compute_buffer) if dev.has_gpu else 0.0
    return _Coef(alpha, beta, layer_mem, fixed, avail, dev.disk_bytes_per_s,
                 dev.disk_bytes_per_s >= MIN_DISK_BYTES_PER_S, gpu_cap,
                 dev.os == "macOS" and dev.metal)


def _ram_layers(c: _Coef, w: float, n: float) -> float:
    """Layers counted against RAM: CPU layers, or all of them on unified memory (Metal)."""
    return w if c.metal else w - n


def _device_cost(c: _Coef, k: int, w: int, n: int) -> tuple[float, float, float] | None:
    """(compute s, disk streaming s, bytes streamed) per token for a window of w layers with n
    on the GPU; None if the device cannot run it.

    Either everything it holds fits in memory, or it streams what does not fit from disk while
    the token is elsewhere in the ring, which needs room for the window in use and the next one
    being prefetched (prima.cpp's prefetch-release); a window too big for that would thrash the
    page cache, so it is not a plan.
    """
    if n > w or k * n * c.layer_mem > c.gpu_cap_bytes + 1e-6:
        return None
    compute = k * (c.alpha * w + c.beta * n)
    ram = _ram_layers(c, w, n) * c.layer_mem
    if k * ram + c.fixed_mem <= c.avail:
        return compute, 0.0, 0.0
    if not c.can_overflow or 2 * ram + c.fixed_mem > c.avail:
        return None
    streamed = (k + 2) * ram + c.fixed_mem - c.avail
    return compute, streamed / c.disk, streamed


# -- the integer program ----------------------------------------------------------------------


def _solve_k(coefs: Sequence[_Coef], k: int, W: int, base: float
             ) -> tuple[float, list[int], list[int]] | None:
    """Exact min of T = max(compute + base, each device's streaming time) for fixed k.

    Variables: w_m, n_m (integer), z_m (1: everything fits), s_m >= 0 (streaming seconds), T.
    Memory rows are in GB to keep the program well scaled.
    """
    M = len(coefs)
    iw, i_n, iz, i_s, iT = 0, M, 2 * M, 3 * M, 4 * M
    nvar = 4 * M + 1
    c = np.zeros(nvar)
    c[iT] = 1.0
    lo = np.zeros(nvar)
    hi = np.full(nvar, np.inf)
    rows: list[np.ndarray] = []
    rlo: list[float] = []
    rhi: list[float] = []

    def row(coeffs: dict[int, float], low: float, high: float) -> None:
        r = np.zeros(nvar)
        for i, v in coeffs.items():
            r[i] = v
        rows.append(r)
        rlo.append(low)
        rhi.append(high)

    row(dict.fromkeys(range(M), 1.0), W, W)
    compute: dict[int, float] = {iT: 1.0}
    for m, cf in enumerate(coefs):
        lo[iw + m], hi[iw + m] = 1, W
        hi[i_n + m] = math.floor(cf.gpu_cap_bytes / (k * cf.layer_mem) + 1e-9) \
            if cf.gpu_cap_bytes else 0
        lo[iz + m], hi[iz + m] = (0, 1) if cf.can_overflow else (1, 1)
        compute[iw + m] = -k * cf.alpha
        compute[i_n + m] = -k * cf.beta
        row({i_n + m: 1.0, iw + m: -1.0}, -np.inf, 0.0)  # n <= w
        row({iT: 1.0, i_s + m: -1.0}, 0.0, np.inf)  # T >= streaming time
        g = cf.layer_mem / 1e9
        ram = {iw + m: g} if cf.metal else {iw + m: g, i_n + m: -g}
        room = (cf.avail - cf.fixed_mem) / 1e9
        big = ((k + 2) * W * cf.layer_mem + cf.fixed_mem) / 1e9 + abs(room) + 1.0
        # z = 1: all k windows fit;  z = 0: two windows fit (the one in use, the next one)
        row({**{i: k * v for i, v in ram.items()}, iz + m: big}, -np.inf, room + big)
        row({**{i: 2 * v for i, v in ram.items()}, iz + m: -big}, -np.inf, room)
        # z = 0: s >= streamed bytes / disk speed
        per_s = 1e9 / cf.disk
        row({**{i: (k + 2) * v * per_s for i, v in ram.items()}, i_s + m: -1.0,
             iz + m: -big * per_s}, -np.inf, room * per_s)
    row(compute, base, np.inf)  # T >= compute + hops + output
    integrality = np.concatenate([np.ones(3 * M), np.zeros(M + 1)])
    res = milp(c, integrality=integrality, bounds=Bounds(lo, hi),
               constraints=LinearConstraint(np.array(rows), rlo, rhi))
    if res.status != 0 or res.x is None:
        return None
    w = [round(v) for v in res.x[iw:iw + M]]
    n = [round(v) for v in res.x[i_n:i_n + M]]
    total = _latency(coefs, k, w, n, base)  # re-evaluated on the integers
    return None if total is None else (total, w, n)


def _latency(coefs: Sequence[_Coef], k: int, w: Sequence[int], n: Sequence[int],
             base: float) -> float | None:
    comp, slowest_disk = base, 0.0
    for m, cf in enumerate(coefs):
        cost = _device_cost(cf, k, w[m], n[m])
        if cost is None:
            return None
        comp += cost[0]
        slowest_disk = max(slowest_disk, cost[1])
    return max(comp, slowest_disk)


# -- ring order -------------------------------------------------------------------------------


def _ring(members: Sequence[int], head: int, hop: Mapping[tuple[int, int], float]
          ) -> tuple[list[int], float]:
    """The order (head first) with the smallest summed hop time around the ring."""
    others = [m for m in members if m != head]

    def cost(order: Sequence[int]) -> float:
        seq = [head, *order]
        return sum(hop[(seq[i], seq[(i + 1) % len(seq)])] for i in range(len(seq)))

    if len(others) <= 6:
        best = min(itertools.permutations(others), key=cost, default=())
        return [head, *best], cost(best)
    order: list[int] = []  # nearest neighbour, then 2-opt
    left, cur = set(others), head
    while left:
        nxt = min(left, key=lambda j: hop[(cur, j)])
        order.append(nxt)
        left.discard(nxt)
        cur = nxt
    improved = True
    while improved:
        improved = False
        for i in range(len(order) - 1):
            for j in range(i + 1, len(order)):
                cand = order[:i] + order[i:j + 1][::-1] + order[j + 1:]
                if cost(cand) < cost(order) - 1e-12:
                    order, improved = cand, True
    return [head, *order], cost(order)


# -- planning -----------------------------------------------------------------------------------


def _problem(devices: Sequence[Device], model: ModelProfile, opts: Options,
             links: Mapping[tuple[str, str], Link], default_link: Link
             ) -> tuple[dict[tuple[int, int], float], list[_Coef], float, list[int]]:
    """What plan() and brute_force() both price: hop times, per-device coefficients, the
    head's output projection and the candidate k."""
    if not devices:
        raise PlanError("no devices to plan for")
    if not 0 <= opts.head < len(devices):
        raise PlanError(f"the head index {opts.head} is not among the {len(devices)} devices")
    L = model.n_layer
    if opts.k is not None and (opts.k < 1 or L % opts.k):
        raise PlanError(f"k={opts.k} does not divide the model's {L} layers")
    nbytes = model.activation_bytes(opts.activation_bytes)
    hop = {(i, j): (links.get((a.name, b.name)) or default_link).hop_s(nbytes)
           for i, a in enumerate(devices) for j, b in enumerate(devices) if i != j}
    coefs = [_coefficients(d, model, opts, i == opts.head) for i, d in enumerate(devices)]
    head = devices[opts.head]
    head_out = _seconds(model.output_flops_by_type, head.cpu_flops, head.name)
    ks = [opts.k] if opts.k else [k for k in range(1, L + 1) if L % k == 0]
    return hop, coefs, head_out, ks


def plan(devices: Sequence[Device], model: ModelProfile, options: Options | None = None,
         links: Mapping[tuple[str, str], Link] | None = None,
         default_link: Link = Link(0.002, 50e6)) -> Plan:
    """The fastest plan of the cost model; raises PlanError if none is feasible."""
    opts = options or Options()
    L = model.n_layer
    hop, coefs, head_out, ks = _problem(devices, model, opts, links or {}, default_link)

    others = [i for i in range(len(devices)) if i != opts.head]
    if len(devices) <= opts.exhaustive_devices:
        subsets = [[opts.head, *s] for r in range(len(others) + 1)
                   for s in itertools.combinations(others, r)]
    else:
        subsets = [[opts.head, *others]]
    best: tuple[float, int, list[int], list[int], list[int], float] | None = None
    tried: dict[tuple[int, ...], float] = {}
    while subsets:
        members = subsets.pop(0)
        ring, ring_s = _ring(members, opts.head, hop) if len(members) > 1 else ([opts.head], 0.0)
        sub = [coefs[m] for m in ring]
        found = None
        for k in ks:
            W = L // k
            if len(ring) > W:
                continue
            res = _solve_k(sub, k, W, k * ring_s + head_out)
            if res is None:
                continue
            total = res[0]
            if found is None or total < found[0]:
                found = (total, k, ring, res[1], res[2], ring_s)
        tried[tuple(sorted(members))] = found[0] if found else math.inf
        if found is not None and (best is None or found[0] < best[0]):
            best = found
        if len(devices) > opts.exhaustive_devices and found is not None:
            # the paper's selection: drop devices that hold a single layer, solve again
            weak = [ring[i] for i, w in enumerate(found[3]) if w == 1 and ring[i] != opts.head]
            if weak:
                subsets.append([m for m in members if m not in weak])
    if best is None:
        raise PlanError("no assignment fits: the model needs more memory or disk than these "
                        "devices offer (or a forced k leaves fewer layers than devices)")
    total, k, ring, w, n, ring_s = best
    plans = []
    for pos, m in enumerate(ring):
        cf, dev = coefs[m], devices[m]
        comp, disk, over = _device_cost(cf, k, w[pos], n[pos]) or (0.0, 0.0, 0.0)
        # disk streaming runs while the token is elsewhere; it only costs latency where it is
        # the slowest part of the ring (latency = max(compute path, slowest streaming device))
        nxt = ring[(pos + 1) % len(ring)]
        net = k * hop[(m, nxt)] if len(ring) > 1 else 0.0
        if over <= 0:
            regime = "M4"
        elif dev.os == "macOS":
            regime = "M2" if dev.metal else "M1"
        else:
            regime = "M3"
        held = (k * _ram_layers(cf, w[pos], n[pos]) * cf.layer_mem + cf.fixed_mem
                if over <= 0 else cf.avail)
        plans.append(DevicePlan(dev.name, w[pos], n[pos], k * w[pos], regime, comp, disk, net,
                                held))
    dropped = {}
    used = set(ring)
    for m in range(len(devices)):
        if m in used:
            continue
        with_it = min((v for key, v in tried.items() if m in key), default=math.inf)
        why = ("cannot hold even one layer per round" if with_it == math.inf else
               f"the best plan with it is slower ({1e3 * with_it:.1f} ms/token against "
               f"{1e3 * total:.1f})")
        dropped[devices[m].name] = why
    return Plan(k=k, ring=[devices[m].name for m in ring], devices=plans, latency_s=total,
                output_s=head_out, dropped=dropped, n_layer=L)


def brute_force(devices: Sequence[Device], model: ModelProfile, options: Options | None = None,
                links: Mapping[tuple[str, str], Link] | None = None,
                default_link: Link = Link(0.002, 50e6)) -> float:
    """The cost model's optimum by enumeration (every subset, k, composition and GPU split):
    the reference Halda is tested against. Small instances only."""
    opts = options or Options()
    L = model.n_layer
    hop, coefs, head_out, ks = _problem(devices, model, opts, links or {}, default_link)
    others = [i for i in range(len(devices)) if i != opts.head]
    best = math.inf
    for r in range(len(others) + 1):
        for extra in itertools.combinations(others, r):
            members = [opts.head, *extra]
            ring_s = min(
                (sum(hop[(s[i], s[(i + 1) % len(s)])] for i in range(len(s)))
                 for s in ([opts.head, *p] for p in itertools.permutations(extra))),
                default=0.0) if extra else 0.0
            for k in ks:
                W = L // k
                if len(members) > W:
                    continue
                base = k * ring_s + head_out
                # options per device and window: (compute, streaming time), over every n
                opts_m = []
                for m in members:
                    per_w: list[list[tuple[float, float]]] = [[] for _ in range(W + 1)]
                    for w in range(1, W + 1):
                        for n in range(0, w + 1):
                            cost = _device_cost(coefs[m], k, w, n)
                            if cost is not None:
                                per_w[w].append((cost[0], cost[1]))
                    opts_m.append(per_w)
                # latency = max(sum of compute + base, slowest streaming): for each bound D on
                # the streaming times, minimise the compute sum by DP over devices
                bounds = sorted({o[1] for per_w in opts_m for opts in per_w for o in opts})
                for D in bounds:
                    dp = [math.inf] * (W + 1)
                    dp[0] = 0.0
                    for per_w in opts_m:
                        best_w = [min((o[0] for o in opts if o[1] <= D), default=math.inf)
                                  for opts in per_w]
                        nxt = [math.inf] * (W + 1)
                        for used in range(W + 1):
                            if dp[used] == math.inf:
                                continue
                            for w in range(1, W - used + 1):
                                v = dp[used] + best_w[w]
                                if v < nxt[used + w]:
                                    nxt[used + w] = v
                        dp = nxt
                    if dp[W] < math.inf:
                        best = min(best, max(dp[W] + base, D))
    return best
