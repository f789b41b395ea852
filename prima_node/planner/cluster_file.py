"""A cluster as the planner reads it from a file: devices, the links between them, the head.

Two kinds of device entry are accepted, so a plan can be made both for a cluster that exists
and for one that does not yet:

- a measured profile, exactly as ``prima-node profile --json`` prints it on each device;
- a hand-written description in plain units (GiB, GB/s, GFLOP/s), for what-if plans and the
  shipped examples. Its kernel speeds may be given per weight type, or as the bandwidth that
  decode achieves (``decode_read_gbps``): decode is a matrix-vector product bound by memory
  reads, so a weight type's FLOP/s is then 2 x that bandwidth / its bytes per weight.

Links are measured with ``prima-node link`` (or written by hand); a pair not listed costs the
file's ``default_link``. A link listed once holds in both directions unless the reverse is
listed too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .halda import Device, Link

FORMAT = "prima-cluster/1"
DEVICE_PROFILE_FORMAT = "prima-device-profile/1"
GIB = 2**30
DEFAULT_LINK = Link(latency_s=0.002, bytes_per_s=50e6)  # an ordinary home Wi-Fi hop


@dataclass
class Cluster:
    devices: list[Device]
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    default_link: Link = DEFAULT_LINK
    head: str | None = None  # device name; None: the first device
    name: str = ""
    notes: str = ""

    @property
    def head_index(self) -> int:
        names = [d.name for d in self.devices]
        return names.index(self.head) if self.head is not None else 0


def bytes_per_weight(type_name: str) -> float:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return size / block


def flops_from_bandwidth(gbps: float) -> dict[str, float]:
    """Decode FLOP/s per weight type for a matvec that reads weights at ``gbps`` GB/s."""
    out = {}
    for qtype in GGMLQuantizationType:
        if qtype in GGML_QUANT_SIZES and qtype.name not in ("I8", "I16", "I32", "I64", "F64"):
            out[qtype.name] = 2 * gbps * 1e9 / bytes_per_weight(qtype.name)
    return out


def _number(entry: Mapping[str, Any], key: str, where: str, *, default: float | None = None,
            positive: bool = False) -> float:
    value = entry.get(key, default)
    if value is None:
        raise ValueError(f"{where}: '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{where}: '{key}' must be a {'positive' if positive else 'non-negative'}"
                         f" number, not {value!r}")
    return float(value)


def _speeds(entry: Mapping[str, Any], where: str) -> dict[str, float]:
    if "gflops" in entry:
        speeds = entry["gflops"]
        if not isinstance(speeds, dict) or not speeds:
            raise ValueError(f"{where}: 'gflops' must map weight types to GFLOP/s")
        for t in speeds:
            if t not in GGMLQuantizationType.__members__:
                raise ValueError(f"{where}: unknown weight type {t!r} in 'gflops'")
        return {t: 1e9 * _number(speeds, t, where, positive=True) for t in speeds}
    if "decode_read_gbps" in entry:
        return flops_from_bandwidth(_number(entry, "decode_read_gbps", where, positive=True))
    raise ValueError(f"{where}: give 'gflops' (per weight type) or 'decode_read_gbps'")


_DEVICE_KEYS = {"name", "os", "metal", "memory_available_gib", "disk_read_gbps", "cpu",
                "gpu", "compute_buffer_mib", "swap_out_gib", "notes"}
_GPU_KEYS = {"name", "vram_free_gib", "gflops", "decode_read_gbps", "compute_buffer_mib"}
_CPU_KEYS = {"name", "gflops", "decode_read_gbps"}


def _check_keys(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: "
                         f"{', '.join(sorted(allowed))})")


def device_from_entry(entry: Mapping[str, Any], where: str = "device") -> Device:
    """A hand-written device (plain units) as the planner sees it."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a device must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' is missing")
    where = f"device {name!r}"
    _check_keys(entry, _DEVICE_KEYS, where)
    os_ = entry.get("os", "Linux")
    if os_ not in ("Linux", "Android", "macOS"):
        raise ValueError(f"{where}: 'os' must be Linux, Android or macOS, not {os_!r}")
    cpu = entry.get("cpu")
    if not isinstance(cpu, dict):
        raise ValueError(f"{where}: 'cpu' must be an object with 'gflops' or 'decode_read_gbps'")
    _check_keys(cpu, _CPU_KEYS, f"{where}, cpu")
    gpu = entry.get("gpu")
    gpu_flops, vram, gpu_buf = None, 0.0, 0.0
    if gpu is not None:
        if not isinstance(gpu, dict):
            raise ValueError(f"{where}: 'gpu' must be an object")
        _check_keys(gpu, _GPU_KEYS, f"{where}, gpu")
        gpu_flops = _speeds(gpu, f"{where}, gpu")
        vram = GIB * _number(gpu, "vram_free_gib", f"{where}, gpu")
        # llama.cpp's fixed reserves: 700 MiB with CUDA, 300 MiB with Metal
        gpu_buf = 2**20 * _number(gpu, "compute_buffer_mib", f"{where}, gpu",
                                  default=300 if os_ == "macOS" else 700)
    metal = entry.get("metal", os_ == "macOS" and gpu is not None)
    if not isinstance(metal, bool):
        raise ValueError(f"{where}: 'metal' must be true or false")
    if metal and os_ != "macOS":
        raise ValueError(f"{where}: 'metal' is for macOS devices")
    return Device(
        name=name, os=os_, metal=metal,
        mem_available=GIB * _number(entry, "memory_available_gib", where),
        disk_bytes_per_s=1e9 * _number(entry, "disk_read_gbps", where, positive=True),
        cpu_flops=_speeds(cpu, f"{where}, cpu"), gpu_flops=gpu_flops, vram_free=vram,
        compute_buffer=2**20 * _number(entry, "compute_buffer_mib", where, default=300),
        gpu_compute_buffer=gpu_buf,
        swap_out=GIB * _number(entry, "swap_out_gib", where, default=0))


