"""A node's vital signs for dashboards: its memory now and how hard the OS works to find it.

Unlike the profile, which is measured once and cached, these are read afresh each time (a few
/proc and cgroup files), so that Home Assistant can show memory pressure as it happens: the
paper keeps memory pressure low while streaming a model bigger than memory, and a node whose
pressure climbs is the one to give fewer layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .memory import memory_info


def memory_pressure(path: Path = Path("/proc/pressure/memory")) -> float | None:
    """Linux PSI: the share of the last 10 s in which some task waited for memory, in percent
    (None where the kernel has no PSI)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                key, _, value = field.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def vitals() -> dict[str, Any]:
    """``{"total_bytes", "available_bytes", "pressure_some_avg10"}`` of this device now."""
    mem = memory_info()
    return {"total_bytes": mem.total, "available_bytes": mem.available,
            "pressure_some_avg10": memory_pressure()}
