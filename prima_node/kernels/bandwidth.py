"""Memory read bandwidth of this machine, measured the way the decode kernels read weights.

Decode of one token reads every weight once, so its speed limit is the rate at which cores can
stream memory. This measures that rate with a parallel read-only pass (no writes, which would
halve the figure), the reference the benchmark compares the engine's weight throughput with.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

from .. import _jit_cache  # noqa: F401  (must precede the compiled functions)


@njit(parallel=True, cache=True, nogil=True)
def _read_all(buf, chunks):
    n = buf.size
    step = (n + chunks - 1) // chunks
    acc = np.zeros(chunks, dtype=np.uint64)
    for c in prange(chunks):
        seg = buf[c * step: min(n, (c + 1) * step)]  # slice: keeps the loop vectorised
        s = np.uint64(0)
        for i in range(seg.size):
            s ^= seg[i]
        acc[c] = s
    return acc


def memory_read_bandwidth(size_mib: int = 512, repeats: int = 5, threads: int = 0) -> float:
    """Best-of-``repeats`` read bandwidth in GB/s over a buffer far larger than the caches."""
    import numba

    if threads:
        numba.set_num_threads(threads)
    buf = np.ones(size_mib * 2**20 // 8, dtype=np.uint64)
    chunks = numba.get_num_threads() * 8
    _read_all(buf[:1024], chunks)  # compile / load from cache outside the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _read_all(buf, chunks)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9
