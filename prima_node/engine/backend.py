"""Where ggml computes: the CPU backend at the node's thread count, and the memory graphs use.

Three kinds of memory, each chosen for what it costs a small device:
- weights stay in the GGUF file's read-only mapping: one ggml buffer over the whole map, each
  weight tensor placed at its own file offset (``FileBuffer``), so the page cache is the weight
  store and the prefetcher's ``madvise`` acts on the very pages ggml reads;
- KV caches live in anonymous mappings wrapped as ggml buffers (``AnonymousBuffer``): zero-filled
  and committed by the OS only as positions are written, so a 4096-token context costs memory
  only as the conversation grows;
- activations of the graphs that are kept (decode steps) live in one buffer per model
  (``Compute``): it is sized once for the largest of them (``reserve``), so allocating another
  never moves it and kept graphs keep valid addresses. Should one ever need more, the buffer
  grows, and the ``generation`` counter tells the owners of kept graphs to build them again (a
  kept graph pointing into a freed buffer corrupted the heap in a prototype). Prefill chunks,
  built for one run, get a buffer of their own, freed right after.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import ggml
from ..errors import PrimaError

#: Allocations from this size on get pages of their own (glibc's mmap threshold).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def keep_large_allocations_returnable() -> None:
    """Make glibc give large blocks pages of their own, returned to the OS when freed.

    By default glibc raises its mmap threshold to the size of the last large block freed (up
    to 32 MiB), so the second prefill chunk's 30 MiB buffer comes from the heap and stays in
    the process after it is freed: a worker that answered one long prompt kept 24 MiB more
    than an idle one. A fixed threshold keeps the transient buffers transient. No-op where the
    C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


#: The alignment ggml's CPU buffers require of their start (TENSOR_ALIGNMENT).
ALIGNMENT = 32


