"""A plan as people read it: one row per device in ring order, then what sets the latency and
why devices were left out."""

from __future__ import annotations

from .cluster_file import Cluster
from .halda import Options, Plan
from .model_profile import ModelProfile

_REGIMES = {"M1": "streams (macOS)", "M2": "streams (Metal)", "M3": "streams",
            "M4": "fits"}


def _ranges(ranges: list[tuple[int, int]]) -> str:
    text = " ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in ranges)
    return text if len(text) <= 30 else text[:27] + "..."


def plan_table(plan: Plan, model: ModelProfile, cluster: Cluster, opts: Options) -> str:
    position = opts.n_kv if opts.n_kv is not None else opts.n_ctx // 2
    weights = model.mean_layer_bytes * model.n_layer + model.embedding_bytes + model.output_bytes
    lines = [
        f"{model.name} ({model.quant}, {model.n_layer} layers, {weights / 1e9:.2f} GB) on "
        f"{cluster.name or 'the cluster'}: {len(plan.ring)} of {len(cluster.devices)} devices, "
        f"context {opts.n_ctx}",
        f"k = {plan.k} round{'s' if plan.k > 1 else ''}: a token visits the ring "
        f"{plan.k} time{'s' if plan.k > 1 else ''}; predicted {1e3 * plan.latency_s:.1f} ms per "
        f"token ({1 / plan.latency_s:.2f} tokens/s) at position {position}, bound by {plan.bound}",
        "",
    ]
    header = (f"{'device':<22} {'window':>6} {'gpu':>4} {'layers':>6}  {'holds layers':<30} "
              f"{'memory':<16} {'RAM GB':>7} {'VRAM GB':>7} {'compute ms':>10} {'disk ms':>8} "
              f"{'net ms':>7}")
    lines += [header, "-" * len(header)]
    for d in plan.devices:
        regime = f"{d.regime} {_REGIMES.get(d.regime, '')}"
        lines.append(
            f"{d.name[:22]:<22} {d.window:>6} {d.gpu_layers:>4} {d.layers:>6}  "
            f"{_ranges(d.ranges):<30} {regime:<16} {d.memory_bytes / 1e9:>7.2f} "
            f"{d.vram_bytes / 1e9:>7.2f} {1e3 * d.compute_s:>10.1f} {1e3 * d.disk_s:>8.1f} "
            f"{1e3 * d.network_s:>7.2f}")
    lines.append(f"{'output head (' + plan.ring[0] + ')':<{len(header) - 30}}"
                 f"{1e3 * plan.output_s:>10.1f}")
    compute = sum(d.compute_s + d.network_s for d in plan.devices) + plan.output_s
    lines += ["", f"compute and ring hops add up to {1e3 * compute:.1f} ms per token; disk "
              "streaming overlaps them (prefetch while the token is elsewhere), so the latency "
              "is the larger of that sum and the slowest device's streaming time."]
    for name, why in plan.dropped.items():
        lines.append(f"left out: {name}: {why}")
    return "\n".join(lines)
