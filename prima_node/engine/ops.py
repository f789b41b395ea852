"""The transformer's non-matmul operations, shared by every architecture.

Written to follow ggml's CPU arithmetic (float32 throughout, float16 KV cache) so that outputs
stay close to llama.cpp's. Attention is a numba kernel because it reads the float16 cache
directly: converting the cache to float32 with numpy each token would cost more than the layer's
matmuls at long contexts.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import _jit_cache  # noqa: F401  (must precede the compiled modules)
from ..kernels._intrinsics import half_to_f32

_F = np.float32


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(ms + _F(eps)))).astype(np.float32, copy=False) * weight


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU: silu(gate) * up."""
    return gate / (_F(1.0) + np.exp(-gate)) * up


def rope_tables(
    positions: np.ndarray,
    n_rot: int,
    base: float,
    scale: float,
    factors: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotation angles, shape (tokens, n_rot // 2).

    Frequency i is base^(-2i/n_rot), divided by the llama3 per-frequency factor when the file
    has one, with positions multiplied by the linear scaling factor.
    """
    inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if factors is not None:
        inv = inv / factors.astype(np.float64)
    ang = np.outer(positions.astype(np.float64) * scale, inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate the first n_rot dims of every head of x (tokens, heads, head_dim) in place."""
    half = cos.shape[1]
    c = cos[:, None, :]
    s = sin[:, None, :]
    if neox:
        a = x[..., :half].copy()
        b = x[..., half:2 * half]
        x[..., :half] = a * c - b * s
        x[..., half:2 * half] = a * s + b * c
    else:
        a = x[..., 0:2 * half:2].copy()
        b = x[..., 1:2 * half:2]
        x[..., 0:2 * half:2] = a * c - b * s
        x[..., 1:2 * half:2] = a * s + b * c
    return x


def kv_value(v):  # pragma: no cover - replaced by the overload inside compiled code
    """A cache element as float32: float16 caches hold raw bits (uint16), float32 caches values."""
    raise NotImplementedError


@overload(kv_value)
def _kv_value(v):  # numba compares this signature with the implementations: no annotations
    if v == types.uint16:

        def from_half(v):
            return half_to_f32(v)

        return from_half

    def same(v):
        return v

    return same


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def attend(q, kc, vc, pos, scale, out):
    """Causal attention of queries q (T, H, D) over the caches (Hkv, n_ctx, D).

    Query t sees cache slots 0..pos[t]; heads share key/value heads in groups of H // Hkv.
    Caches are float32, or float16 passed as its bits (uint16): numba has no float16 type.
    """
    T, H, D = q.shape
    group = H // kc.shape[0]
    for th in prange(T * H):
        t = th // H
        h = th - t * H
        kv = h // group
        n = pos[t] + 1
        s = np.empty(n, dtype=np.float32)
        mx = _F(-np.inf)
        for j in range(n):
            acc = _F(0.0)
            for d in range(D):
                acc += q[t, h, d] * kv_value(kc[kv, j, d])
            acc *= scale
            s[j] = acc
            if acc > mx:
                mx = acc
        tot = _F(0.0)
        for j in range(n):
            e = math.exp(s[j] - mx)
            s[j] = e
            tot += e
        inv = _F(1.0) / tot
        for d in range(D):
            out[t, h, d] = 0.0
        for j in range(n):
            w = s[j] * inv
            for d in range(D):
                out[t, h, d] += w * kv_value(vc[kv, j, d])