def aligned_bytes(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of ``nbytes`` starting at a 64-byte boundary (numpy guarantees
    only 16)."""
    raw = np.zeros(nbytes + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + nbytes]


class ComputeError(PrimaError):
    """ggml could not run a graph (out of memory for its buffers, or a failed compute)."""


class Backend:
    """A ggml backend: the CPU with a fixed number of threads (the default), or another device
    of the build (a GPU, for a window's GPU layers; ``device`` is its ggml handle)."""

    def __init__(self, threads: int, device: int | None = None) -> None:
        self.g = ggml.load()
        keep_large_allocations_returnable()
        self.threads = max(1, threads)
        self.device = device or self.g.cpu_device
        self.is_cpu = self.device == self.g.cpu_device
        self.name = (self.g.ggml_backend_dev_name(self.device) or b"?").decode()
        self.handle = self.g.ggml_backend_dev_init(self.device, None)
        if not self.handle:
            raise ComputeError(f"ggml could not start its {self.name} backend")
        if self.is_cpu:
            self.g.ggml_backend_set_n_threads(self.handle, self.threads)
        self.buffer_type = self.g.ggml_backend_dev_buffer_type(self.device)

    def check(self, graph: int) -> None:
        """Refuse a graph with an operation this device cannot run. Called directly (not
        through ggml's scheduler, which would fall back to the CPU), a GPU backend aborts the
        process on one (a weight type its kernels lack, say); the CPU runs them all."""
        if self.is_cpu:
            return
        g = self.g
        for i in range(g.ggml_graph_n_nodes(graph)):
            node = g.ggml_graph_node(graph, i)
            if not g.ggml_backend_dev_supports_op(self.device, node):
                what = (g.ggml_op_desc(node) or b"?").decode()
                types = sorted({ggml.type_name(g.tensor(s).type)
                                for s in g.tensor(node).src if s})
                raise ComputeError(f"{self.name} cannot run {what} on {'/'.join(types)}: "
                                   "keep these layers on the CPU (fewer --gpu-layers)")

    def compute(self, graph: int) -> None:
        status = self.g.ggml_backend_graph_compute(self.handle, graph)
        if status != ggml.STATUS_SUCCESS:
            raise ComputeError(f"ggml failed to compute a graph on {self.name} (status {status})")

    def close(self) -> None:
        if self.handle:
            self.g.ggml_backend_free(self.handle)
            self.handle = 0


class FileBuffer:
    """A ggml buffer over a read-only file mapping (numpy's memmap of the GGUF file).

    Holds the mapping, so the address ggml reads stays valid while the buffer lives.
    """

    def __init__(self, mapping: np.ndarray) -> None:
        self.g = ggml.load()
        self._mapping = mapping
        self.base = int(mapping.ctypes.data)
        self.size = int(mapping.nbytes)
        if self.base % ALIGNMENT:  # ggml asserts (aborts) on an unaligned buffer
            raise ComputeError(f"a buffer for ggml must start at a multiple of {ALIGNMENT} bytes")
        self.handle = self.g.ggml_backend_cpu_buffer_from_ptr(self.base, self.size)
        if not self.handle:
            raise ComputeError("ggml could not wrap the model file's mapping")

    def place(self, tensor: int, offset: int) -> None:
        """Point a tensor at its bytes ``offset`` bytes into the file (validated by the caller:
        inside the file and of the tensor's size)."""
        status = self.g.ggml_backend_tensor_alloc(self.handle, tensor, self.base + offset)
        if status != ggml.STATUS_SUCCESS:
            raise ComputeError(f"ggml refused a tensor at file offset {offset}")

    def close(self) -> None:
        if self.handle:
            self.g.ggml_backend_buffer_free(self.handle)
            self.handle = 0
        self._mapping = np.empty(0, np.uint8)


class DeviceBuffer:
    """Tensors of one ggml context allocated together in a backend's own memory (a GPU's
    VRAM): for the copies of GPU layers' weights and their KV caches. ``zero``: clear it
    first (a cache's unwritten rows are masked out of attention, but 0 x NaN is NaN)."""

    def __init__(self, ctx: int, buffer_type: int, *, zero: bool = False) -> None:
        self.g = ggml.load()
        self.handle = self.g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buffer_type)
        if not self.handle:
            name = (self.g.ggml_backend_buft_name(buffer_type) or b"?").decode()
            raise ComputeError(f"not enough {name} memory for the GPU layers' tensors")
        self.size = int(self.g.ggml_backend_buffer_get_size(self.handle))
        if zero:
            self.g.ggml_backend_buffer_clear(self.handle, 0)

    def close(self) -> None:
        if self.handle:
            self.g.ggml_backend_buffer_free(self.handle)
            self.handle = 0


class AnonymousBuffer:
    """A ggml buffer over an anonymous mapping: zero-filled, committed page by page as written,
    returned to the OS when closed."""

    def __init__(self, size: int) -> None:
        self.g = ggml.load()
        self.size = max(int(size), mmap.PAGESIZE)
        self._map: mmap.mmap | None = mmap.mmap(-1, self.size)
        self._view = (ctypes.c_char * self.size).from_buffer(self._map)
        self.base = ctypes.addressof(self._view)
        self.handle = self.g.ggml_backend_cpu_buffer_from_ptr(self.base, self.size)
        if not self.handle:
            raise ComputeError(f"ggml could not wrap {self.size} bytes for a cache")
        self._next = 0

    def place(self, tensor: int) -> None:
        """Give a tensor the next free, 64-byte aligned bytes of the buffer."""
        nbytes = self.g.ggml_nbytes(tensor)
        start = -(-self._next // 64) * 64
        if start + nbytes > self.size:
            raise ComputeError(f"a cache buffer of {self.size} bytes is full")
        status = self.g.ggml_backend_tensor_alloc(self.handle, tensor, self.base + start)
        if status != ggml.STATUS_SUCCESS:
            raise ComputeError("ggml refused a cache tensor")
        self._next = start + nbytes

    def close(self) -> None:
        if self.handle:
            self.g.ggml_backend_buffer_free(self.handle)
            self.handle = 0
        if self._map is not None:
            del self._view
            self._map.close()
            self._map = None


class Compute:
    """One model's backend and activation memory, shared by its graphs, one at a time.

    Decode graphs are kept and run again token after token: their activations (a few hundred
    kB) live in one persistent buffer, sized once for the largest decode step (``reserve``).
    A prefill chunk needs far more (about three feed-forward widths per token: 30 MiB for a
    256-token chunk of a 1B model) but runs once, so it gets a buffer of its own that is freed
    as soon as the chunk is done (``transient``): a node that answered a long prompt does not
    keep that memory from the page cache its weights live in.
    """

    def __init__(self, backend: Backend, lock: threading.RLock | None = None) -> None:
        self.g = backend.g
        self.backend = backend
        self.allocator = self.g.ggml_gallocr_new(backend.buffer_type)
        #: graphs share activation memory: never two at once (a model's GPU layers share the
        #: model's lock: a step runs its CPU and GPU parts one after the other anyway)
        self.lock = lock or threading.RLock()
        #: bumped whenever the persistent buffer moved; graphs allocated before are rebuilt
        self.generation = 0

    @property
    def buffer_bytes(self) -> int:
        """The persistent buffer's size."""
        return int(self.g.ggml_gallocr_get_buffer_size(self.allocator, 0))

    def reserve(self, graph: int) -> None:
        """Size the persistent buffer for a graph at least as large as any kept graph."""
        with self.lock:
            before = self.buffer_bytes
            ok = self.g.ggml_gallocr_reserve(self.allocator, graph)
            if not ok or self.buffer_bytes != before:
                self.generation += 1  # a failed reallocation freed the old buffer too
            if not ok:
                raise ComputeError("not enough memory for the compute buffer")

    def allocate(self, graph: int) -> int:
        """Place a kept graph's activations in the persistent buffer; returns the generation
        they belong to."""
        with self.lock:
            self.backend.check(graph)
            before = self.buffer_bytes
            ok = self.g.ggml_gallocr_alloc_graph(self.allocator, graph)
            if not ok or self.buffer_bytes != before:
                self.generation += 1  # a failed reallocation freed the old buffer too
            if not ok:
                raise ComputeError("not enough memory for the compute buffer")
            return self.generation

    def run_transient(self, graph: int) -> Callable[[], None]:
        """Place a one-off graph's activations in a buffer of its own; the returned function
        frees it (call it once the outputs were read)."""
        self.backend.check(graph)
        allocator = self.g.ggml_gallocr_new(self.backend.buffer_type)
        if not self.g.ggml_gallocr_alloc_graph(allocator, graph):
            self.g.ggml_gallocr_free(allocator)
            raise ComputeError("not enough memory for the compute buffer of a prefill chunk")
        return lambda: self.g.ggml_gallocr_free(allocator)

    def close(self) -> None:
        if self.allocator:
            self.g.ggml_gallocr_free(self.allocator)
            self.allocator = 0


def set_input(g: Any, tensor: int, values: np.ndarray) -> None:
    """Copy a contiguous numpy array into a graph input tensor of the same byte size (ggml
    aborts the process on a write past the tensor: refused here instead)."""
    if not values.flags.c_contiguous or values.nbytes != g.ggml_nbytes(tensor):
        raise ValueError(f"an input of {values.nbytes} bytes does not fit a tensor of "
                         f"{g.ggml_nbytes(tensor)}")
    if not g.tensor(tensor).buffer:  # an input no operation reads is never allocated
        raise ComputeError("a graph input has no memory: no operation of the graph reads it")
    g.ggml_backend_tensor_set(tensor, values.ctypes.data, 0, values.nbytes)


def get_output(g: Any, tensor: int, out: np.ndarray) -> np.ndarray:
    """Copy a graph output tensor into a contiguous numpy array of the same byte size."""
    g.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
    return out
