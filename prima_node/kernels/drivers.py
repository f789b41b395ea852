"""Parallel drivers over weight rows: decode matvec, small-batch matmul, tile dequantisation.

One compiled function per operation dispatches on the kernel kind per row (a perfectly predicted
branch), so the whole set compiles once into numba's on-disk cache instead of once per type.

The inner loop lengths (``n16`` = 16, ``n32`` = 32) arrive from Python as run-time arguments on
purpose: written as literals here they become compile-time trip counts after inlining, and LLVM
then unrolls the block loops into scalar code, 5x slower (measured on Q8_0).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blocks

_F = np.float32


@njit(inline="always", fastmath=True, cache=True)
def _dot(kind, w8, wi8, w16, rb, x, xs16, k, n16, n32):
    if kind == blocks.Q4_K:
        return blocks.dot_q4_k(w8, w16, rb, x, xs16, k // 256, n32)
    if kind == blocks.Q6_K:
        return blocks.dot_q6_k(w8, wi8, w16, rb, x, xs16, k // 256, n16)
    if kind == blocks.Q8_0:
        return blocks.dot_q8_0(wi8, w16, rb, x, k // 32, n32)
    if kind == blocks.Q5_K:
        return blocks.dot_q5_k(w8, w16, rb, x, xs16, k // 256, n32)
    if kind == blocks.Q4_0:
        return blocks.dot_q4_0(w8, w16, rb, x, xs16, k // 32, n16)
    if kind == blocks.Q4_1:
        return blocks.dot_q4_1(w8, w16, rb, x, xs16, k // 32, n16)
    if kind == blocks.Q5_0:
        return blocks.dot_q5_0(w8, w16, rb, x, xs16, k // 32, n16)
    if kind == blocks.Q5_1:
        return blocks.dot_q5_1(w8, w16, rb, x, xs16, k // 32, n16)
    if kind == blocks.F16:
        return blocks.dot_f16(w16, rb, x, k)
    return blocks.dot_bf16(w16, rb, x, k)


@njit(inline="always", fastmath=True, cache=True)
def _deq(kind, w8, wi8, w16, rb, out, k, n16, n32):
    if kind == blocks.Q4_K:
        blocks.deq_q4_k(w8, w16, rb, out, k // 256, n32)
    elif kind == blocks.Q6_K:
        blocks.deq_q6_k(w8, wi8, w16, rb, out, k // 256, n16)
    elif kind == blocks.Q8_0:
        blocks.deq_q8_0(wi8, w16, rb, out, k // 32, n32)
    elif kind == blocks.Q5_K:
        blocks.deq_q5_k(w8, w16, rb, out, k // 256, n32)
    elif kind == blocks.Q4_0:
        blocks.deq_q4_0(w8, w16, rb, out, k // 32, n16)
    elif kind == blocks.Q4_1:
        blocks.deq_q4_1(w8, w16, rb, out, k // 32, n16)
    elif kind == blocks.Q5_0:
        blocks.deq_q5_0(w8, w16, rb, out, k // 32, n16)
    elif kind == blocks.Q5_1:
        blocks.deq_q5_1(w8, w16, rb, out, k // 32, n16)
    elif kind == blocks.F16:
        blocks.deq_f16(w16, rb, out, k)
    else:
        blocks.deq_bf16(w16, rb, out, k)


@njit(fastmath=True, cache=True, nogil=True)
def group_sums16(x, xs16):
    """Sums of x over consecutive groups of 16 (shared by every row of a matvec)."""
    for g in range(xs16.size):
        s = _F(0.0)
        for i in range(16):
            s += x[16 * g + i]
        xs16[g] = s


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matvec(kind, w8, wi8, w16, row_bytes, x, out, n16, n32):
    """out[r] = W[r, :] . x for every row (decode: one token)."""
    k = x.size
    xs16 = np.empty(k // 16, dtype=np.float32)
    group_sums16(x, xs16)
    for r in prange(out.size):
        out[r] = _dot(kind, w8, wi8, w16, r * row_bytes, x, xs16, k, n16, n32)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_fused(kind, w8, wi8, w16, row_bytes, X, out, n16, n32):
    """out[t, r] = W[r, :] . X[t, :] for a few tokens, one fused pass over the weights.

    Per row, the dot products of all tokens are taken from the same bytes while they are in L1;
    the weights are read once for the batch, not once per token.
    """
    t_n, k = X.shape
    n_rows = out.shape[1]
    ng = k // 16
    xs16 = np.empty((t_n, ng), dtype=np.float32)
    for t in range(t_n):
        group_sums16(X[t], xs16[t])
    for r in prange(n_rows):
        for t in range(t_n):
            out[t, r] = _dot(kind, w8, wi8, w16, r * row_bytes, X[t], xs16[t], k, n16,
                             n32)


@njit(fastmath=True, cache=True, nogil=True)
def dequant_rows(kind, w8, wi8, w16, row_bytes, r0, out, n16, n32):
    """Rows r0 .. r0 + len(out) of W as float32 (a tile for the BLAS prefill path).

    Runs on the calling thread alone, on purpose: it alternates with multi-threaded BLAS, and
    on a 2-core machine numba's and OpenBLAS's worker threads spin-waiting against each other
    made both 3x slower; dequantising is a small part of a prefill (one pass over the weights
    against 2 x tokens flops per weight in the GEMM).
    """
    k = out.shape[1]
    for i in range(out.shape[0]):
        _deq(kind, w8, wi8, w16, (r0 + i) * row_bytes, out[i], k, n16, n32)
