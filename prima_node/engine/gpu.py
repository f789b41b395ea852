"""GPU layers: the GPUs a build can use, and windows whose first layers run on one.

A node runs the first ``gpu_layers`` layers of each of its windows on a GPU (the plan's n_m)
and the rest on the CPU from the file mapping, as two graphs one after the other ("our own
split" rather than ggml's scheduler: each part keeps its decode graphs from token to token, as
CPU windows do). The GPU part's weights are copied into the GPU's memory once per plan (a
discrete GPU cannot read the page cache; one sharing the host's memory, Metal on Apple silicon,
reads the file's mapping in place instead, and keeps it resident), its KV caches live there,
and the hidden states cross to the host once per window, where the CPU part or the ring takes
them. The embedding table stays in the file mapping (a lookup of one row per token is not worth
its VRAM); the output projection goes to the GPU only when every layer does (a single node
offloading the whole model), as llama.cpp's full offload does.

Any device of the build can stand in for the GPU, the CPU included (``gpu_device("CPU")``):
the weights are then copied into ggml's own CPU buffers, which is how the split is tested on
machines without a GPU (and, told to map like Metal, how reading in place is).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import ggml
from ..arch.config import ModelConfig
from ..errors import PrimaError
from ..model_file import ModelFile
from .backend import Backend, Compute
from .graph import EndTensors
from .tensors import end_tensor_infos, layer_tensor_infos, output_name
from .weights import WeightSet
from .window import LayerWindow, Shared

#: Conversations whose KV caches ``--gpu-layers auto`` makes room for: the server's default
#: cache slots (``--cache-slots``)
AUTO_KV_SESSIONS = 2
#: VRAM ``--gpu-layers auto`` leaves free: the backend's own context and its compute buffer
#: (the paper reserves 700 MiB for CUDA, 300 MiB for Metal; one figure for all, the larger).
AUTO_RESERVE_BYTES = 700 << 20


#: ggml's name for its Metal backend (its devices are MTL0, MTL1...)
METAL_BACKEND = "MTL"


class GpuUnavailableError(PrimaError):
    """GPU layers were asked for, but this build or machine has no such device."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as ggml's backend reports it."""

    name: str  # ggml's device name: CUDA0, MTL0 (Metal), Vulkan0
    description: str  # the card: "NVIDIA GeForce RTX 3070"
    backend: str  # the backend that drives it: CUDA, MTL (Metal), Vulkan
    unified: bool  # an integrated GPU sharing the host's memory (Apple silicon, iGPUs)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(device: int) -> GpuInfo:
    """What a device is, without asking for its memory: on CUDA that creates a context on
    the card (hundreds of MB), so only the GPU in use is asked (``Accelerator.memory``)."""
    g = ggml.load()
    reg = g.ggml_backend_dev_backend_reg(device)
    backend = (g.ggml_backend_reg_name(reg) or b"?").decode() if reg else "?"
    kind = g.ggml_backend_dev_type(device)
    return GpuInfo(
        name=(g.ggml_backend_dev_name(device) or b"?").decode(),
        description=(g.ggml_backend_dev_description(device) or b"").decode(),
        backend=backend,
        # ggml's Metal backend (MTL) reports a discrete GPU even on Apple silicon, whose
        # memory is one (an Intel Mac's may be a card of its own: counted as one, the safe side)
        unified=kind in (ggml.DEVICE_IGPU, ggml.DEVICE_CPU)
        or (backend == METAL_BACKEND and platform.machine() == "arm64"))


def reads_file_mapping(device: int, info: GpuInfo) -> bool:
    """Whether GPU layers read the model file's mapping in place instead of copies: on a GPU
    that shares the host's memory and can wrap it in its buffers (Metal on Apple silicon), as
    llama.cpp's mmap does there; a copy would hold the weights twice in the same memory. A
    discrete GPU copies them into its own memory, and so does the CPU standing in for a GPU,
    as the stand-in for the usual case."""
    return (info.unified and info.backend != "CPU"
            and bool(ggml.load().caps(device).buffer_from_host_ptr))


