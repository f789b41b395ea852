"""The cluster part of the head's status document: every member with its windows, predicted
and measured times and paging, the plan, the measured links, and the nodes discovered over mDNS.

Read on whatever thread asks (the status endpoint, the metrics scrape): it only reads the
membership's and the planning's current figures, and the head node's own info.
"""

from __future__ import annotations

import time
from typing import Any

from .members import Member, Membership
from .planning import Planning

PAGING_FIELDS = ("enabled", "mode", "tail_bytes", "mode_changes", "held_bytes",
                 "capacity_bytes", "uses", "hit_rate", "mean_residency", "prefetches",
                 "releases", "bytes_prefetched", "bytes_released")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1e3 * seconds, 3)


def _node(m: Member, membership: Membership, planning: Planning) -> dict[str, Any]:
    p = planning.plan
    d = next((x for x in p.devices if x.name == m.node_id), None) if p is not None else None
    pos = next((i for i, r in enumerate(planning.ring) if r.node_id == m.node_id), None)
    measured = planning.measured_ms.get(pos) if pos is not None else None
    info = membership.node.info() if m.control is None else m.info
    paging = info.get("paging") or {}
    return {
        "node_id": m.node_id, "name": m.name,
        "role": "head" if m.control is None else "worker",
        "online": m.alive, "address": m.address, "layers": None,
        "ranges": [list(r) for r in d.ranges] if d else [],
        "layer_count": d.layers if d else 0,
        "window": d.window if d else 0, "gpu_layers": d.gpu_layers if d else 0,
        "regime": d.regime if d else None,
        "predicted_compute_ms": _ms(d.compute_s) if d else None,
        "predicted_disk_ms": _ms(d.disk_s) if d else None,
        "measured_compute_ms": round(measured, 3) if measured is not None else None,
        "version": info.get("version"), "memory": info.get("memory"),
        "disk_read_bytes_per_s": planning.disk_speed.get(m.node_id),
        "paging": {key: paging.get(key) for key in PAGING_FIELDS} if paging else None,
        "gpu": info.get("gpu"),
        "gpu_unavailable": info.get("gpu_unavailable"),
        "repacked_bytes": info.get("repacked_bytes"),
    }


def _plan(planning: Planning) -> dict[str, Any] | None:
    p = planning.plan
    if p is None:
        return None
    token_ms = planning.measured_token_ms
    return {
        "k": p.k, "ring": list(p.ring),
        "predicted_ms_per_token": _ms(p.latency_s), "bound": p.bound,
        "measured_ms_per_token": None if token_ms is None else round(token_ms, 3),
        "hop_overhead_ms": _ms(planning.hop_overhead_s),
        "planned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(planning.planned_at or 0)),
        "dropped": dict(p.dropped)}


def cluster_view(membership: Membership, planning: Planning) -> dict[str, Any]:
    """The ``cluster`` object of ``/api/status`` on a ring's head (documented in docs/api.md)."""
    hops = [{"from": a, "to": b, "latency_ms": _ms(link.latency_s),
             "mbit_per_s": round(8e-6 * link.bytes_per_s, 1)}
            for (a, b), link in sorted(planning.links.items())]
    return {"mode": "ring",
            "nodes": [_node(m, membership, planning) for m in membership.members],
            "plan": _plan(planning), "links": hops,
            "discovered": sorted(membership.discovered.values(), key=lambda d: d["name"])}
