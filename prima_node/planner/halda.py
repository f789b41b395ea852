"""Halda: which device runs which layers, how many on its GPU, and how many rounds a token makes.

The cost model starts from prima.cpp's (shared/prima-digest.md §2): a device computes its layers
at its measured speed per weight type; GPU layers run at GPU speed within free VRAM; a token goes
k times around the ring. Four things differ from the paper's code:

- Windows may be ragged. The paper gives every device w layers in each of k rounds, so
  L = k * sum(w) and k must divide L: a 16-layer model with three devices and k = 4 can only be
  split 8 + 4 + 4, and a memory-poor head then streams what a 7 + 5 + 4 split would keep.
  Here a device holds l layers in k windows of floor(l / k) or ceil(l / k) layers (the larger
  ones first), every device at least one layer a round, sum(l) = L, any k.

- Each ring hop costs the measured link latency plus the activation bytes over the link's
  throughput, k hops per device per token, so more rounds are no longer free.
- Disk. In the paper's formula the re-read time (overflow bytes / disk speed) is added to the
  latency and depends on the layers a device holds, k * w, not on k, so more rounds could never
  pay. What makes them pay in the running system is prefetching: a device whose share does not
  fit streams part of each window, loading it while the token is elsewhere in the ring. It
  costs latency only where streaming is slower than the rest of the token's path, and a device
  reads only while it is not computing: latency = max(compute path + hops + output, each
  device's compute + its streaming). With k windows of R bytes in all and a budget B for weights
  (the room less the share the node's pager keeps free, ``STREAM_HEADROOM``), the device keeps a
  resident head of every window and streams a tail t = (R - B) / (k - 1), k t bytes a token
  (see ``_device_cost``); one round, or a window bigger than B, would thrash the page cache and
  is not planned. Large k makes streaming cheap on memory-poor devices; hops make large k
  expensive.
- The memory regimes (M1-M4) are not guessed and refined: one integer program per k, with a
  binary per device for "streams", is exact over every regime at once, and the regime each
  device ends in is reported. The paper's
  set-refinement and calibration loop, which exist to guess the regimes and can stop in a local
  optimum, are not needed; idle VRAM cannot be left over either, since GPU layers are priced
  exactly against VRAM.

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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .model_profile import ModelProfile

EXHAUSTIVE_DEVICES = 5
MIN_DISK_BYTES_PER_S = 0.1e9  # below this, overflowing to disk is not an option (prima.cpp)
# Memory checks accept this many bytes over (the solver works in GB and its feasibility
# tolerance is about 100 bytes there); the program itself only allows half of it, so whatever it
# finds passes the exact check.
TOL_BYTES = 2.0**14
#: Plans whose decode latency is within this share of the best count as equally fast; of
#: those, the most even ring is chosen (its pipelined prefill is up to n times faster)
TIE_REL = 1e-9
#: Share of a streaming device's room its pager keeps free (cluster.pager: RELEASE_HEADROOM):
#: the budget for resident heads and the tail in use
STREAM_HEADROOM = 0.10


@dataclass(frozen=True)
class Device:
    """A device as the planner sees it (from a profile, or written by hand for what-ifs)."""

    name: str
    mem_available: float  # bytes the node can count on
    disk_bytes_per_s: float  # sequential on Linux, random page reads elsewhere
    cpu_flops: Mapping[str, float]  # decode FLOP/s by weight type
    os: str = "Linux"  # Linux | Android | macOS
    metal: bool = False  # GPU and CPU share memory (Metal, or any integrated GPU)
    gpu_flops: Mapping[str, float] | None = None
    vram_free: float = 0.0
    # activations and scratch, bytes; None: what this project's engine allocates for the model
    # (a measured profile's available memory is already net of the node process itself, so
    # only the prefill chunk's working memory is still to come). llama.cpp reserves 300 MiB.
    compute_buffer: float | None = None
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
    batch: int = 256  # tokens per prefill chunk (the engine's DEFAULT_BATCH)
    # per hop, besides the link: the nodes' own handling of a frame (encode, decode, event
    # loops, hand-off to the model thread); the head learns it from decode steps
    hop_overhead_s: float = 0.0
    # positions a new token attends to, for the latency figure; None: half the context (the
    # mean over a conversation that fills it)
    n_kv: int | None = None
    exhaustive_devices: int = EXHAUSTIVE_DEVICES
    use_all: bool = False  # every device takes part (no selection), e.g. to spread memory use


@dataclass
class DevicePlan:
    name: str
    window: int  # layers per round: its largest window (ragged windows differ by one layer)
    gpu_layers: int  # n_m: of each window's layers, on the GPU
    layers: int  # l_m, in all (k windows)
    regime: str  # M1..M4 (M4: everything fits in memory)
    compute_s: float
    disk_s: float
    network_s: float  # its outgoing hops, k per token
    memory_bytes: float  # what it holds: its layers (up to what fits), KV, buffers
    streamed_bytes: float = 0.0  # read again from disk per token (0 in M4)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per round
    vram_bytes: float = 0.0  # its GPU layers with their KV (in memory_bytes on unified memory)


@dataclass
class Plan:
    k: int
    ring: list[str]  # device names in ring order, the head first
    devices: list[DevicePlan]
    latency_s: float  # predicted per-token latency
    output_s: float  # the head's output projection
    dropped: dict[str, str] = field(default_factory=dict)  # device -> why
    n_layer: int = 0
    bound: str = ""  # what sets the latency: "compute and network", or a streaming device
    output_on_gpu: bool = False  # the head's output projection runs on its GPU

    def as_dict(self) -> dict[str, Any]:
        devices = []
        for d in self.devices:
            doc = {key: value for key, value in d.__dict__.items()
                   if key not in ("compute_s", "disk_s", "network_s", "ranges")}
            devices.append({**doc, "rounds": self.k, "ranges": [list(r) for r in d.ranges],
                            "compute_ms": round(1e3 * d.compute_s, 3),
                            "disk_ms": round(1e3 * d.disk_s, 3),
                            "network_ms": round(1e3 * d.network_s, 3)})
        return {"k": self.k, "ring": self.ring, "latency_ms": round(1e3 * self.latency_s, 3),
                "output_ms": round(1e3 * self.output_s, 3), "n_layer": self.n_layer,
                "bound": self.bound, "output_on_gpu": self.output_on_gpu, "devices": devices,
                "dropped": self.dropped}


class PlanError(ValueError):
    """No assignment satisfies the constraints (e.g. not even disk can hold the model)."""


# -- per-device coefficients ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Coef:
    alpha: float  # s per layer per round on the CPU
    beta: float  # s per layer per round, GPU minus CPU (<= 0 usually)
    weight_mem: float  # b: bytes of one layer's weights (what streaming re-reads)
    kv_mem: float  # one layer's KV cache for the context (anonymous memory: never streamed)
    fixed_mem: float  # buffers (+ embedding row and output on the head)
    avail: float
    disk: float
    can_overflow: bool
    gpu_cap_bytes: float  # VRAM for layers (0 without a GPU)
    metal: bool
    expert_mem: float = 0.0  # of weight_mem, a mixture's experts (0: a dense model)
    expert_share: float = 0.0  # the share of them a token reads (used / n)

    @property
    def layer_mem(self) -> float:
        """b' = b + KV: what one layer occupies when it stays in memory."""
        return self.weight_mem + self.kv_mem


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


