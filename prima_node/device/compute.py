"""The engine's own speed on this device, per weight type: what Halda's compute term divides by.

Measured with ggml, the library the node computes with, at the node's thread count, on matrices
of a real layer's width: the decode matrix-vector product (one token) and the prefill product (a
batch of tokens). Weight values do not change the speed, so one block of rows, quantised by ggml
itself (every type it runs, importance-matrix types included), is repeated to fill the matrix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
from gguf import GGMLQuantizationType

from .. import ggml
from ..engine.backend import (
    Backend,
    Compute,
    DeviceBuffer,
    FileBuffer,
    aligned_bytes,
    get_output,
    set_input,
)
from ..engine.graph import Builder
from ..quant_types import SUPPORTED_TYPES

PREFILL_TOKENS = 64
_BLOCK_ROWS = 16


def quantized_rows(qtype: GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """``rows`` rows of ``cols`` weights in ``qtype``'s encoding (one quantised block of rows,
    repeated), as raw bytes."""
    g = ggml.load()
    values = (np.random.default_rng(0).standard_normal((_BLOCK_ROWS, cols)) * 0.02).astype(
        np.float32)
    block = np.empty(_BLOCK_ROWS * g.ggml_row_size(int(qtype), cols), np.uint8)
    imatrix = np.ones(cols, np.float32)
    needs = g.ggml_quantize_requires_imatrix(int(qtype))
    g.ggml_quantize_chunk(int(qtype), values.ctypes.data, block.ctypes.data, 0, _BLOCK_ROWS,
                          cols, imatrix.ctypes.data if needs else None)
    out = aligned_bytes(block.nbytes * (rows // _BLOCK_ROWS))
    out.reshape(-1, block.nbytes)[:] = block
    return out


class MatmulProbe:
    """One weight matrix and the graphs multiplying it by each of ``batches`` tokens (each
    graph with its own compute buffer, so that its input stays set between runs). On a GPU
    backend the matrix is copied into the GPU's memory first, as GPU layers are."""

    def __init__(self, backend: Backend, weight: np.ndarray, qtype: int, rows: int, cols: int,
                 batches: Iterable[int]) -> None:
        self.backend = backend
        self.buffer = FileBuffer(weight)
        self.graphs: dict[int, tuple[Builder, Compute, np.ndarray]] = {}
        self._held = Builder(2)  # the GPU's copy of the matrix, shared by the graphs
        self._device: DeviceBuffer | None = None
        try:
            self._build(weight, qtype, rows, cols, batches)
        except BaseException:
            self.close()
            raise

    def _build(self, weight: np.ndarray, qtype: int, rows: int, cols: int,
               batches: Iterable[int]) -> None:
        backend = self.backend
        shared = 0
        if not backend.is_cpu:
            shared = self._held.g.ggml_new_tensor_2d(self._held.ctx, qtype, cols, rows)
            self._device = DeviceBuffer(self._held.ctx, backend.buffer_type)
            self._held.g.ggml_backend_tensor_set(shared, self.buffer.base, 0, weight.nbytes)
        rng = np.random.default_rng(1)
        for t in batches:
            b = Builder(8)
            if shared:
                w = shared
            else:
                w = b.g.ggml_new_tensor_2d(b.ctx, qtype, cols, rows)
                self.buffer.place(w, 0)
            x = b.input("x", ggml.TYPE_F32, cols, t)
            y = b.g.ggml_mul_mat(b.ctx, w, x)
            b.g.ggml_set_output(y)
            b.expand(y)
            compute = Compute(backend)
            self.graphs[t] = (b, compute, np.empty(0, np.float32))  # freed by close() if the
            compute.allocate(b.graph)  # allocation fails
            values = rng.standard_normal((t, cols)).astype(np.float32)
            set_input(b.g, x, values)
            self.graphs[t] = (b, compute, values)

    def run(self, tokens: int) -> None:
        self.backend.compute(self.graphs[tokens][0].graph)

    def close(self) -> None:
        for b, compute, _ in self.graphs.values():
            b.free()
            compute.close()
        if self._device is not None:
            self._device.close()
        self._held.free()
        self.buffer.close()


def best_time(fn: Callable[[], object], budget_s: float, min_runs: int = 3) -> float:
    """The fastest of as many runs as fit in ``budget_s`` (at least ``min_runs``)."""
    fn()  # warm: caches, and the first touch of the work buffer
    best, runs, t_end = float("inf"), 0, time.perf_counter() + budget_s
    while runs < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if runs >= 200:
            break
    return best


