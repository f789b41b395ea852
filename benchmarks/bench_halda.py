"""How long Halda takes to plan, against the issue's budget (8 devices x 80 layers in 0.5 s) and
against brute force where brute force is possible.

Clusters are random but realistic (Linux and macOS devices, some with GPUs, memory from a
quarter to all of a 70B model, disks from SD cards to NVMe, links from Ethernet to Wi-Fi); each
size is planned for several seeds and the median and worst times are printed. For small
clusters the same instances are also solved by enumeration (``brute_force``), to show both the
time ratio and that the optimum is the same.

    python benchmarks/bench_halda.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from prima_node.planner.cluster_file import flops_from_bandwidth
from prima_node.planner.halda import Device, Link, Options, PlanError, brute_force, plan
from prima_node.planner.model_profile import PublishedModel, from_published, from_shapes

GB = 1e9


def _device(rng: random.Random, i: int, model_bytes: float) -> Device:
    os_ = rng.choice(["Linux", "Linux", "Linux", "macOS"])
    metal = os_ == "macOS"
    bw = rng.uniform(8, 60)  # GB/s decode reaches
    cpu = flops_from_bandwidth(bw)
    gpu, vram = None, 0.0
    if metal or rng.random() < 0.3:
        g = rng.uniform(3, 8) * bw
        gpu = flops_from_bandwidth(g)
        vram = rng.uniform(4, 16) * 2**30
    return Device(f"d{i}", mem_available=rng.uniform(0.1, 0.6) * model_bytes,
                  disk_bytes_per_s=rng.choice([0.09, 0.5, 1.5, 3.0]) * GB, cpu_flops=cpu,
                  os=os_, metal=metal, gpu_flops=gpu, vram_free=vram)


def _links(rng: random.Random, devices: list[Device]) -> dict[tuple[str, str], Link]:
    return {(a.name, b.name): rng.choice([Link(0.0003, 110e6), Link(0.003, 30e6)])
            for a in devices for b in devices if a is not b}


def _time(fn: object, *args: object) -> tuple[float, object]:
    t0 = time.perf_counter()
    try:
        out = fn(*args)  # type: ignore[operator]
    except PlanError as exc:
        out = exc
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    big = from_published("llama3-70b")
    size = big.mean_layer_bytes * big.n_layer
    print("Halda planning time, llama3-70b Q4_K_M (80 layers), n_ctx 4096; budget 0.5 s at 8 "
          "devices")
    print(f"{'devices':>7} {'median s':>9} {'worst s':>8} {'k (last)':>8}  note")
    for m in (2, 3, 4, 5, 6, 8, 12):
        times, last = [], None
        for seed in range(args.seeds):
            rng = random.Random(1000 * m + seed)
            devs = [_device(rng, i, size) for i in range(m)]
            t, last = _time(plan, devs, big, Options(), _links(rng, devs))
            times.append(t)
        note = "exhaustive device subsets" if m <= Options().exhaustive_devices else \
            "drop-weak selection"
        note += ", exhaustive ring order" if m <= 7 else ", 2-opt ring order"
        k = last.k if not isinstance(last, Exception) else "-"  # type: ignore[union-attr]
        print(f"{m:>7} {statistics.median(times):>9.3f} {max(times):>8.3f} {k!s:>8}  {note}")

    small = from_shapes(PublishedModel("bench-32", "llama", 32, 2048, 32, 8, 8192, 32000, 8192),
                        "Q4_K_M")
    print("\nAgainst brute force (32-layer model, the same instances):")
    print(f"{'devices':>7} {'halda s':>8} {'brute s':>8} {'ratio':>6}  same optimum")
    ssize = small.mean_layer_bytes * small.n_layer
    for m in (2, 3, 4):
        th, tb, same = [], [], 0
        for seed in range(args.seeds):
            rng = random.Random(7 * m + seed)
            devs = [_device(rng, i, ssize) for i in range(m)]
            links = _links(rng, devs)
            t1, p = _time(plan, devs, small, Options(n_ctx=1024), links)
            t2, b = _time(brute_force, devs, small, Options(n_ctx=1024), links)
            th.append(t1)
            tb.append(t2)
            lat = p.latency_s if not isinstance(p, Exception) else float("inf")  # type: ignore
            same += abs(lat - b) <= 1e-9 * max(1.0, b) if b != float("inf") else lat == b  # type: ignore
        print(f"{m:>7} {statistics.median(th):>8.3f} {statistics.median(tb):>8.3f} "
              f"{statistics.median(tb) / statistics.median(th):>6.1f}  {same}/{args.seeds}")


if __name__ == "__main__":
    main()
