"""Quantise float32 weights into GGUF tensor data, in vectorised numpy.

Block layouts and rounding follow llama.cpp's reference quantisers
(ggml/src/ggml-quants.c, ``quantize_row_*_ref``) so that llama.cpp and our own
readers decode the bytes exactly as intended. The K-quant scale searches
(``make_qkx2_quants`` for Q4_K/Q5_K, ``make_qx_quants`` for Q6_K) are the same
searches, but every candidate is evaluated for all sub-blocks of a chunk at once
instead of one sub-block at a time, because a per-block Python loop would be
orders of magnitude too slow for multi-gigabyte models. Results are not
bit-identical to llama.cpp (float summation order and the closed-form error
differ), but they are valid blocks with the same error level.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["SUPPORTED_TYPES", "quantize"]

QK_K = 256

# Weights handled per working chunk. The K-quant searches make ~150 passes over
# each chunk plus ~25 small per-group vector operations per candidate: 2^17
# measured fastest (2^18 spills the temporaries out of cache, 2^15 pays the
# per-call numpy overhead too often). It also bounds the temporary memory to a
# few MiB whatever the tensor size.
_CHUNK_WEIGHTS = 1 << 17

_F32 = np.float32

# GROUP_MAX_EPS in ggml-quants.c: below this a group counts as all-zero.
_GROUP_MAX_EPS = 1e-15

BlockFn = Callable[[np.ndarray], np.ndarray]


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Return the raw GGUF tensor data for ``values`` stored as ``qtype``.

    The result is meant for ``GGUFWriter.add_tensor(name, arr, raw_dtype=qtype)``:
    float32/float16 arrays for F32/F16 (the writer takes their shape directly),
    and uint8 arrays whose last axis is the row's byte length for BF16 and the
    block types (the writer derives the element shape from the byte shape).
    Leading axes are kept, so a 1-D input (a norm vector) stays 1-D and is not
    turned into a one-row matrix.
    """
    qtype = GGMLQuantizationType(qtype)
    x = np.ascontiguousarray(values, dtype=_F32)
    if x.ndim == 0:
        raise ValueError("cannot quantise a 0-d array: GGUF tensors have at least one axis")

    if qtype == GGMLQuantizationType.F32:
        return x
    if qtype == GGMLQuantizationType.F16:
        return x.astype(np.float16)
    if qtype == GGMLQuantizationType.BF16:
        return _to_bf16(x).view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * 2)

    fn = _BLOCK_QUANTISERS.get(qtype)
    if fn is None:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"quantisation to {qtype.name} is not supported (supported: {names})")

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    cols = x.shape[-1]
    if cols % block_size != 0:
        raise ValueError(
            f"row length {cols} is not a multiple of the {qtype.name} block size {block_size}"
        )

    blocks = x.reshape(-1, block_size)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, blocks.shape[0], step):
            chunk = blocks[start : start + step]
            if not np.isfinite(chunk).all():
                # A NaN/inf scale makes llama.cpp reject the whole file at load
                # time (ggml_validate_row_data); fail here, where the cause is known.
                raise ValueError(f"cannot quantise non-finite values to {qtype.name}")
            out[start : start + step] = fn(chunk)
    return out.reshape(*x.shape[:-1], cols // block_size * type_size)


# ---------------------------------------------------------------------------
# helpers


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 bits exactly as ggml_compute_fp32_to_bf16 does.

    Plain truncation (what a naive view would give) biases every weight towards
    zero; ggml rounds to nearest-even and keeps NaNs quiet, and files written by
    both must agree bit for bit.
    """
    u = x.view(np.uint32)
    out = np.empty(u.shape, dtype=np.uint16)
    flat_u = u.reshape(-1)
    flat_out = out.reshape(-1)
    step = 1 << 20
    for start in range(0, flat_u.size, step):
        c = flat_u[start : start + step]
        # uint32 wrap-around can only happen for NaN bit patterns, which are
        # replaced just below.
        r = (c + (np.uint32(0x7FFF) + ((c >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        nan = (c & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        r = np.where(nan, (c >> np.uint32(16)) | np.uint32(64), r)
        flat_out[start : start + step] = r.astype(np.uint16)
    return out


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes of a per-block scalar, shape (n, 2)."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    """1/d with 0 where d == 0, as the reference's ``d ? 1.0f/d : 0.0f``."""
    out = np.zeros_like(d)
    np.divide(_F32(1), d, out=out, where=d != 0)
    return out


def _signed_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """The element of largest magnitude, sign kept, first one on ties.

    The symmetric formats put that element on the extreme level (-8 for Q4_0),
    which is one level more than the opposite side can reach.
    """
    idx = np.abs(x).argmax(axis=axis)
    return np.take_along_axis(x, np.expand_dims(idx, axis), axis=axis).squeeze(axis)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: ties go away from zero (numpy's rint goes to even).

    Done in float64 so that adding 0.5 cannot round up values just below a tie.
    """
    v64 = v.astype(np.float64)
    return np.trunc(v64 + np.copysign(0.5, v64))


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F).astype(np.uint8) | ((hi & 0x0F).astype(np.uint8) << np.uint8(4))


# ---------------------------------------------------------------------------
# legacy 32-weight blocks


def _q8_0(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    amax = np.abs(b).max(axis=1)
    d = amax / _F32(127)
    q = _round_half_away(b * _safe_inverse(d)[:, None]).astype(np.int8)
    out = np.empty((n, 34), dtype=np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = q.view(np.uint8)
    return out


def _q4_0(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _signed_absmax(b, 1) / _F32(-8)
    # The reference converts with a C cast, i.e. truncation of a value >= 0.5.
    q = np.minimum(np.trunc(b * _safe_inverse(d)[:, None] + _F32(8.5)), 15)
    q = np.maximum(q, 0).astype(np.uint8)
    out = np.empty((n, 18), dtype=np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = _pack_nibbles(q[:, :16], q[:, 16:])
    return out


def _q4_1(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    lo = b.min(axis=1)
    hi = b.max(axis=1)
    d = (hi - lo) / _F32(15)
    q = np.trunc((b - lo[:, None]) * _safe_inverse(d)[:, None] + _F32(0.5))
    q = np.clip(q, 0, 15).astype(np.uint8)
    out = np.empty((n, 20), dtype=np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(lo)
    out[:, 4:] = _pack_nibbles(q[:, :16], q[:, 16:])
    return out


def _q5_high_bits(q: np.ndarray) -> np.ndarray:
    """The 32 fifth bits as a little-endian uint32 (bit k belongs to weight k)."""
    bits = ((q >> np.uint8(4)) & np.uint8(1)).astype(np.uint8)
    return np.packbits(bits, axis=1, bitorder="little")


def _q5_0(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _signed_absmax(b, 1) / _F32(-16)
    q = np.minimum(np.trunc(b * _safe_inverse(d)[:, None] + _F32(16.5)), 31)
    q = np.maximum(q, 0).astype(np.uint8)
    out = np.empty((n, 22), dtype=np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:6] = _q5_high_bits(q)
    out[:, 6:] = _pack_nibbles(q[:, :16], q[:, 16:])
    return out


def _q5_1(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    lo = b.min(axis=1)
    hi = b.max(axis=1)
    d = (hi - lo) / _F32(31)
    q = np.trunc((b - lo[:, None]) * _safe_inverse(d)[:, None] + _F32(0.5))
    q = np.clip(q, 0, 31).astype(np.uint8)
    out = np.empty((n, 24), dtype=np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(lo)
    out[:, 4:8] = _q5_high_bits(q)
    out[:, 8:] = _pack_nibbles(q[:, :16], q[:, 16:])
    return out


# ---------------------------------------------------------------------------
# K-quant scale searches. Inputs are transposed to (weights_per_group, groups)
# so that every per-group reduction is a run of contiguous vector adds: a
# reduction along a short last axis measured about twice as slow.


def _search_affine(
    xt: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (scale, min) for x ~ scale*l - min with l in [0, nmax].

    llama.cpp's make_qkx2_quants with its Q4_K/Q5_K weights (rms + |x|): try the
    plain min/max grid and ``nstep + 1`` stretched grids, fit scale and offset by
    weighted least squares for each, keep the lowest weighted squared error.
    As in ggml, each later grid is anchored at the best offset found so far, not
    at the data minimum; without that the search lost about 1% of accuracy.
    The error is evaluated in closed form from the sums already needed for the
    fit, which picks the same candidate up to rounding. Returns
    ``(scale, the_min)`` with ``the_min >= 0`` as in ggml.
    """
    xt = xt.astype(_F32, copy=False)
    w = np.abs(xt)
    w += np.sqrt((xt * xt).sum(axis=0) / _F32(xt.shape[0]))
    sw = w.sum(axis=0)
    wx = w * xt
    sx = wx.sum(axis=0)
    lo = np.minimum(xt.min(axis=0), _F32(0))
    hi = xt.max(axis=0)
    flat = hi == lo
    # Keep degenerate groups finite; their result is overwritten at the end.
    hi = np.where(flat, lo + _F32(1), hi)

    lv = np.empty_like(xt)
    wl = np.empty_like(xt)

    def sums(anchor: np.ndarray, iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        np.subtract(xt, anchor, out=lv)
        np.multiply(lv, iscale, out=lv)
        np.rint(lv, out=lv)
        # np.clip: np.maximum/np.minimum against a scalar measured ~5x slower.
        np.clip(lv, _F32(0), _F32(nmax), out=lv)
        np.multiply(w, lv, out=wl)
        s_l = wl.sum(axis=0)
        s_l2 = np.einsum("ij,ij->j", wl, lv)
        s_xl = np.einsum("ij,ij->j", wx, lv)
        return s_l, s_l2, s_xl

    # Errors are compared without the constant sum(w*x^2). For a least-squares
    # fit the rest of the error is -(scale*sum(w*x*l) + min*sum(w*x)), which
    # costs three vector operations per candidate instead of a pass over the
    # weights; only the first, unfitted grid needs the full expansion.
    iscale = _F32(nmax) / (hi - lo)
    scale = _F32(1) / iscale
    best_min = lo.copy()
    s_l, s_l2, s_xl = sums(best_min, iscale)
    best_err = (
        scale * scale * s_l2 + _F32(2) * scale * lo * s_l + lo * lo * sw
        - _F32(2) * scale * s_xl - _F32(2) * lo * sx
    )

    for step in range(nstep + 1):
        iscale = _F32(rmin + rdelta * step + nmax) / (hi - best_min)
        s_l, s_l2, s_xl = sums(best_min, iscale)
        det = sw * s_l2
        det -= s_l * s_l
        ok = det > 0
        det[~ok] = 1
        this_scale = sw * s_xl
        this_scale -= sx * s_l
        this_scale /= det
        this_min = s_l2 * sx
        this_min -= s_l * s_xl
        this_min /= det
        positive = this_min > 0
        if positive.any():
            # ggml refits the scale alone when the offset would be positive
            this_min[positive] = 0
            this_scale[positive] = s_xl[positive] / s_l2[positive]
        err = this_scale * s_xl
        err += this_min * sx
        np.negative(err, out=err)
        better = err < best_err
        better &= ok
        np.copyto(scale, this_scale, where=better)
        np.copyto(best_min, this_min, where=better)
        np.copyto(best_err, err, where=better)

    scale = np.where(flat, _F32(0), scale)
    best_min = np.where(flat, lo, best_min)
    return scale, -best_min


def _search_symmetric(xt: np.ndarray, nmax: int) -> np.ndarray:
    """Per-group scale for x ~ scale*l with l in [-nmax, nmax-1].

    llama.cpp's make_qx_quants with rmse_type 1 (weights x^2), as Q6_K uses it:
    start from the grid that maps the largest-magnitude weight to -nmax, try 18
    slightly stretched or shrunk grids, keep the one whose least-squares scale
    explains the most weighted energy (sumlx^2 / suml2).
    """
    xt = xt.astype(_F32, copy=False)
    mx = _signed_absmax(xt, 0)
    zero = np.abs(mx) < _GROUP_MAX_EPS
    mx = np.where(zero, _F32(1), mx)
    w = xt * xt
    wx = w * xt
    lv = np.empty_like(xt)
    wl = np.empty_like(xt)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(xt, iscale, out=lv)
        np.rint(lv, out=lv)
        np.clip(lv, _F32(-nmax), _F32(nmax - 1), out=lv)
        np.multiply(w, lv, out=wl)
        sumlx = np.einsum("ij,ij->j", wx, lv)
        suml2 = np.einsum("ij,ij->j", wl, lv)
        return sumlx, suml2

    sumlx, suml2 = sums(_F32(-nmax) / mx)
    has = suml2 > 0
    scale = np.where(has, sumlx / np.where(has, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        sumlx, suml2 = sums(_F32(-(nmax + 0.1 * step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            cand = sumlx / np.where(better, suml2, _F32(1))
            scale = np.where(better, cand, scale)
            best = np.where(better, cand * sumlx, best)
    return np.where(zero, _F32(0), scale)


# ---------------------------------------------------------------------------
# K-quant 256-weight super-blocks


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in 12 bytes (get_scale_min_k4's layout).

    Sub-blocks 0-3 sit in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
    sub-blocks 4-7 put their low nibbles in bytes 8-11 and their top two bits in
    the spare high bits of bytes 0-7.
    """
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> np.uint8(4)) << np.uint8(6))
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> np.uint8(4)) << np.uint8(6))
    out[:, 8:12] = (ls[:, 4:] & np.uint8(0x0F)) | ((lm[:, 4:] & np.uint8(0x0F)) << np.uint8(4))
    return out


def _affine_k(
    b: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of Q4_K and Q5_K: search, 6-bit scale/min codes, levels.

    Returns the fp16 bytes of d and dmin, the packed 12 scale bytes and the
    levels L (n, 8, 32) recomputed against the *quantised* scales, as the
    reference does, so the stored levels match what a reader reconstructs.
    """
    n = b.shape[0]
    sub = b.reshape(n * 8, 32)
    scales, mins = _search_affine(np.ascontiguousarray(sub.T), nmax, rmin, rdelta, nstep)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)

    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    inv_scale = np.where(max_scale > 0, _F32(63) / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, _F32(63) / np.where(max_min > 0, max_min, 1), 0)
    ls = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63)
    lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63)

    d16 = (max_scale / _F32(63)).astype(np.float16)
    dmin16 = (max_min / _F32(63)).astype(np.float16)
    d_sub = d16.astype(_F32)[:, None] * ls.astype(_F32)
    m_sub = dmin16.astype(_F32)[:, None] * lm.astype(_F32)

    xb = b.reshape(n, 8, 32)
    levels = np.zeros_like(xb)
    np.divide(xb + m_sub[:, :, None], d_sub[:, :, None], out=levels,
              where=(d_sub != 0)[:, :, None])
    levels = np.clip(np.rint(levels), 0, nmax).astype(np.uint8)

    d_bytes = np.empty((n, 4), dtype=np.uint8)
    d_bytes[:, :2] = _f16_bytes(d16)
    d_bytes[:, 2:] = _f16_bytes(dmin16)
    return d_bytes, _pack_scale_min_k4(ls, lm), levels


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    head, sc, levels = _affine_k(b, 15, -1.0, 0.1, 20)
    pairs = levels.reshape(n, 4, 2, 32)  # 64-weight chunks: low nibble, high nibble
    out = np.empty((n, 144), dtype=np.uint8)
    out[:, :4] = head
    out[:, 4:16] = sc
    out[:, 16:] = (pairs[:, :, 0] | (pairs[:, :, 1] << np.uint8(4))).reshape(n, 128)
    return out


def _q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    head, sc, levels = _affine_k(b, 31, -0.5, 0.1, 15)
    pairs = levels.reshape(n, 4, 2, 32)
    low = pairs & np.uint8(0x0F)
    high = (pairs >> np.uint8(4)).astype(np.uint8)  # (n, chunk, half, 32), bit = 2*chunk + half
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce((high << shifts[None, :, :, None]).reshape(n, 8, 32), axis=1)
    out = np.empty((n, 176), dtype=np.uint8)
    out[:, :4] = head
    out[:, 4:16] = sc
    out[:, 16:48] = qh
    out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << np.uint8(4))).reshape(n, 128)
    return out


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sub = b.reshape(n * 16, 16)
    scales = _search_symmetric(np.ascontiguousarray(sub.T), 32).reshape(n, 16)

    max_scale = _signed_absmax(scales, 1)
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = np.where(zero, _F32(0), _F32(-128) / np.where(zero, _F32(1), max_scale))
    d16 = np.where(zero, _F32(0), _F32(1) / np.where(zero, _F32(1), iscale)).astype(np.float16)
    sc = np.clip(np.rint(iscale[:, None] * scales), -128, 127)
    d_sub = d16.astype(_F32)[:, None] * sc.astype(_F32)

    xb = b.reshape(n, 16, 16)
    q = np.zeros_like(xb)
    np.divide(xb, d_sub[:, :, None], out=q, where=(d_sub != 0)[:, :, None])
    levels = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)

    low = levels & np.uint8(0x0F)
    ql = low[:, :, 0:2] | (low[:, :, 2:4] << np.uint8(4))  # (n, half, 2, 32)
    high = levels >> np.uint8(4)
    qh = (high[:, :, 0] | (high[:, :, 1] << np.uint8(2))
          | (high[:, :, 2] << np.uint8(4)) | (high[:, :, 3] << np.uint8(6)))

    out = np.empty((n, 210), dtype=np.uint8)
    out[:, :128] = ql.reshape(n, 128)
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:] = _f16_bytes(d16)
    # ggml memsets an all-zero super-block, levels included.
    out[zero] = 0
    return out


#: The E2M1 values MXFP4's nibbles stand for, doubled (ggml's kvalues_mxfp4)
_MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=_F32)


def _mxfp4(b: np.ndarray) -> np.ndarray:
    """MXFP4 (gpt-oss's experts): a shared power-of-two scale (E8M0) per 32 weights, each
    weight the nearest of 16 E2M1 values (the first on ties)."""
    n = b.shape[0]
    amax = np.abs(b).max(axis=1)
    e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, _F32(1)))) - 2 + 127, 0)
    e = e.astype(np.uint8)
    # half the E8M0 scale, as ggml_e8m0_to_fp32_half: 2^(e - 128), denormal below e = 2
    d = np.ldexp(_F32(1), e.astype(np.int32) - 128).astype(_F32)
    err = np.abs(_MXFP4_VALUES[None, None, :] * d[:, None, None] - b[:, :, None])
    q = err.argmin(axis=2).astype(np.uint8)
    out = np.empty((n, 17), dtype=np.uint8)
    out[:, 0] = e
    out[:, 1:] = _pack_nibbles(q[:, :16], q[:, 16:])
    return out


_BLOCK_QUANTISERS: dict[GGMLQuantizationType, BlockFn] = {
    GGMLQuantizationType.MXFP4: _mxfp4,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    *_BLOCK_QUANTISERS,
)