def kernel_flops(types: Iterable[str], *, threads: int, weight_mib: int = 256, cols: int = 4096,
                 budget_s: float = 0.4, device: int | None = None
                 ) -> dict[str, dict[str, float]]:
    """FLOP/s of ggml's decode and prefill matrix products for each weight type name.

    The matrix holds ``weight_mib`` of weights, far beyond the last-level cache (as the memory
    bandwidth probe's buffer): ggml's decode products run at memory speed, so a cache-resident
    matrix priced the 1b preset's layers 1.8x too fast (2048 x 4096) and 64 MiB still 1.4x
    (two cores of this VM can share 64 MiB of cache). The profile passes less on a device
    that cannot spare it. ``device``: measure that GPU's kernels instead of the CPU's."""
    backend = Backend(threads, device)
    out: dict[str, dict[str, float]] = {}
    try:
        for name in types:
            qtype = GGMLQuantizationType[name]
            if qtype not in SUPPORTED_TYPES:
                continue
            row_bytes = backend.g.ggml_row_size(int(qtype), cols)
            rows = max(_BLOCK_ROWS, weight_mib * 2**20 // row_bytes // _BLOCK_ROWS * _BLOCK_ROWS)
            probe = MatmulProbe(backend, quantized_rows(qtype, rows, cols), int(qtype), rows,
                                cols, (1, PREFILL_TOKENS))
            try:
                flops = 2.0 * rows * cols
                t_vec = best_time(partial(probe.run, 1), budget_s)
                t_mat = best_time(partial(probe.run, PREFILL_TOKENS), budget_s)
            finally:
                probe.close()
            out[name] = {"decode_flops": flops / t_vec,
                         "prefill_flops": flops * PREFILL_TOKENS / t_mat}
    finally:
        backend.close()
    return out


def memory_read_bandwidth(size_mib: int = 256, repeats: int = 5, threads: int = 1) -> float:
    """Best-of-``repeats`` read bandwidth in GB/s over a buffer far larger than the caches,
    read the way decode reads weights: a float32 matrix-vector product (memory-bound: two
    FLOPs per four bytes), on ``threads`` threads."""
    cols = 4096
    rows = max(_BLOCK_ROWS, size_mib * 2**20 // (4 * cols))
    weight = aligned_bytes(rows * cols * 4)
    weight.view(np.float32)[:] = 1.0  # touched: really in memory
    backend = Backend(threads)
    probe = MatmulProbe(backend, weight, ggml.TYPE_F32, rows, cols, (1,))
    try:
        best = best_time(lambda: probe.run(1), 0.0, min_runs=repeats)
    finally:
        probe.close()
        backend.close()
    return weight.nbytes / best / 1e9


def copy_seconds(device: int, n_embd: int, repeats: int = 20) -> float:
    """A token's hidden state (``n_embd`` float32) to a device and back: what a window's GPU
    part adds to each token on top of its kernels (best of ``repeats``)."""
    backend = Backend(1, device)
    b = Builder(2)
    try:
        t = b.g.ggml_new_tensor_1d(b.ctx, ggml.TYPE_F32, n_embd)
        buf = DeviceBuffer(b.ctx, backend.buffer_type)
        try:
            x = np.ones(n_embd, np.float32)
            out = np.empty_like(x)

            def once() -> None:
                set_input(b.g, t, x)
                get_output(b.g, t, out)

            return best_time(once, 0.0, min_runs=repeats)
        finally:
            buf.close()
    finally:
        b.free()
        backend.close()


def layer_decode_seconds(model: str | os.PathLike[str], threads: int, layer: int = 0,
                         steps: int = 8, passes: int = 4) -> float:
    """Time of one decode step through one real layer of the model, its weights in memory and
    laid out as in the file (as a streaming node runs them): the best of ``passes`` runs of
    the same ``steps`` tokens (the first touches the pages; a mixture then routes the same
    tokens to the same, now resident, experts), as the kernel probes take their best run.

    The probes above price each weight type alone on one big matrix; a real layer also runs
    smaller matrices (each with its start-up cost), norms, RoPE, attention, routing and the
    graph around them. On this machine that made the 1b presets' layers 1.1-1.5x slower than
    the kernels alone priced them: the profile records both, and the planner scales the
    kernels' speeds by the ratio."""
    from ..engine.model import Model

    with Model.open(model, threads=threads, n_ctx=64, repack=False) as m:
        window = m.window(layer, layer + 1)
        hidden = m.embed(np.arange(1, steps + 1) % m.config.n_vocab)  # real hidden states
        best = float("inf")
        for _ in range(passes):
            window.clear("profile")
            t0 = time.perf_counter()
            for i in range(steps):
                window.forward(hidden[i:i + 1], np.array([i], np.int64), "profile")
            best = min(best, (time.perf_counter() - t0) / steps)
    return best
