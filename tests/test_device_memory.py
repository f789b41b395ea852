"""Available memory by the OS's rules: MemAvailable, and a container's memory cgroup cap.

The cap is checked for real: a child process is put into a memory cgroup with a limit (as the
Home Assistant add-on's container is) and must report it. cgroup v2 is not mounted with
controllers on this machine, so its rules are checked on a copy of the files' real layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from prima_node.device.memory import memory_info

GiB = 1 << 30


def test_this_machine_reports_plausible_figures() -> None:
    info = memory_info()
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(next(ln.split()[1] for ln in meminfo.splitlines()
                        if ln.startswith("MemTotal:")))
    assert info.total == total_kb * 1024
    assert 0 < info.available <= info.os_available <= info.total
    assert info.swap_free <= info.swap_total


def _own_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return d if d.is_dir() else None
    return None


def test_a_process_in_a_capped_cgroup_v1_sees_the_cap() -> None:
    parent = _own_memory_cgroup()
    if parent is None:
        pytest.skip("no cgroup v1 memory controller on this machine (the v2 layout is "
                    "checked below)")
    group = parent / f"prima-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here ({exc.strerror}); the rules are "
                    "checked on file layouts below")
    try:
        (group / "memory.limit_in_bytes").write_text(str(512 << 20))
        code = ("import json,sys; from prima_node.device.memory import memory_info; "
                "print(json.dumps(memory_info().as_dict()))")
        script = f'echo $$ > {group}/cgroup.procs && exec "{sys.executable}" -c "{code}"'
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                             check=True, cwd=Path(__file__).resolve().parent.parent).stdout
        info = json.loads(out)
        assert info["cgroup_version"] == 1 and info["cgroup_limit"] == 512 << 20
        assert info["available"] == info["cgroup_available"] <= 512 << 20
        assert info["source"] == "cgroup v1 memory limit"
    finally:
        os.rmdir(group)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc(root: Path, cgroup_line: str, avail_kb: int = 8 * GiB // 1024) -> Path:
    _write(root / "meminfo", f"MemTotal:       {16 * GiB // 1024} kB\n"
                             f"MemFree:        {GiB // 1024} kB\n"
                             f"MemAvailable:   {avail_kb} kB\n"
                             f"SwapTotal:      {2 * GiB // 1024} kB\n"
                             f"SwapFree:       {GiB // 1024} kB\n")
    _write(root / "self" / "cgroup", cgroup_line + "\n")
    return root


def test_cgroup_v2_takes_the_tightest_ancestor_and_counts_reclaimable_cache(
        tmp_path: Path) -> None:
    proc = _proc(tmp_path / "proc", "0::/addons/prima")
    cg = tmp_path / "cgroup"
    _write(cg / "cgroup.controllers", "cpu memory pids\n")
    _write(cg / "addons" / "memory.max", f"{3 * GiB}\n")  # the parent caps tighter
    _write(cg / "addons" / "memory.current", f"{2 * GiB}\n")
    _write(cg / "addons" / "memory.stat", f"anon 1\ninactive_file {GiB // 2}\n")
    _write(cg / "addons" / "prima" / "memory.max", "max\n")
    _write(cg / "addons" / "prima" / "memory.current", f"{GiB}\n")
    info = memory_info(proc, cg)
    assert info.cgroup_version == 2 and info.cgroup_limit == 3 * GiB
    assert info.available == info.cgroup_available == 3 * GiB - 2 * GiB + GiB // 2
    assert info.cgroup_reclaimable == GiB // 2
    assert (info.swap_total, info.swap_free) == (2 * GiB, GiB)


def test_without_a_cap_memavailable_decides(tmp_path: Path) -> None:
    proc = _proc(tmp_path / "proc", "0::/")
    cg = tmp_path / "cgroup"
    _write(cg / "cgroup.controllers", "memory\n")
    info = memory_info(proc, cg)
    assert info.cgroup_limit is None and info.available == 8 * GiB
    assert info.source == "MemAvailable"


def test_a_generous_cap_does_not_raise_what_the_machine_has(tmp_path: Path) -> None:
    proc = _proc(tmp_path / "proc", "4:memory:/docker/abc", avail_kb=GiB // 1024)
    base = tmp_path / "cgroup" / "memory" / "docker" / "abc"
    _write(base / "memory.limit_in_bytes", f"{8 * GiB}\n")
    _write(base / "memory.usage_in_bytes", f"{GiB}\n")
    _write(base / "memory.stat", f"total_inactive_file {GiB}\nhierarchical_memory_limit "
                                 f"{8 * GiB}\n")
    info = memory_info(proc, tmp_path / "cgroup")
    assert info.cgroup_limit == 8 * GiB and info.cgroup_available == 8 * GiB
    assert info.available == GiB and info.source == "MemAvailable"