def _attention_s(model: ModelProfile, n_kv: int, speed: Mapping[str, float]) -> float:
    """Q·Kᵀ and P·V over the cache: like a matvec over float16 rows, so priced at the
    device's F16 rate (its slowest measured rate when F16 was not measured)."""
    rate = speed.get("F16") or min((v for v in speed.values() if v > 0), default=0.0)
    return model.attention_flops_per_layer(n_kv) / rate if rate else 0.0


def _coefficients(dev: Device, model: ModelProfile, opts: Options, is_head: bool) -> _Coef:
    flops = _mean_flops(model)
    n_kv = opts.n_ctx // 2 if opts.n_kv is None else min(opts.n_kv, opts.n_ctx)
    alpha = _seconds(flops, dev.cpu_flops, dev.name) + _attention_s(model, n_kv, dev.cpu_flops)
    beta = 0.0
    if dev.has_gpu:
        assert dev.gpu_flops is not None
        beta = (_seconds(flops, dev.gpu_flops, f"{dev.name}'s GPU")
                + _attention_s(model, n_kv, dev.gpu_flops) - alpha)
    scratch = (model.scratch_bytes(opts.batch, opts.n_ctx) if dev.compute_buffer is None
               else dev.compute_buffer)
    fixed = scratch + (model.embedding_row_bytes + model.output_bytes if is_head else 0.0)
    avail = dev.mem_available + (dev.swap_out if dev.os == "Android" else 0.0)
    gpu_cap = max(0.0, dev.vram_free - dev.gpu_compute_buffer) if dev.has_gpu else 0.0
    return _Coef(alpha, beta, model.mean_layer_bytes, model.kv_bytes_per_layer(opts.n_ctx),
                 fixed, avail, dev.disk_bytes_per_s,
                 dev.disk_bytes_per_s >= MIN_DISK_BYTES_PER_S, gpu_cap,
                 dev.metal, model.mean_expert_bytes, model.expert_share)