#: VRAM a measured GPU keeps for its backend and compute buffers (``--gpu-layers auto`` keeps
#: the same)
GPU_RESERVE_BYTES = float(700 << 20)


def device_from_profile(doc: Mapping[str, Any]) -> Device:
    """A measured profile (``prima-node profile --json``) as the planner sees it.

    The disk figure is the sequential one on Linux (the page cache reads ahead through a mapped
    file) and the random page one elsewhere, as prima.cpp does.
    """
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a device profile without a name")
    where = f"the profile of {name!r}"
    os_name = doc.get("os")
    os_ = {"Darwin": "macOS"}.get(os_name, os_name) if isinstance(os_name, str) else "Linux"
    if os_ not in ("Linux", "Android", "macOS"):
        os_ = "Linux"
    disk, memory, kernels = doc.get("disk"), doc.get("memory"), doc.get("kernels")
    if not isinstance(disk, dict) or not disk:
        raise ValueError(f"{where} has no disk figures: profile it with the model "
                         "(prima-node profile --model M --json)")
    if not isinstance(memory, dict):
        raise ValueError(f"{where} has no memory figures")
    if not isinstance(kernels, dict) or not kernels:
        raise ValueError(f"{where} has no kernel speeds")
    cpu = {}
    scale = _layer_scale(doc.get("layer_decode"), where)
    for t, k in kernels.items():
        if t not in GGMLQuantizationType.__members__ or not isinstance(k, dict):
            raise ValueError(f"{where}: kernel entry {t!r} is not a weight type's speeds")
        cpu[t] = _number(k, "decode_flops", f"{where}, kernel {t}", positive=True) / scale
    disk_key = "sequential_bytes_per_s" if os_ == "Linux" else "random_bytes_per_s"
    gpu_flops, vram, unified = _profiled_gpu(doc.get("gpu"), where)
    return Device(name=name, os=os_,
                  mem_available=_number(memory, "available", f"{where}, memory"),
                  disk_bytes_per_s=_number(disk, disk_key, f"{where}, disk", positive=True),
                  cpu_flops=cpu, gpu_flops=gpu_flops, vram_free=vram,
                  metal=unified,  # GPU layers in the host's memory (Apple, any iGPU)
                  gpu_compute_buffer=GPU_RESERVE_BYTES if gpu_flops else 0.0)


