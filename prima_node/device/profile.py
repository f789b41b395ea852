"""A device's profile: everything the planner needs to know about it, measured here.

The slow parts (kernel speed per weight type, memory bandwidth, the disk under the model) are
measured once per device, model file and thread count and cached; memory availability changes
by the minute, so it is read again every time a profile is used. The JSON form is what nodes
exchange.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import PrimaError
from ..ggml import PINNED_VERSION
from .memory import memory_info

_LOG = logging.getLogger("prima.device")
FORMAT = "prima-device-profile/1"
DEFAULT_TYPES = ("Q4_K", "Q6_K", "Q8_0", "F16")

Progress = Callable[[int, int], None]


@dataclass
class DeviceProfile:
    name: str
    os: str
    os_release: str
    machine: str
    cpu: str
    cores: int
    threads: int
    memory: dict[str, Any]
    memory_read_gbps: float
    disk: dict[str, Any] | None  # the filesystem holding the model (None without a model)
    kernels: dict[str, dict[str, float]]  # weight type -> decode_flops / prefill_flops
    gpu: dict[str, Any] = field(default_factory=lambda: {"backend": None, "devices": []})
    model_file: str | None = None
    #: one real layer of the model decoding here: {"layer", "measured_s", "kernel_s" (what
    #: ``kernels`` price it at)}; the planner scales the kernels by the ratio (None: no model)
    layer_decode: dict[str, Any] | None = None
    measured_at: str = ""
    measure_s: float = 0.0
    version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeviceProfile:
        if doc.get("format") != FORMAT:
            raise ValueError(f"not a device profile (expected format {FORMAT!r})")
        try:
            return cls(**{k: v for k, v in doc.items() if k != "format"})
        except TypeError as exc:
            raise ValueError(f"the device profile is incomplete or malformed: {exc}") from None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_path(cache_dir: Path, model: Path | None, threads: int, gpu: str | None) -> Path:
    # the engine's version is part of the key: a new ggml measures differently
    key = [socket.gethostname(), str(threads), __version__, f"ggml-{PINNED_VERSION}",
           f"gpu-{gpu}"]
    if model is not None:
        st = model.stat()
        key += [str(model.resolve()), str(st.st_size), str(st.st_mtime_ns)]
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    return cache_dir / f"device-{digest}.json"


def bandwidth_buffer_mib(available: int) -> int:
    """The memory-bandwidth buffer: 256 MiB, far beyond any cache, but never more than an
    eighth of what the device can spare (a 256 MiB buffer got a first profile killed in a
    300 MiB container); 16 MiB still exceeds the last-level cache of the devices this runs on."""
    return max(16, min(256, available // 8 >> 20))


def _gpu_vram_now(gpu: dict[str, Any]) -> None:
    """Read each profiled GPU's free memory afresh (it changes as processes come and go)."""
    from .. import ggml
    from ..engine.gpu import GpuUnavailableError, gpu_device

    for d in gpu.get("devices") or []:
        try:
            d["vram_free"], d["vram_total"] = ggml.load().memory(gpu_device(d["name"]))
        except GpuUnavailableError:  # a GPU gone since: keep the cached figure
            continue