def _ram_layers(c: _Coef, layers: float, gpu: float) -> float:
    """Layers counted against RAM: CPU layers, or all of them on unified memory (Metal)."""
    return layers if c.metal else layers - gpu


def window_sizes(layers: int, k: int) -> list[int]:
    """The layers of each of k windows holding ``layers`` in all: as even as can be, the larger
    ones first."""
    return [layers // k + (r < layers % k) for r in range(k)]


def _device_cost(c: _Coef, k: int, held: int, n: int) -> tuple[float, float, float] | None:
    """(compute s, disk streaming s, bytes streamed) per token for ``held`` layers in k windows
    with n of each window's layers on the GPU; None if the device cannot run it.

    Either everything it holds fits in memory, or it streams part of every window from disk
    while the token is elsewhere in the ring (prima.cpp's prefetch-release, spread evenly): each
    of its k windows keeps a resident head and streams a tail of t bytes, released right after
    use and prefetched again before the next use. The pager reads the next tail only once it
    released the last one, so memory holds the k heads and one tail: R - k t + t <= B for
    windows of R bytes in all, so t = (R - B) / (k - 1), k t bytes a token, where B is the room
    for weights less the pager's headroom. Streaming needs the largest window to fit B and two
    rounds at least: with one, the window released is the one needed next. (Where a ragged
    window is shorter than t the pager streams it whole, a little less than priced.) The KV
    cache is anonymous memory and stays resident either way (the paper's M3 counts it as
    re-read from disk, which it never is).
    """
    if held < k or k * n > held or k * n * c.layer_mem > c.gpu_cap_bytes + TOL_BYTES:
        return None
    compute = c.alpha * held + c.beta * k * n
    ram = _ram_layers(c, held, k * n)
    room = c.avail - c.fixed_mem
    if ram * c.layer_mem <= room + TOL_BYTES:
        return compute, 0.0, 0.0
    budget = (1 - STREAM_HEADROOM) * (room - ram * c.kv_mem)  # for weights
    window = _ram_layers(c, -(-held // k), n) * c.weight_mem  # the largest
    if k < 2 or not c.can_overflow or window > budget + TOL_BYTES:
        return None
    streamed = _streamed(c, k, ram * c.weight_mem - budget, ram)
    return compute, streamed / c.disk, streamed


def _streamed(c: _Coef, k: int, short: float, ram: float) -> float:
    """Bytes read from disk per token for ``short`` bytes of weights that do not fit. The
    pager streams tails of k / (k - 1) of them (``_device_cost``); but a mixture's experts
    are left to the page cache (``engine.paging.is_expert``), so up to all of its experts'
    bytes the shortfall costs only what tokens read of it: the expert share (a page cache
    that holds 90 % of the experts misses 10 % of the experts a token reads)."""
    in_experts = min(short, ram * c.expert_mem)
    return c.expert_share * in_experts + k / (k - 1) * (short - in_experts)


# -- the integer program ----------------------------------------------------------------------


class _Program:
    """A mixed-integer program's variables and rows, added one constraint at a time."""

    def __init__(self, M: int) -> None:
        # per device: l_m, n_m, u_m (integer: layers, GPU layers per window, largest window),
        # z_m (binary: streams), s_m >= 0 (streaming seconds); then T and P
        self.M = M
        self.il, self.i_n, self.iu, self.iz, self.i_s = 0, M, 2 * M, 3 * M, 4 * M
        self.iT, self.iP = 5 * M, 5 * M + 1
        self.nvar = 5 * M + 2
        self.lo = np.zeros(self.nvar)
        self.hi = np.full(self.nvar, np.inf)
        self.hi[self.iz:self.iz + M] = 0.0  # no device streams unless allowed to
        self.rows: list[np.ndarray] = []
        self.rlo: list[float] = []
        self.rhi: list[float] = []

    def row(self, coeffs: dict[int, float], low: float, high: float) -> None:
        r = np.zeros(self.nvar)
        for i, v in coeffs.items():
            r[i] = v
        self.rows.append(r)
        self.rlo.append(low)
        self.rhi.append(high)

    def solve(self, objective: int) -> np.ndarray | None:
        integrality = np.concatenate([np.ones(4 * self.M), np.zeros(self.M + 2)])
        res = milp(np.eye(self.nvar)[objective], integrality=integrality,
                   bounds=Bounds(self.lo, self.hi),
                   constraints=LinearConstraint(np.array(self.rows), self.rlo, self.rhi),
                   options={"mip_rel_gap": 0.0})
        return res.x if res.status == 0 and res.x is not None else None


def _device_rows(p: _Program, m: int, cf: _Coef, k: int, L: int) -> None:
    """Device m's rows: its layers (at least one a round; u its largest window), its compute
    within T and P, and its memory: everything fits (z = 0) or it streams (z = 1; see
    ``_device_cost``), T >= its compute + streaming."""
    il, i_n, iu, i_s, iz = p.il + m, p.i_n + m, p.iu + m, p.i_s + m, p.iz + m
    p.lo[il], p.hi[il] = k, L
    p.lo[iu], p.hi[iu] = 1, L
    p.hi[i_n] = math.floor((cf.gpu_cap_bytes + TOL_BYTES / 2) / (k * cf.layer_mem)) \
        if cf.gpu_cap_bytes else 0
    p.row({i_n: k, il: -1.0}, -np.inf, 0.0)  # n in every window: k n <= l
    p.row({iu: k, il: -1.0}, 0.0, np.inf)  # the largest window: k u >= l
    p.row({p.iP: 1.0, il: -cf.alpha, i_n: -k * cf.beta}, 0.0, np.inf)
    p.row({p.iT: 1.0, i_s: -1.0, il: -cf.alpha, i_n: -k * cf.beta}, 0.0, np.inf)
    # layers counted against RAM: all of them, or k n fewer off unified memory
    ram = {il: 1.0} if cf.metal else {il: 1.0, i_n: -float(k)}
    window = {iu: 1.0} if cf.metal else {iu: 1.0, i_n: -1.0}

    def scaled(layers: dict[int, float], per_layer: float) -> dict[int, float]:
        return {i: v * per_layer / 1e9 for i, v in layers.items()}  # GB: well scaled

    room = (cf.avail - cf.fixed_mem + TOL_BYTES / 2) / 1e9
    big = 2 * cf.layer_mem * L / 1e9 + abs(room)  # exceeds every memory row's left side
    if k < 2 or not cf.can_overflow:  # everything fits
        p.row(scaled(ram, cf.layer_mem), -np.inf, room)
        p.hi[i_s] = 0.0
        return
    p.hi[iz] = 1.0
    keep = 1 - STREAM_HEADROOM
    # everything fits unless it streams
    p.row({**scaled(ram, cf.layer_mem), iz: -big}, -np.inf, room)
    # streaming: the largest window's weights within the budget B = keep * (room - KV)
    budget_row = scaled(ram, keep * cf.kv_mem)
    for i, v in scaled(window, cf.weight_mem).items():
        budget_row[i] = budget_row.get(i, 0.0) + v
    p.row({**budget_row, iz: big}, -np.inf, keep * room + big)
    # streaming: s >= k / (k - 1) * (R - B) / disk, R the windows' weight bytes; for a
    # mixture (``_streamed``), the experts absorb the shortfall at their share first:
    # s >= share * (R - B) / disk and s >= (share * E + k / (k - 1) * (R - B - E)) / disk,
    # E the experts' bytes (the larger of the two is exact: convex in R - B)
    tail = k / (k - 1) * 1e9 / cf.disk
    short = scaled(ram, cf.weight_mem + keep * cf.kv_mem)
    if not cf.expert_mem:
        p.row({**{i: v * tail for i, v in short.items()}, i_s: -1.0, iz: tail * big},
              -np.inf, tail * (keep * room + big))
        return
    share = cf.expert_share * 1e9 / cf.disk
    p.row({**{i: v * share for i, v in short.items()}, i_s: -1.0, iz: share * big},
          -np.inf, share * (keep * room + big))
    mixed = dict(short)
    for i, v in scaled(ram, cf.expert_mem).items():
        mixed[i] = mixed.get(i, 0.0) - v  # R - B - E, with E counted at the expert share
    row = {i: v * tail for i, v in mixed.items()}
    for i, v in scaled(ram, cf.expert_mem).items():
        row[i] = row.get(i, 0.0) + v * share
    p.row({**row, i_s: -1.0, iz: tail * big}, -np.inf, tail * (keep * room + big))


def _solve_k(coefs: Sequence[_Coef], k: int, L: int, base: float
             ) -> tuple[float, list[int], list[int]] | None:
    """Exact min of T = max(compute + base, each device's compute + streaming time) for fixed
    k, and among the plans that reach it, the most even pipeline.

    A binary per device says whether it streams; every device's memory regime (fits or
    streams) falls out of the one program.

    P is the pipelined prefill's pace: a prompt's micro-batches follow each other around the
    ring, so its time is set by the busiest device, while a decode step visits every device
    in turn and costs the sum. Equal devices give every split the same T, and the solver
    would return any of them (14 + 1 + 1 layers as well as 6 + 5 + 5): a second program
    minimises P with T held at its optimum, so the even one is chosen at no cost to decoding.
    """
    M = len(coefs)
    p = _Program(M)
    p.row(dict.fromkeys(range(M), 1.0), L, L)
    compute: dict[int, float] = {p.iT: 1.0}
    for m, cf in enumerate(coefs):
        _device_rows(p, m, cf, k, L)
        compute[p.il + m] = -cf.alpha
        compute[p.i_n + m] = -k * cf.beta
    p.row(compute, base, np.inf)  # T >= compute + hops + output
    x = p.solve(p.iT)
    if x is None:
        return None
    if M > 1:  # the most even of the fastest: T held at its optimum, P minimised
        p.hi[p.iT] = x[p.iT] * (1 + TIE_REL) + 1e-12
        even = p.solve(p.iP)
        if even is not None:
            x = even
    layers = [round(v) for v in x[p.il:p.il + M]]
    n = [round(v) for v in x[p.i_n:p.i_n + M]]
    total = _latency(coefs, k, layers, n, base)  # re-evaluated on the integers
    return None if total is None else (total, layers, n)


def _latency(coefs: Sequence[_Coef], k: int, layers: Sequence[int], n: Sequence[int],
             base: float) -> float | None:
    comp, slowest = base, 0.0
    for m, cf in enumerate(coefs):
        cost = _device_cost(cf, k, layers[m], n[m])
        if cost is None:
            return None
        comp += cost[0]
        slowest = max(slowest, cost[0] + cost[1])  # a device reads only between its rounds
    return max(comp, slowest)


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


@dataclass(frozen=True)
class _Variant:
    coefs: list[_Coef]
    output_s: float  # the head's output projection per token
    output_on_gpu: bool


def _problem(devices: Sequence[Device], model: ModelProfile, opts: Options,
             links: Mapping[tuple[str, str], Link], default_link: Link
             ) -> tuple[dict[tuple[int, int], float], list[_Variant], list[int]]:
    """What plan() and brute_force() both price: hop times, the variants (per-device
    coefficients with the head's output projection on its CPU, or on its GPU where one fits
    it) and the candidate k."""
    if not devices:
        raise PlanError("no devices to plan for")
    if not 0 <= opts.head < len(devices):
        raise PlanError(f"the head index {opts.head} is not among the {len(devices)} devices")
    L = model.n_layer
    if opts.n_ctx < 1:
        raise PlanError(f"the context must hold at least one position, not {opts.n_ctx}")
    if opts.n_kv is not None and opts.n_kv < 0:
        raise PlanError(f"the attended positions cannot be negative ({opts.n_kv})")
    if opts.k is not None and not 1 <= opts.k <= L:
        raise PlanError(f"k={opts.k} rounds cannot split the model's {L} layers: every device "
                        f"holds at least one layer a round, so k is between 1 and {L}")
    nbytes = model.activation_bytes(opts.activation_bytes)
    if opts.hop_overhead_s < 0:
        raise PlanError(f"a hop cannot cost negative time ({opts.hop_overhead_s} s)")
    hop = {(i, j): (links.get((a.name, b.name)) or default_link).hop_s(nbytes)
           + opts.hop_overhead_s
           for i, a in enumerate(devices) for j, b in enumerate(devices) if i != j}
    coefs = [_coefficients(d, model, opts, i == opts.head) for i, d in enumerate(devices)]
    head = devices[opts.head]
    variants = [_Variant(coefs, _seconds(model.output_flops_by_type, head.cpu_flops, head.name),
                         False)]
    hc = coefs[opts.head]
    if head.has_gpu and hc.gpu_cap_bytes >= model.output_bytes:
        assert head.gpu_flops is not None
        # the output matrix in VRAM: faster, but it takes room from GPU layers (and, off
        # unified memory, leaves RAM)
        on_gpu = replace(hc, gpu_cap_bytes=hc.gpu_cap_bytes - model.output_bytes,
                         fixed_mem=hc.fixed_mem - (0 if hc.metal else model.output_bytes))
        variants.append(_Variant(
            [on_gpu if i == opts.head else c for i, c in enumerate(coefs)],
            _seconds(model.output_flops_by_type, head.gpu_flops, f"{head.name}'s GPU"), True))
    ks = [opts.k] if opts.k else list(range(1, L + 1))
    return hop, variants, ks


def _lower_bound(coefs: Sequence[_Coef], k: int, L: int, base: float) -> float:
    """A cheap bound under any plan of these devices with k rounds, to skip programs that
    cannot beat the best plan found so far.

    Compute: no split beats every layer on the fastest device. Disk: what does not fit in the
    devices' memory and VRAM together must stream, k / (k - 1) times over (a mixture's
    experts at their share first: ``_streamed``), and all disks at once stream at most their
    summed speed within T.
    """
    compute = base + L * min(c.alpha + min(0.0, c.beta) for c in coefs)
    capacity = sum(c.avail - c.fixed_mem + (0.0 if c.metal else c.gpu_cap_bytes)
                   for c in coefs)
    deficit = L * coefs[0].layer_mem - capacity
    if deficit <= 0:
        return compute
    disks = sum(c.disk for c in coefs if c.can_overflow)
    if k < 2 or disks == 0:
        return math.inf
    return max(compute, _streamed(coefs[0], k, deficit, L) / disks)


def _why_infeasible(devices: Sequence[Device], model: ModelProfile, opts: Options,
                    coefs: Sequence[_Coef]) -> str:
    head, hc = devices[opts.head], coefs[opts.head]
    if hc.fixed_mem > hc.avail:
        return (f"the head {head.name} cannot hold the embedding row, the output matrix and its "
                f"buffers ({hc.fixed_mem / 1e9:.2f} GB) in its {hc.avail / 1e9:.2f} GB; choose a "
                "device with more memory as the head")
    have = sum(max(0.0, c.avail - c.fixed_mem) + c.gpu_cap_bytes for c in coefs)
    need = model.n_layer * coefs[0].layer_mem
    sizes = (f"the devices have {have / 1e9:.1f} GB of memory and VRAM for layers, the model "
             f"needs {need / 1e9:.1f} GB (weights and a {opts.n_ctx}-position KV cache)")
    if opts.k == 1:
        return (f"no assignment fits with k=1: with one round every device must hold all its "
                f"layers in memory (prefetching a window while another runs needs k >= 2); "
                f"{sizes}. Leave k to the planner, or shorten the context")
    if not any(c.can_overflow for c in coefs):
        return (f"no assignment fits: {sizes}, and no disk is fast enough to stream the rest "
                f"(at least {MIN_DISK_BYTES_PER_S / 1e9:.1f} GB/s)")
    return (f"no assignment fits{f' with k={opts.k}' if opts.k else ''}: {sizes}; streaming "
            "the rest needs room for a whole window on every streaming device")


def plan(devices: Sequence[Device], model: ModelProfile, options: Options | None = None,
         links: Mapping[tuple[str, str], Link] | None = None,
         default_link: Link = Link(0.002, 50e6)) -> Plan:
    """The fastest plan of the cost model; raises PlanError if none is feasible."""
    opts = options or Options()
    hop, variants, ks = _problem(devices, model, opts, links or {}, default_link)
    # a device that cannot run one layer in any round count (even with the head's share of
    # the work elsewhere) can only be left out; keep it out of the search
    hopeless = {m for m in range(len(devices)) if m != opts.head and all(
        _device_cost(v.coefs[m], k, k, n) is None
        for v in variants for k in ks for n in (0, 1))}
    if opts.use_all and hopeless:
        names = ", ".join(devices[m].name for m in sorted(hopeless))
        raise PlanError(f"every device must take part, but {names} cannot hold one layer")
    best, tried = _search(devices, model.n_layer, opts, hop, variants, ks, hopeless)
    if best is None:
        raise PlanError(_why_infeasible(devices, model, opts, variants[0].coefs))
    total, k, ring, _, _, variant = best
    plans = _device_plans(devices, best, hop)
    slowest = max(plans, key=lambda d: d.disk_s)
    limit = (f"disk streaming on {slowest.name}" if slowest.disk_s >= total - 1e-12
             and slowest.disk_s > 0 else "compute and network")
    return Plan(k=k, ring=[devices[m].name for m in ring], devices=plans, latency_s=total,
                output_s=variant.output_s,
                dropped=_why_dropped(devices, set(ring), total, tried, hopeless, opts),
                n_layer=model.n_layer, bound=limit, output_on_gpu=variant.output_on_gpu)


#: A solved plan: (latency s, k, ring of device indices, layers per ring position, GPU layers
#: per window per ring position, the variant it was solved for)
_Found = tuple[float, int, list[int], list[int], list[int], _Variant]
#: sorted members of a subset tried -> (its best latency, or a lower bound; whether exact)
_Tried = dict[tuple[int, ...], tuple[float, bool]]


def _search(devices: Sequence[Device], L: int, opts: Options, hop: Mapping[tuple[int, int], float],
            variants: Sequence[_Variant], ks: Sequence[int],
            hopeless: set[int]) -> tuple[_Found | None, _Tried]:
    """The best plan over the subsets of devices worth trying: every subset with the head
    while there are few devices, else the paper's selection (all of them, then again without
    the devices that hold a single layer a round)."""
    others = [i for i in range(len(devices)) if i != opts.head and i not in hopeless]
    selecting = len(others) + 1 > opts.exhaustive_devices and not opts.use_all
    if selecting or opts.use_all:
        subsets = [[opts.head, *others]]
    else:
        # the largest first: they usually hold the best plan, whose latency then rules out
        # most (subset, k) pairs of the others before any program is solved
        subsets = [[opts.head, *s] for r in range(len(others), -1, -1)
                   for s in itertools.combinations(others, r)]
    best: _Found | None = None
    tried: _Tried = {}
    while subsets:
        members = subsets.pop(0)
        ring, ring_s = _ring(members, opts.head, hop) if len(members) > 1 else ([opts.head], 0.0)
        found, pruned = _solve_ring(ring, ring_s, L, variants, ks, best)
        tried[tuple(sorted(members))] = ((found[0], True) if found and found[0] <= pruned
                                         else (pruned, False))
        # ties go to fewer devices: fewer hops to fail
        if found is not None and (best is None or found[0] < best[0] * (1 - 1e-9) or (
                found[0] <= best[0] * (1 + 1e-9) and len(found[2]) < len(best[2]))):
            best = found
        if selecting and len(members) > 1:
            if found is not None:
                # the paper's selection: drop devices that hold a single layer, solve again
                weak = [ring[i] for i, layers in enumerate(found[3])
                        if layers == found[1] and ring[i] != opts.head]
            else:  # no plan with all of them (e.g. more devices than layers per round)
                weak = [min((m for m in members if m != opts.head),
                            key=lambda m: devices[m].mem_available + devices[m].vram_free)]
            if weak:
                subsets.append([m for m in members if m not in weak])
    return best, tried


def _solve_ring(ring: list[int], ring_s: float, L: int, variants: Sequence[_Variant],
                ks: Sequence[int], best: _Found | None) -> tuple[_Found | None, float]:
    """The best plan of one ring over the variants and round counts, and the smallest lower
    bound of what was not solved (a (variant, k) whose bound is already worse than the best
    plan so far is not solved)."""
    found: _Found | None = None
    pruned = math.inf
    for variant in variants:
        sub = [variant.coefs[m] for m in ring]
        for bound, k in sorted((_lower_bound(sub, k, L, k * ring_s + variant.output_s), k)
                               for k in ks if len(ring) * k <= L):
            if bound == math.inf:
                continue
            if any(b is not None and bound > b[0] * (1 + 1e-9) for b in (best, found)):
                pruned = min(pruned, bound)
                continue
            res = _solve_k(sub, k, L, k * ring_s + variant.output_s)
            if res is not None and (found is None or res[0] < found[0]):
                found = (res[0], k, ring, res[1], res[2], variant)
    return found, pruned


def _device_plans(devices: Sequence[Device], best: _Found,
                  hop: Mapping[tuple[int, int], float]) -> list[DevicePlan]:
    """Each ring member's share of the plan: its windows, memory regime and costs."""
    _, k, ring, layers, n, variant = best
    plans = []
    starts = _window_starts(layers, k)
    for pos, m in enumerate(ring):
        cf, dev = variant.coefs[m], devices[m]
        comp, disk, over = _device_cost(cf, k, layers[pos], n[pos]) or (0.0, 0.0, 0.0)
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
        held = (_ram_layers(cf, layers[pos], k * n[pos]) * cf.layer_mem + cf.fixed_mem
                if over <= 0 else cf.avail)
        sizes = window_sizes(layers[pos], k)
        ranges = [(starts[r][pos], starts[r][pos] + sizes[r]) for r in range(k)]
        plans.append(DevicePlan(dev.name, max(sizes), n[pos], layers[pos], regime, comp, disk,
                                net, held, over, ranges,
                                0.0 if cf.metal else k * n[pos] * cf.layer_mem))
    return plans


def _why_dropped(devices: Sequence[Device], used: set[int], total: float, tried: _Tried,
                 hopeless: set[int], opts: Options) -> dict[str, str]:
    """Why each device left out of the ring is left out, in the user's terms."""
    dropped = {}
    for m in range(len(devices)):
        if m in used:
            continue
        with_it, exact = min((v for key, v in tried.items() if m in key),
                             default=(math.inf, True))
        if m in hopeless or (with_it == math.inf and opts.k is None):
            why = "cannot hold even one layer per round"
        elif with_it == math.inf and opts.k is not None:
            why = (f"with k={opts.k} it could not take one layer a round in any plan that fits")
        elif with_it <= total * (1 + 1e-9):
            why = (f"the plan is no faster with it ({1e3 * with_it:.1f} ms/token either way): "
                   "fewer devices, fewer hops to fail")
        elif exact:
            why = (f"the best plan with it is slower ({1e3 * with_it:.1f} ms/token against "
                   f"{1e3 * total:.1f})")
        else:
            why = (f"every plan with it is slower (at least {1e3 * with_it:.1f} ms/token "
                   f"against {1e3 * total:.1f})")
        dropped[devices[m].name] = why
    return dropped


def _window_starts(layers: Sequence[int], k: int) -> list[list[int]]:
    """Per round, per device in ring order: the first layer of its window. Round r runs every
    device's r-th window in ring order, so the layers run in order around and around."""
    sizes = [window_sizes(n, k) for n in layers]
    starts, at = [], 0
    for r in range(k):
        row = []
        for dev_sizes in sizes:
            row.append(at)
            at += dev_sizes[r]
        starts.append(row)
    return starts


def brute_force(devices: Sequence[Device], model: ModelProfile, options: Options | None = None,
                links: Mapping[tuple[str, str], Link] | None = None,
                default_link: Link = Link(0.002, 50e6)) -> float:
    """The cost model's optimum by enumeration (every subset, k, composition and GPU split):
    the reference Halda is tested against. Small instances only."""
    opts = options or Options()
    L = model.n_layer
    hop, variants, ks = _problem(devices, model, opts, links or {}, default_link)
    return min(_brute_force(v.coefs, v.output_s, hop, opts, L, ks) for v in variants)


def _brute_force(coefs: Sequence[_Coef], head_out: float, hop: Mapping[tuple[int, int], float],
                 opts: Options, L: int, ks: Sequence[int]) -> float:
    others = [i for i in range(len(coefs)) if i != opts.head]
    best = math.inf
    for r in range(len(others) + 1):
        for extra in itertools.combinations(others, r):
            members = [opts.head, *extra]
            ring_s = min(
                (sum(hop[(s[i], s[(i + 1) % len(s)])] for i in range(len(s)))
                 for s in ([opts.head, *p] for p in itertools.permutations(extra))),
                default=0.0) if extra else 0.0
            for k in ks:
                if len(members) * k > L:
                    continue
                base = k * ring_s + head_out
                # options per device and layer count: (compute, compute + streaming), over n
                opts_m = []
                for m in members:
                    per_l: list[list[tuple[float, float]]] = [[] for _ in range(L + 1)]
                    for layers in range(k, L + 1):
                        for n in range(0, layers // k + 1):
                            cost = _device_cost(coefs[m], k, layers, n)
                            if cost is not None:
                                per_l[layers].append((cost[0], cost[0] + cost[1]))
                    opts_m.append(per_l)
                # latency = max(sum of compute + base, slowest compute + streaming): for each
                # bound D on the latter, minimise the compute sum by DP over devices
                bounds = sorted({o[1] for per_l in opts_m for opts in per_l for o in opts})
                for D in bounds:
                    dp = [math.inf] * (L + 1)
                    dp[0] = 0.0
                    for per_l in opts_m:
                        best_l = [min((o[0] for o in opts if o[1] <= D), default=math.inf)
                                  for opts in per_l]
                        nxt = [math.inf] * (L + 1)
                        for used in range(L + 1):
                            if dp[used] == math.inf:
                                continue
                            for layers in range(k, L - used + 1):
                                v = dp[used] + best_l[layers]
                                if v < nxt[used + layers]:
                                    nxt[used + layers] = v
                        dp = nxt
                    if dp[L] < math.inf:
                        best = min(best, max(dp[L] + base, D))
    return best