#: a measured layer more than this many times off its kernels' price is a disturbed
#: measurement (the device was busy), not the model's overhead: the scale is held to it
LAYER_SCALE_LIMIT = 3.0


def _layer_scale(entry: Any, where: str) -> float:
    """How much slower a real layer of the model decodes here than the kernel probes price
    it (``prima-node profile --model``'s ``layer_decode``): the kernels' speeds are divided
    by it, so the compute term prices the layer's other operations and its smaller matrices
    too. 1 for a profile without one (hand-written, or measured without the model)."""
    if entry is None:
        return 1.0
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: layer_decode is not an object")
    measured = _number(entry, "measured_s", f"{where}, layer_decode", positive=True)
    kernel = _number(entry, "kernel_s", f"{where}, layer_decode", positive=True)
    return min(max(measured / kernel, 1 / LAYER_SCALE_LIMIT), LAYER_SCALE_LIMIT)


def _profiled_gpu(gpu: Any, where: str) -> tuple[dict[str, float] | None, float, bool]:
    """The first measured GPU of a profile: decode FLOP/s by type, free VRAM, unified."""
    if gpu is None or not isinstance(gpu, dict) or not gpu.get("devices"):
        return None, 0.0, False
    d = gpu["devices"][0]
    if not isinstance(d, dict) or not isinstance(d.get("kernels"), dict):
        raise ValueError(f"{where}: its GPU entry has no kernel speeds")
    flops = {t: _number(k, "decode_flops", f"{where}, GPU kernel {t}", positive=True)
             for t, k in d["kernels"].items() if isinstance(k, dict)}
    return flops or None, float(_number(d, "vram_free", f"{where}, GPU")), bool(d.get("unified"))


def _link(entry: Mapping[str, Any], where: str) -> Link:
    _check_keys(entry, {"from", "to", "latency_ms", "throughput_mb_s", "notes"}, where)
    return Link(latency_s=_number(entry, "latency_ms", where) / 1e3,
                bytes_per_s=1e6 * _number(entry, "throughput_mb_s", where, positive=True))


def cluster_from_json(doc: Any, source: str = "the cluster file") -> Cluster:
    if isinstance(doc, list):  # profiles gathered from the devices, nothing else
        doc = {"format": FORMAT, "devices": doc}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{source} is not a cluster file (expected \"format\": \"{FORMAT}\", "
                         "or a list of device profiles)")
    _check_keys(doc, {"format", "name", "notes", "devices", "links", "default_link", "head"},
                source)
    entries = doc.get("devices")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source} lists no devices")
    devices = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("format") == DEVICE_PROFILE_FORMAT:
            devices.append(device_from_profile(entry))
        else:
            devices.append(device_from_entry(entry, f"{source}, device {i + 1}"))
    names = [d.name for d in devices]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{source}: device names must be unique ({', '.join(dupes)} repeated)")
    links: dict[tuple[str, str], Link] = {}
    listed = doc.get("links", [])
    if not isinstance(listed, list):
        raise ValueError(f"{source}: 'links' must be a list")
    for i, entry in enumerate(listed):
        where = f"{source}, link {i + 1}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: a link must be a JSON object")
        a, b = entry.get("from"), entry.get("to")
        for end in (a, b):
            if end not in names:
                raise ValueError(f"{where}: {end!r} is not one of the devices ({', '.join(names)})")
        assert isinstance(a, str) and isinstance(b, str)
        link = _link(entry, where)
        links[(a, b)] = link
        links.setdefault((b, a), link)
    default = doc.get("default_link")
    if default is not None and not isinstance(default, dict):
        raise ValueError(f"{source}: 'default_link' must be an object with latency_ms and "
                         "throughput_mb_s")
    head = doc.get("head")
    if head is not None and head not in names:
        raise ValueError(f"{source}: the head {head!r} is not one of the devices")
    return Cluster(devices=devices, links=links,
                   default_link=_link(default, f"{source}, default_link")
                   if default is not None else DEFAULT_LINK, head=head,
                   name=str(doc.get("name", "")), notes=str(doc.get("notes", "")))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a cluster file may hold")


def load_cluster(path: str | Path) -> Cluster:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such cluster file: {p}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} is not JSON: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None
    return cluster_from_json(doc, str(p))
