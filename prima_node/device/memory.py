"""How much memory this device can give the model, by the operating system's own rules.

The planner keeps a device in the fast regime only while its layers fit in what is available,
so this number decides whether weights are re-read from disk every token. "Free" memory is the
wrong figure: the page cache is reclaimable and holds the mapped weights themselves. Linux says
what it can give without swapping in ``MemAvailable``. A container (the Home Assistant add-on)
may be capped below that by its memory cgroup, where page cache counts against the cap, so the
cap minus what the group uses plus its reclaimable file pages is the bound there; the smaller of
the two is what the node can count on. Nested groups inherit their ancestors' caps.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value.
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MemoryInfo:
    total: int  # bytes of RAM the OS reports
    available: int  # what the node can count on (the smallest of the rules below)
    os_available: int  # MemAvailable (Linux) / free + inactive + purgeable (macOS)
    cgroup_limit: int | None  # the tightest memory cap over the process's cgroup and ancestors
    cgroup_available: int | None  # that cap - usage + reclaimable file pages
    cgroup_version: int | None
    swap_total: int
    swap_free: int
    source: str  # which rule decided ``available``
    #: of ``cgroup_available``, the inactive file pages the cap counts as reclaimable (a
    #: node's own windows among them: whoever adds its windows' pages must not count these
    #: twice)
    cgroup_reclaimable: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_info(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
                ) -> MemoryInfo:
    """Memory figures of this machine (``proc``/``cgroup_root`` are for reading another root)."""
    if platform.system() == "Darwin" and not (proc / "meminfo").exists():
        return _macos()
    mem = _meminfo(proc / "meminfo")
    total, os_avail = mem["MemTotal"], mem.get("MemAvailable", mem.get("MemFree", 0))
    version, limit, cg_avail, cg_reclaim = _cgroup(proc / "self" / "cgroup", cgroup_root)
    available, source = os_avail, "MemAvailable"
    if cg_avail is not None and cg_avail < available:
        available, source = cg_avail, f"cgroup v{version} memory limit"
    return MemoryInfo(total=total, available=max(0, available), os_available=os_avail,
                      cgroup_limit=limit, cgroup_available=cg_avail, cgroup_version=version,
                      swap_total=mem.get("SwapTotal", 0), swap_free=mem.get("SwapFree", 0),
                      source=source, cgroup_reclaimable=cg_reclaim)


def _meminfo(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


_Cgroup = tuple[int | None, int | None, int | None, int | None]


def _cgroup(self_cgroup: Path, root: Path) -> _Cgroup:
    """(version, limit, available, reclaimable file pages) of the process's memory cgroup;
    Nones without a cap."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None, None, None, None
    v1 = v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = path
        elif controllers == "":
            v2 = path
    if v1 is not None and (root / "memory").is_dir():
        return _cgroup_v1(root / "memory", v1)
    if v2 is not None and (root / "cgroup.controllers").exists():
        return _cgroup_v2(root, v2)
    if v2 is not None and (root / "unified" / "cgroup.controllers").exists():
        return _cgroup_v2(root / "unified", v2)
    return None, None, None, None


def _group_dir(base: Path, path: str) -> Path:
    """The group's folder; inside a container the mount may show only the group itself."""
    d = base / path.lstrip("/")
    return d if d.is_dir() else base


def _cgroup_v1(base: Path, path: str) -> _Cgroup:
    d = _group_dir(base, path)
    stat = _stat(d / "memory.stat")
    limits = [v for v in (_read_int(d / "memory.limit_in_bytes"),
                          stat.get("hierarchical_memory_limit")) if v is not None
              and v < _UNLIMITED]
    if not limits:
        return 1, None, None, None
    limit = min(limits)
    usage = _read_int(d / "memory.usage_in_bytes") or 0
    reclaimable = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return 1, limit, max(0, limit - usage + reclaimable), reclaimable


def _cgroup_v2(base: Path, path: str) -> _Cgroup:
    d = _group_dir(base, path)
    best: tuple[int, int, int] | None = None  # (headroom, limit, reclaimable), tightest group
    node = d
    while True:
        limit = _read_int(node / "memory.max")
        if limit is not None:
            usage = _read_int(node / "memory.current") or 0
            stat = _stat(node / "memory.stat")
            reclaimable = stat.get("inactive_file", 0)
            headroom = max(0, limit - usage + reclaimable)
            if best is None or headroom < best[0]:
                best = (headroom, limit, reclaimable)
        if node == base or node.parent == node:
            break
        node = node.parent
    if best is None:
        return 2, None, None, None
    return 2, best[1], best[0], best[2]


def _macos() -> MemoryInfo:
    """vm_stat's free + inactive + purgeable + speculative pages (what macOS can hand out)."""
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout

    total = int(run("sysctl", "-n", "hw.memsize"))
    text = run("vm_stat")
    page = 4096
    pages: dict[str, int] = {}
    for line in text.splitlines():
        if "page size of" in line:
            page = int(line.split("page size of")[1].split()[0])
        key, _, value = line.partition(":")
        value = value.strip().rstrip(".")
        if value.isdigit():
            pages[key.strip()] = int(value)
    avail = page * sum(pages.get(k, 0) for k in (
        "Pages free", "Pages inactive", "Pages purgeable", "Pages speculative"))
    return MemoryInfo(total=total, available=avail, os_available=avail, cgroup_limit=None,
                      cgroup_available=None, cgroup_version=None, swap_total=0, swap_free=0,
                      source="vm_stat")