def measure_gpu(name: str, types: list[str], n_embd: int) -> dict[str, Any]:
    """One GPU's figures for the planner: its memory, its kernels' FLOP/s per weight type
    (decode and prefill products, weights in its memory) and the host round trip of a
    token's hidden state."""
    from .. import ggml
    from ..engine.backend import ComputeError
    from ..engine.gpu import describe, gpu_device
    from .compute import copy_seconds, kernel_flops

    device = gpu_device(name)
    info = describe(device)
    free, total = ggml.load().memory(device)
    kernels: dict[str, dict[str, float]] = {}
    unsupported = []
    for t in types:
        try:
            kernels.update(kernel_flops([t], threads=1, device=device,
                                        weight_mib=max(16, min(256, free // 8 >> 20))))
        except ComputeError:  # the GPU has no kernel for it: such layers stay on the CPU
            unsupported.append(t)
    free, total = ggml.load().memory(device)
    return {"name": info.name, "description": info.description, "backend": info.backend,
            "unified": info.unified, "vram_free": free, "vram_total": total,
            "kernels": kernels, "unsupported_types": unsupported,
            "copy_s_per_token": copy_seconds(device, n_embd)}


def profile_device(model: str | Path | None = None, *, threads: int | None = None,
                   cache_dir: Path | None = None, refresh: bool = False,
                   progress: Progress | None = None, gpu: str | None = None) -> DeviceProfile:
    """Measure this device (or reuse its cached measurements, with memory read afresh).

    ``gpu``: also measure that GPU (ggml's name; "CPU" stands one in, for tests)."""
    from ..engine.model import default_threads

    threads = threads or default_threads()
    path = Path(model) if model is not None else None
    cache = _cache_path(cache_dir, path, threads, gpu) if cache_dir is not None else None
    if cache is not None and cache.exists() and not refresh:
        prof = _cached(cache, path)
        if prof is not None:
            prof.memory = memory_info().as_dict()
            _gpu_vram_now(prof.gpu)
            return prof

    prof = _measure(path, threads, gpu, progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(prof.to_json(), indent=1))
        tmp.replace(cache)
    return prof


def _measure(path: Path | None, threads: int, gpu: str | None,
             progress: Progress | None) -> DeviceProfile:
    """Every measurement, in the order the progress bar counts them: memory, its bandwidth,
    the model's disk, the kernels of each weight type the model uses (a default set without
    a model), a real layer of the model, the GPU."""
    from ..planner.model_profile import ModelProfile
    from .compute import kernel_flops, memory_read_bandwidth
    from .disk import measure_disk

    mp = ModelProfile.load(path) if path is not None else None
    types = (sorted({t for layer in mp.layers for t in layer.flops_by_type}
                    | set(mp.output_flops_by_type)) if mp is not None else list(DEFAULT_TYPES))
    gguf = path is not None and path.suffix == ".gguf"
    steps = 2 + 2 * gguf + len(types) + (gpu is not None)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    t0 = time.perf_counter()
    mem = memory_info().as_dict()
    step()
    bandwidth = memory_read_bandwidth(size_mib=bandwidth_buffer_mib(mem["available"]), repeats=3,
                                      threads=threads)
    step()
    disk = layer_decode = None
    if gguf:
        assert path is not None
        disk = measure_disk(path).as_dict()
        step()
    kernels: dict[str, dict[str, float]] = {}
    for t in types:
        kernels.update(kernel_flops([t], threads=threads,
                                    weight_mib=bandwidth_buffer_mib(mem["available"])))
        step()
    if gguf:
        assert path is not None
        layer_decode = _layer_decode(path, threads, kernels)
        step()
    gpus: dict[str, Any] = {"backend": None, "devices": []}
    if gpu is not None:
        measured = measure_gpu(gpu, types, mp.n_embd if mp is not None else 4096)
        gpus = {"backend": measured["backend"], "devices": [measured]}
        step()
    return DeviceProfile(
        name=socket.gethostname(), os=platform.system(), os_release=platform.release(),
        machine=platform.machine(), cpu=_cpu_name(), cores=os.cpu_count() or 1,
        threads=threads, memory=mem, memory_read_gbps=round(bandwidth, 2), disk=disk,
        kernels=kernels, gpu=gpus, model_file=str(path) if path is not None else None,
        layer_decode=layer_decode,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        measure_s=round(time.perf_counter() - t0, 2))


def _cached(cache: Path, model: Path | None) -> DeviceProfile | None:
    """The cached measurements, or None where they must be taken again: unreadable, from
    another version, or taken before profiles timed a real layer of the model."""
    try:
        doc = json.loads(cache.read_text())
        prof = DeviceProfile.from_json(doc)
    except (ValueError, json.JSONDecodeError):
        return None
    if model is not None and model.suffix == ".gguf" and "layer_decode" not in doc:
        return None
    return prof


def _layer_decode(path: Path, threads: int, kernels: dict[str, dict[str, float]]
                  ) -> dict[str, Any] | None:
    """The model's first layer decoding here, beside what the kernel probes price it at."""
    from ..planner.model_profile import ModelProfile
    from .compute import layer_decode_seconds

    flops = ModelProfile.load(path).layers[0].flops_by_type
    kernel_s = sum(f / kernels[t]["decode_flops"] for t, f in flops.items() if t in kernels)
    if kernel_s <= 0:
        return None
    try:
        measured = layer_decode_seconds(path, threads, layer=0)
    except (PrimaError, MemoryError, OSError) as exc:
        # the kernels' figures still plan the device, only less exactly: never fail for it
        _LOG.warning("could not time a layer of %s on this device (%s): its kernels' speeds "
                     "are used as measured", path.name, exc)
        return None
    return {"layer": 0, "measured_s": measured, "kernel_s": kernel_s}