def find_gpus() -> list[GpuInfo]:
    """The GPUs of this build (none on a CPU-only build: ``PRIMA_GPU`` in scripts/setup)."""
    g = ggml.load()
    return [describe(d) for d in g.devices()
            if g.ggml_backend_dev_type(d) in (ggml.DEVICE_GPU, ggml.DEVICE_IGPU)]


#: backends that drive no GPU (a build lists them among its backends)
_HOST_BACKENDS = frozenset({"CPU", "BLAS", "RPC"})


def idle_gpu_backends(backends: dict[str, int]) -> list[str]:
    """The GPU backends among a build's (name -> devices found) that found no device."""
    return sorted(name for name, n in backends.items() if name not in _HOST_BACKENDS and n == 0)


def no_gpu_reason(backends: dict[str, int]) -> str:
    """Why a build with these backends (name -> devices found) has no GPU to use, in the
    user's terms: none was built in, or one was and found no device (its driver)."""
    idle = idle_gpu_backends(backends)
    if not idle:
        return ("this build of ggml has no GPU backend: install with PRIMA_GPU=cuda, metal or "
                "vulkan (docs/install.md)")
    return (f"this build's {' and '.join(idle)} backend found no GPU: its driver is missing "
            "or too old for this build (ggml printed why on stderr as it started; nvidia-smi "
            "shows the driver's CUDA version)")


@functools.cache
def gpu_unavailable() -> str | None:
    """Why a GPU backend this build has goes unused (it found no device), or None: it found
    one, or the build has no GPU backend, which is nothing the user expects to work. Fixed for
    the process: ggml registers its backends once (a ggml that cannot load is reported where
    the model fails to load)."""
    try:
        backends = ggml.load().backends()
    except ggml.GgmlUnavailableError:
        return None
    return no_gpu_reason(backends) if idle_gpu_backends(backends) and not find_gpus() else None


def gpu_device(name: str | None = None) -> int:
    """The ggml handle of the GPU named ``name`` (ggml's name: CUDA0, MTL0...; "CPU" makes
    the CPU stand in for one), or of the first GPU. GpuUnavailableError says why not."""
    g = ggml.load()
    gpus = find_gpus()
    if name is None:
        if not gpus:
            raise GpuUnavailableError(
                f"no layer can run on a GPU: {no_gpu_reason(g.backends())}; or leave "
                "--gpu-layers at 0")
        name = gpus[0].name
    for d in g.devices():
        if (g.ggml_backend_dev_name(d) or b"").decode() == name:
            return d
    known = ", ".join(x.name for x in gpus) or "none"
    raise GpuUnavailableError(f"no GPU named {name!r} in this build (its GPUs: {known})")


def auto_gpu_layers(mf: ModelFile, cfg: ModelConfig, n_ctx: int, free_bytes: int,
                    reserve: int = AUTO_RESERVE_BYTES, sessions: int = AUTO_KV_SESSIONS) -> int:
    """``--gpu-layers auto``: as many leading layers as fit, with the KV caches of
    ``sessions`` conversations (a GPU layer's cache is allocated whole per session), in the
    GPU's free memory less ``reserve``; the output projection must fit too for all of them."""
    room = free_bytes - reserve
    kv_layer = sessions * 2 * cfg.n_embd_kv * n_ctx * 2  # K and V, float16
    n = 0
    for i in range(cfg.n_layer):
        need = sum(t.n_bytes for t in layer_tensor_infos(mf, cfg, i).values()) + kv_layer
        if need > room:
            return n
        room -= need
        n += 1
    if mf.tensor(output_name(cfg)).n_bytes > room:
        return n - 1  # the last layer's place goes to the output projection
    return n


