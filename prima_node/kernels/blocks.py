"""Per-type block arithmetic on raw GGUF bytes: fused dot products and row dequantisation.

Each ``dot_*`` computes one weight row times the activation vector straight from the file's block
bytes, without materialising the dequantised row: the scale of a block multiplies a partial sum,
and the constant offsets of the format (Q4_0's -8, the K-quant minimums) are applied once per
block through precomputed sums of the activations over 16-value groups (``xs16``), which every row
shares. Each ``deq_*`` writes one row as float32 for the batched (prefill) path.

Layouts follow ggml's block structs (ggml-common.h). ``w8``/``wi8``/``w16`` are uint8 / int8 /
uint16 views of the same flat tensor bytes (every supported block size is even and every block's
half-precision scales sit at even offsets, so the uint16 view can read them directly). ``rb`` is
the byte offset of the row. Inner loop lengths come in as arguments (``n``, always 16 or 32):
a compile-time constant trip count makes LLVM unroll the loop into slower scalar code.

Every inner loop indexes a per-block slice (``blk``, ``xb``) with the loop's own induction
variable. Indexing the flat arrays with a computed offset instead makes numba emit its
negative-index wrap-around check on every element, which LLVM cannot prove away and which stops
vectorisation: measured 10x slower (1.3 vs 13 GB/s of Q8_0 per core).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from ._intrinsics import bits_to_f32, half_to_f32, prefetch

# Kernel kind codes (one per supported type with a kernel; F32 uses BLAS directly).
F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K = range(10)

#: Bytes ahead of the current block to prefetch. Software prefetch of weights streaming from
#: DRAM nearly doubled throughput in the prototype (shared perf-notes); this distance was not
#: tuned on this machine.
PF = 1536

_F = np.float32
_JIT: dict[str, Any] = {"inline": "always", "fastmath": True, "cache": True}


@njit(**_JIT)
def _pf(w8, o, nbytes):
    for p in range(0, nbytes, 64):
        prefetch(w8, o + PF + p)


# ---------------------------------------------------------------------------- float types

#: float types are processed in chunks, so the prefetch sits outside the vectorised loop
_CHUNK = 256


@njit(**_JIT)
def dot_f16(w16, rb, x, k):
    acc = _F(0.0)
    base = rb >> 1
    for c in range(0, k, _CHUNK):
        m = min(_CHUNK, k - c)
        prefetch(w16, base + c + PF)
        seg = w16[base + c: base + c + m]
        xs = x[c: c + m]
        for i in range(m):
            acc += half_to_f32(seg[i]) * xs[i]
    return acc


@njit(**_JIT)
def deq_f16(w16, rb, out, k):
    seg = w16[(rb >> 1): (rb >> 1) + k]
    for i in range(k):
        out[i] = half_to_f32(seg[i])


@njit(**_JIT)
def dot_bf16(w16, rb, x, k):
    acc = _F(0.0)
    base = rb >> 1
    for c in range(0, k, _CHUNK):
        m = min(_CHUNK, k - c)
        prefetch(w16, base + c + PF)
        seg = w16[base + c: base + c + m]
        xs = x[c: c + m]
        for i in range(m):
            acc += bits_to_f32(np.uint32(seg[i]) << np.uint32(16)) * xs[i]
    return acc


@njit(**_JIT)
def deq_bf16(w16, rb, out, k):
    seg = w16[(rb >> 1): (rb >> 1) + k]
    for i in range(k):
        out[i] = bits_to_f32(np.uint32(seg[i]) << np.uint32(16))


# ---------------------------------------------------------------------------- Q8_0 (34 B / 32)


@njit(**_JIT)
def dot_q8_0(wi8, w16, rb, x, nb, n):
    acc = _F(0.0)
    for b in range(nb):
        o = rb + b * 34
        prefetch(wi8, o + PF)
        d = half_to_f32(w16[o >> 1])
        blk = wi8[o + 2: o + 34]
        xb = x[b * 32: b * 32 + 32]
        s = _F(0.0)
        for i in range(n):
            s += _F(blk[i]) * xb[i]
        acc += d * s
    return acc


@njit(**_JIT)
def deq_q8_0(wi8, w16, rb, out, nb, n):
    for b in range(nb):
        o = rb + b * 34
        d = half_to_f32(w16[o >> 1])
        blk = wi8[o + 2: o + 34]
        ob = out[b * 32: b * 32 + 32]
        for i in range(n):
            ob[i] = d * _F(blk[i])


# ------------------------------------------------------------ Q4_0 (18 B / 32), Q4_1 (20 B / 32)


@njit(**_JIT)
def _nibble_dot(blk, xb, n):
    """Low nibbles times xb[0:16] plus high nibbles times xb[16:32]."""
    s = _F(0.0)
    for i in range(n):
        q = blk[i]
        s += _F(q & 15) * xb[i] + _F(q >> 4) * xb[16 + i]
    return s


@njit(**_JIT)
def dot_q4_0(w8, w16, rb, x, xs16, nb, n):
    acc = _F(0.0)
    for b in range(nb):
        o = rb + b * 18
        prefetch(w8, o + PF)
        d = half_to_f32(w16[o >> 1])
        s = _nibble_dot(w8[o + 2: o + 18], x[b * 32: b * 32 + 32], n)
        acc += d * (s - _F(8.0) * (xs16[2 * b] + xs16[2 * b + 1]))
    return acc


@njit(**_JIT)
def deq_q4_0(w8, w16, rb, out, nb, n):
    for b in range(nb):
        o = rb + b * 18
        d = half_to_f32(w16[o >> 1])
        blk = w8[o + 2: o + 18]
        ob = out[b * 32: b * 32 + 32]
        for i in range(n):
            q = blk[i]
            ob[i] = d * _F(np.int32(q & 15) - 8)
            ob[16 + i] = d * _F(np.int32(q >> 4) - 8)


@njit(**_JIT)
def dot_q4_1(w8, w16, rb, x, xs16, nb, n):
    acc = _F(0.0)
    for b in range(nb):
        o = rb + b * 20
        prefetch(w8, o + PF)
        d = half_to_f32(w16[o >> 1])
        m = half_to_f32(w16[(o >> 1) + 1])
        s = _nibble_dot(w8[o + 4: o + 20], x[b * 32: b * 32 + 32], n)
        acc += d * s + m * (xs16[2 * b] + xs16[2 * b + 1])
    return acc


@njit(**_JIT)
def deq_q4_1(w8, w16, rb, out, nb, n):
    for b in range(nb):
        o = rb + b * 20
        d = half_to_f32(w16[o >> 1])
        m = half_to_f32(w16[(o >> 1) + 1])
        blk = w8[o + 4: o + 20]
        ob = out[b * 32: b * 32 + 32]
        for i in range(n):
            q = blk[i]
            ob[i] = d * _F(q & 15) + m
            ob[16 + i] = d * _F(q >> 4) + m


# ------------------------------------------------------------ Q5_0 (22 B / 32), Q5_1 (24 B / 32)


@njit(**_JIT)
def _qh32(w8, o):
    return (np.uint32(w8[o]) | (np.uint32(w8[o + 1]) << np.uint32(8))
            | (np.uint32(w8[o + 2]) << np.uint32(16)) | (np.uint32(w8[o + 3]) << np.uint32(24)))


@njit(**_JIT)
def _q5_dot(blk, qh, xb, n):
    """Dot of the 5-bit values (nibble | fifth bit from qh) with xb[0:32]."""
    s = _F(0.0)
    for i in range(n):
        q = np.uint32(blk[i])
        lo = (q & np.uint32(15)) | (((qh >> np.uint32(i)) & np.uint32(1)) << np.uint32(4))
        hi = (q >> np.uint32(4)) | (((qh >> np.uint32(i + 16)) & np.uint32(1)) << np.uint32(4))
        s += _F(lo) * xb[i] + _F(hi) * xb[16 + i]
    return s


@njit(**_JIT)
def _q5_deq(blk, qh, ob, d, m, n):
    for i in range(n):
        q = np.uint32(blk[i])
        lo = (q & np.uint32(15)) | (((qh >> np.uint32(i)) & np.uint32(1)) << np.uint32(4))
        hi = (q >> np.uint32(4)) | (((qh >> np.uint32(i + 16)) & np.uint32(1)) << np.uint32(4))
        ob[i] = d * _F(lo) + m
        ob[16 + i] = d * _F(hi) + m


@njit(**_JIT)
def dot_q5_0(w8, w16, rb, x, xs16, nb, n):
    acc = _F(0.0)
    for b in range(nb):
        o = rb + b * 22
        prefetch(w8, o + PF)
        d = half_to_f32(w16[o >> 1])
        s = _q5_dot(w8[o + 6: o + 22], _qh32(w8, o + 2), x[b * 32: b * 32 + 32], n)
        acc += d * (s - _F(16.0) * (xs16[2 * b] + xs16[2 * b + 1]))
    return acc


@njit(**_JIT)
def deq_q5_0(w8, w16, rb, out, nb, n):
    for b in range(nb):
        o = rb + b * 22
        d = half_to_f32(w16[o >> 1])
        _q5_deq(w8[o + 6: o + 22], _qh32(w8, o + 2), out[b * 32: b * 32 + 32], d,
                _F(-16.0) * d, n)


@njit(**_JIT)
def dot_q5_1(w8, w16, rb, x, xs16, nb, n):
    acc = _F(0.0)
    for b in range(nb):
        o = rb + b * 24
        prefetch(w8, o + PF)
        d = half_to_f32(w16[o >> 1])
        m = half_to_f32(w16[(o >> 1) + 1])
        s = _q5_dot(w8[o + 8: o + 24], _qh32(w8, o + 4), x[b * 32: b * 32 + 32], n)
        acc += d * s + m * (xs16[2 * b] + xs16[2 * b + 1])
    return acc


@njit(**_JIT)
def deq_q5_1(w8, w16, rb, out, nb, n):
    for b in range(nb):
        o = rb + b * 24
        d = half_to_f32(w16[o >> 1])
        m = half_to_f32(w16[(o >> 1) + 1])
        _q5_deq(w8[o + 8: o + 24], _qh32(w8, o + 4), out[b * 32: b * 32 + 32], d, m, n)


# ------------------------------------------------------------ K-quants (256 values per block)


@njit(**_JIT)
def _scale_min_k4(sc, j):
    """6-bit scale and min of sub-block j from the 12 packed bytes ``sc`` (get_scale_min_k4)."""
    if j < 4:
        return _F(sc[j] & 63), _F(sc[j + 4] & 63)
    s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
    m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
    return _F(s), _F(m)


@njit(**_JIT)
def _dot_k_affine(w8, w16, rb, x, xs16, nb, n, size, qs_at, fifth_bit):
    """Q4_K (144 B / 256) and Q5_K (176 B / 256): d, dmin, 12 packed 6-bit scale/min bytes,
    for Q5_K 32 bytes of fifth bits, then 128 nibble bytes; 8 sub-blocks of 32 values, each
    value = d * scale * q - dmin * min. ``fifth_bit`` is a constant at each call site, so the
    compiler removes the branch from the loop.
    """
    acc = _F(0.0)
    for b in range(nb):
        o = rb + b * size
        _pf(w8, o, size)
        d = half_to_f32(w16[o >> 1])
        dmin = half_to_f32(w16[(o >> 1) + 1])
        sc = w8[o + 4: o + 16]
        qh = w8[o + 16: o + 48]
        xg = xs16[b * 16: b * 16 + 16]
        sumq = _F(0.0)
        summ = _F(0.0)
        for j in range(4):
            sc1, m1 = _scale_min_k4(sc, 2 * j)
            sc2, m2 = _scale_min_k4(sc, 2 * j + 1)
            qs = w8[o + qs_at + 32 * j: o + qs_at + 32 + 32 * j]
            xb = x[b * 256 + 64 * j: b * 256 + 64 * j + 64]
            sh1 = 2 * j
            sh2 = 2 * j + 1
            s1 = _F(0.0)
            s2 = _F(0.0)
            for i in range(n):
                q = qs[i]
                lo = q & 15
                hi = q >> 4
                if fifth_bit:
                    h = qh[i]
                    lo |= ((h >> sh1) & 1) << 4
                    hi |= ((h >> sh2) & 1) << 4
                s1 += _F(lo) * xb[i]
                s2 += _F(hi) * xb[32 + i]
            sumq += sc1 * s1 + sc2 * s2
            summ += m1 * (xg[4 * j] + xg[4 * j + 1]) + m2 * (xg[4 * j + 2] + xg[4 * j + 3])
        acc += d * sumq - dmin * summ
    return acc


@njit(**_JIT)
def _deq_k_affine(w8, w16, rb, out, nb, n, size, qs_at, fifth_bit):
    for b in range(nb):
        o = rb + b * size
        d = half_to_f32(w16[o >> 1])
        dmin = half_to_f32(w16[(o >> 1) + 1])
        sc = w8[o + 4: o + 16]
        qh = w8[o + 16: o + 48]
        for j in range(4):
            sc1, m1 = _scale_min_k4(sc, 2 * j)
            sc2, m2 = _scale_min_k4(sc, 2 * j + 1)
            d1, mm1, d2, mm2 = d * sc1, dmin * m1, d * sc2, dmin * m2
            qs = w8[o + qs_at + 32 * j: o + qs_at + 32 + 32 * j]
            ob = out[b * 256 + 64 * j: b * 256 + 64 * j + 64]
            sh1 = 2 * j
            sh2 = 2 * j + 1
            for i in range(n):
                q = qs[i]
                lo = q & 15
                hi = q >> 4
                if fifth_bit:
                    h = qh[i]
                    lo |= ((h >> sh1) & 1) << 4
                    hi |= ((h >> sh2) & 1) << 4
                ob[i] = d1 * _F(lo) - mm1
                ob[32 + i] = d2 * _F(hi) - mm2


@njit(**_JIT)
def dot_q4_k(w8, w16, rb, x, xs16, nb, n):
    return _dot_k_affine(w8, w16, rb, x, xs16, nb, n, 144, 16, False)


@njit(**_JIT)
def deq_q4_k(w8, w16, rb, out, nb, n):
    _deq_k_affine(w8, w16, rb, out, nb, n, 144, 16, False)


@njit(**_JIT)
def dot_q5_k(w8, w16, rb, x, xs16, nb, n):
    return _dot_k_affine(w8, w16, rb, x, xs16, nb, n, 176, 48, True)


@njit(**_JIT)
def deq_q5_k(w8, w16, rb, out, nb, n):
    _deq_k_affine(w8, w16, rb, out, nb, n, 176, 48, True)


@njit(**_JIT)
def dot_q6_k(w8, wi8, w16, rb, x, xs16, nb, n):
    """Q6_K (210 B / 256): 128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 scales, d.

    Values are 6-bit minus 32, with one scale per 16 values; the -32 is applied through xs16.
    """
    acc = _F(0.0)
    for b in range(nb):
        o = rb + b * 210
        _pf(w8, o, 210)
        d = half_to_f32(w16[(o + 208) >> 1])
        blk = _F(0.0)
        for half in range(2):
            ql = w8[o + 64 * half: o + 64 * half + 64]
            qh = w8[o + 128 + 32 * half: o + 160 + 32 * half]
            sc = wi8[o + 192 + 8 * half: o + 200 + 8 * half]
            xh = x[b * 256 + 128 * half: b * 256 + 128 * half + 128]
            xg = xs16[b * 16 + 8 * half: b * 16 + 8 * half + 8]
            for g in range(2):
                lo = 16 * g
                qa = ql[lo: lo + 16]
                qc = ql[32 + lo: 48 + lo]
                hh = qh[lo: lo + 16]
                x1 = xh[lo: lo + 16]
                x2 = xh[32 + lo: 48 + lo]
                x3 = xh[64 + lo: 80 + lo]
                x4 = xh[96 + lo: 112 + lo]
                s1 = _F(0.0)
                s2 = _F(0.0)
                s3 = _F(0.0)
                s4 = _F(0.0)
                for i in range(n):
                    a = qa[i]
                    c = qc[i]
                    h = hh[i]
                    s1 += _F((a & 15) | ((h & 3) << 4)) * x1[i]
                    s2 += _F((c & 15) | (((h >> 2) & 3) << 4)) * x2[i]
                    s3 += _F((a >> 4) | (((h >> 4) & 3) << 4)) * x3[i]
                    s4 += _F((c >> 4) | (((h >> 6) & 3) << 4)) * x4[i]
                blk += (_F(sc[g]) * (s1 - _F(32.0) * xg[g])
                        + _F(sc[g + 2]) * (s2 - _F(32.0) * xg[g + 2])
                        + _F(sc[g + 4]) * (s3 - _F(32.0) * xg[g + 4])
                        + _F(sc[g + 6]) * (s4 - _F(32.0) * xg[g + 6]))
        acc += d * blk
    return acc


@njit(**_JIT)
def deq_q6_k(w8, wi8, w16, rb, out, nb, n):
    for b in range(nb):
        o = rb + b * 210
        d = half_to_f32(w16[(o + 208) >> 1])
        for half in range(2):
            ql = w8[o + 64 * half: o + 64 * half + 64]
            qh = w8[o + 128 + 32 * half: o + 160 + 32 * half]
            sc = wi8[o + 192 + 8 * half: o + 200 + 8 * half]
            oh = out[b * 256 + 128 * half: b * 256 + 128 * half + 128]
            for g in range(2):
                lo = 16 * g
                qa = ql[lo: lo + 16]
                qc = ql[32 + lo: 48 + lo]
                hh = qh[lo: lo + 16]
                o1 = oh[lo: lo + 16]
                o2 = oh[32 + lo: 48 + lo]
                o3 = oh[64 + lo: 80 + lo]
                o4 = oh[96 + lo: 112 + lo]
                c1 = d * _F(sc[g])
                c2 = d * _F(sc[g + 2])
                c3 = d * _F(sc[g + 4])
                c4 = d * _F(sc[g + 6])
                for i in range(n):
                    a = qa[i]
                    c = qc[i]
                    h = hh[i]
                    o1[i] = c1 * _F(np.int32((a & 15) | ((h & 3) << 4)) - 32)
                    o2[i] = c2 * _F(np.int32((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                    o3[i] = c3 * _F(np.int32((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                    o4[i] = c4 * _F(np.int32((c >> 4) | (((h >> 6) & 3) << 4)) - 32)