def parse_gpu_layers(text: str) -> int | str:
    """``--gpu-layers`` on a command line: a count, ``all`` or ``auto`` (argparse type)."""
    if text in ("all", "auto"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--gpu-layers takes a number, all or auto, not {text!r}") from None
    if n < 0:
        raise ValueError("--gpu-layers cannot be negative")
    return n


def resolve_gpu_layers(value: int | str, mf: ModelFile, cfg: ModelConfig, n_ctx: int,
                       device: int | None) -> int:
    """``--gpu-layers``: a number from 0 to the model's layers, ``all`` or ``auto``."""
    if value == "all":
        return cfg.n_layer
    if value == "auto":
        if device is None:
            return 0
        return max(0, auto_gpu_layers(mf, cfg, n_ctx, ggml.load().memory(device)[0]))
    if isinstance(value, str) or not 0 <= value <= cfg.n_layer:
        raise ValueError(f"--gpu-layers is a number from 0 to {cfg.n_layer} (this model's "
                         f"layers), all or auto, not {value!r}")
    return value


class Accelerator:
    """A GPU as one model uses it: its backend, a compute buffer in its memory (under the
    model's lock: a step runs its GPU and CPU parts one after the other), and copies of the
    small end tensors the layers' graphs read (the RoPE factors, the output norm), with the
    output projection itself when ``output`` (every layer on the GPU) or once a ring's plan
    puts the head's output there (``hold_output``).

    The compute buffer is not reserved ahead as the CPU's is: the first decode graph sizes
    it, and a larger one later bumps ``compute.generation`` so kept graphs are rebuilt."""

    def __init__(self, shared: Shared, device: int, *, output: bool) -> None:
        self.info = describe(device)
        self.backend = Backend(1, device)
        self.compute = Compute(self.backend, lock=shared.compute.lock)
        self.buffer_type = int(self.backend.buffer_type)
        #: the device, where GPU layers read the file's mapping in place (else copies)
        self.map_on = device if reads_file_mapping(device, self.info) else None
        self._shared = shared
        self._output: WeightSet | None = None
        cfg, mf = shared.config, shared.file
        wanted = {"output_norm.weight", "rope_freqs.weight", "output.bias"}
        try:
            infos = [t for t in end_tensor_infos(mf, cfg) if t.name in wanted]
            # copied even where layers are mapped: a few small tensors, far apart in the file
            self._weights = WeightSet(mf, shared.buffer, infos, copy_to=self.buffer_type)
            ws = self._weights
            self.ends = EndTensors(
                token_embd=shared.ends.token_embd,  # never read on the GPU (see LayerWindow)
                output_norm=ws["output_norm.weight"], output=shared.ends.output,
                rope_freqs=ws.get("rope_freqs.weight"), output_bias=ws.get("output.bias"))
            self.hold_output(output)
        except BaseException:
            self.close()
            raise

    @property
    def has_output(self) -> bool:
        """Whether the output projection has a copy here (``ends.output`` is it)."""
        return self._output is not None

    def hold_output(self, hold: bool) -> None:
        """Copy the output projection into the GPU's memory (every layer there, or a ring
        head whose plan puts its output on its GPU), or free the copy."""
        if hold == self.has_output:
            return
        if not hold:
            assert self._output is not None
            self.ends.output = self._shared.ends.output
            self._output.close()
            self._output = None
            return
        cfg, mf = self._shared.config, self._shared.file
        name = output_name(cfg)
        self._output = WeightSet(mf, self._shared.buffer, [mf.tensor(name)],
                                 copy_to=self.buffer_type, map_on=self.map_on)
        self.ends.output = self._output[name]

    def memory(self) -> tuple[int, int]:
        """The GPU's (free, total) memory now."""
        return ggml.load().memory(self.backend.device)

    def status(self, used_by_model: int) -> dict[str, Any]:
        """The GPU as a status page shows it: what it is, its memory now, what the model
        holds there (``used_by_model``: weights and caches of its GPU layers, end tensors)."""
        free, total = self.memory()
        return {**self.info.as_dict(), "memory_free": free, "memory_total": total,
                "used_by_model": used_by_model}

    @property
    def device_bytes(self) -> int:
        """GPU memory the end tensors' copies take (the output projection's too, if held)."""
        output = self._output
        return self._weights.device_bytes + (output.device_bytes if output is not None else 0)

    def close(self) -> None:
        for ws in (self._output, getattr(self, "_weights", None)):
            if ws is not None:
                ws.close()
        self._output = None
        self.compute.close()
        self.backend.close()


class SplitWindow:
    """Layers [start, end) whose first ``gpu_layers`` run on ``accel`` and the rest on the
    CPU: one window to the node and the generation loop (the ``Window`` protocol).

    ``embed`` and ``output`` are the model's CPU steps, for token ids (the GPU part takes
    hidden states) and for logits when the output projection is not on the GPU."""

    def __init__(self, shared: Shared, start: int, end: int, gpu_layers: int,
                 accel: Accelerator, *, embed: Callable[[np.ndarray], np.ndarray],
                 output: Callable[[np.ndarray], np.ndarray], repack: bool = False,
                 packed_ends: EndTensors | None = None) -> None:
        if not 0 < gpu_layers <= end - start:
            raise ValueError(f"{gpu_layers} GPU layers do not fit a window of {end - start}")
        self.start, self.end = start, end
        self.gpu_layers = gpu_layers
        self.accel = accel
        self._embed, self._output = embed, output
        self.gpu = LayerWindow(shared, start, start + gpu_layers, device=accel)
        self.cpu: LayerWindow | None = None
        if start + gpu_layers < end:
            try:
                self.cpu = LayerWindow(shared, start + gpu_layers, end, repack=repack,
                                       packed_ends=packed_ends)
            except BaseException:
                self.gpu.close()
                raise
        self._parts = [p for p in (self.gpu, self.cpu) if p is not None]

    def forward(self, h: np.ndarray, positions: np.ndarray, session: str = "default", *,
                last_only: bool = False) -> np.ndarray:
        return self.run(positions, session, hidden=h, last_only=last_only)

    def run(self, positions: np.ndarray, session: str, *, hidden: np.ndarray | None = None,
            tokens: np.ndarray | None = None, logits: bool = False,
            last_only: bool = False) -> np.ndarray:
        """The GPU part, then the CPU part (or the output) on its hidden states."""
        if (hidden is None) == (tokens is None):
            raise ValueError("a step takes either hidden states or token ids")
        if tokens is not None:
            hidden = self._embed(np.asarray(tokens, dtype=np.int64).reshape(-1))
        if self.cpu is not None:
            h = self.gpu.run(positions, session, hidden=hidden)
            try:
                return self.cpu.run(positions, session, hidden=h, logits=logits,
                                    last_only=last_only)
            except BaseException:  # both parts must hold the same positions
                self.gpu.truncate(session, int(np.asarray(positions).reshape(-1)[0]))
                raise
        if logits and self.accel.has_output:
            return self.gpu.run(positions, session, hidden=hidden, logits=True)
        h = self.gpu.run(positions, session, hidden=hidden, last_only=last_only or logits)
        return self._output(h) if logits else h

    def n_cached(self, session: str) -> int:
        return min(p.n_cached(session) for p in self._parts)

    def clear(self, session: str) -> None:
        for p in self._parts:
            p.clear(session)

    def truncate(self, session: str, n: int) -> None:
        for p in self._parts:
            p.truncate(session, n)

    def drop(self, session: str) -> None:
        for p in self._parts:
            p.drop(session)

    @property
    def sessions(self) -> list[str]:
        return self.gpu.sessions

    def byte_ranges(self) -> list[tuple[int, int]]:
        """What the CPU part reads from the file (the GPU part's weights are copies, or on
        Metal mapped and kept resident by it: not paged either way)."""
        return self.cpu.byte_ranges() if self.cpu is not None else []

    @property
    def weight_bytes(self) -> int:
        return self.cpu.weight_bytes if self.cpu is not None else 0

    @property
    def repacked_bytes(self) -> int:
        return self.cpu.repacked_bytes if self.cpu is not None else 0

    @property
    def device_bytes(self) -> int:
        return self.gpu.device_bytes

    @property
    def closed(self) -> bool:
        return self.gpu.closed

    def close(self) -> None:
        for p in self._parts:
            p.close()
