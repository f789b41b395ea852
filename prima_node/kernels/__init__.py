"""Products of activations with GGUF weights, computed on the file's own bytes.

``Weight`` wraps one memory-mapped tensor and picks the fastest path by batch size:
- one token (decode): a fused dequantise-and-dot matvec, parallel over rows, streaming each
  weight byte once from the page cache;
- two tokens: the same fused pass computing both tokens' dot products per row;
- many tokens (prefill): rows are dequantised in tiles that stay in cache and multiplied with
  BLAS, whose GEMM is far faster than any loop here once the tile is reused by many tokens.
No dequantised copy of a whole weight matrix is ever kept.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .. import _jit_cache  # noqa: F401  (must precede the compiled modules)
from ..model_file import TensorInfo
from . import blocks
from .drivers import dequant_rows, matmul_fused, matvec

Q = GGMLQuantizationType

KERNEL_KIND: dict[GGMLQuantizationType, int] = {
    Q.F16: blocks.F16, Q.BF16: blocks.BF16, Q.Q8_0: blocks.Q8_0, Q.Q4_0: blocks.Q4_0,
    Q.Q4_1: blocks.Q4_1, Q.Q5_0: blocks.Q5_0, Q.Q5_1: blocks.Q5_1, Q.Q4_K: blocks.Q4_K,
    Q.Q5_K: blocks.Q5_K, Q.Q6_K: blocks.Q6_K,
}

#: Inner loop lengths, passed at run time (see drivers.py for why they are not literals).
_N = (16, 32)
#: Up to this many tokens the fused pass beats dequantise + BLAS. Measured on the 1b preset's
#: 8192x2048 Q4_K / 2048x8192 Q6_K weights, 2 threads: 2 tokens 3.2 vs 4.1 / 5.7 vs 10.5 ms,
#: 4 tokens 8.0 vs 4.5 / 11.6 vs 11.2 ms (fused vs tiled).
FUSED_MAX_TOKENS = 2
#: Rows per dequantised tile: 256 rows x 8192 floats = 8 MiB, inside the last-level cache.
TILE_ELEMENTS = 256 * 8192


class Weight:
    """A 2-D weight (rows = outputs, cols = inputs) kept in the file's encoding."""

    __slots__ = (
        "_w8",
        "_w16",
        "_wi8",
        "f32",
        "info",
        "kind",
        "n_cols",
        "n_rows",
        "row_bytes",
        "tile_rows",
    )

    def __init__(self, info: TensorInfo) -> None:
        if len(info.shape) != 2:
            raise ValueError(f"{info.name} is not a matrix (shape {info.shape})")
        self.info = info
        self.n_rows, self.n_cols = info.shape
        self.row_bytes = info.n_bytes // self.n_rows
        self.f32: np.ndarray | None = None
        if info.qtype == Q.F32:
            self.f32 = info.data
            self.kind = -1
        else:
            self.kind = KERNEL_KIND[info.qtype]
            flat = info.data.reshape(-1).view(np.uint8)
            self._w8 = flat
            self._wi8 = flat.view(np.int8)
            self._w16 = flat.view(np.uint16)
        self.tile_rows = max(16, min(self.n_rows, TILE_ELEMENTS // max(1, self.n_cols)))

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.info.qtype

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """W @ x for one float32 vector of length n_cols."""
        if out is None:
            out = np.empty(self.n_rows, dtype=np.float32)
        if self.f32 is not None:
            np.dot(self.f32, x, out=out)
        else:
            matvec(self.kind, self._w8, self._wi8, self._w16, self.row_bytes, x, out, *_N)
        return out

    def matmul(self, X: np.ndarray) -> np.ndarray:
        """X @ W.T for a (tokens, n_cols) float32 batch; returns (tokens, n_rows)."""
        t = X.shape[0]
        if t == 1:
            return self.matvec(X[0]).reshape(1, -1)
        if self.f32 is not None:
            return X @ self.f32.T
        if t <= FUSED_MAX_TOKENS:
            out = np.empty((t, self.n_rows), dtype=np.float32)
            matmul_fused(self.kind, self._w8, self._wi8, self._w16, self.row_bytes, X, out, *_N)
            return out
        # Tiles are computed as (rows, tokens) blocks of the transposed result, so each BLAS
        # call writes contiguous memory: numpy's matmul leaves BLAS for a slow loop when its
        # output is a strided slice (measured 8x slower).
        out_t = np.empty((self.n_rows, t), dtype=np.float32)
        tile = np.empty((self.tile_rows, self.n_cols), dtype=np.float32)
        for r0 in range(0, self.n_rows, self.tile_rows):
            n = min(self.tile_rows, self.n_rows - r0)
            part = tile[:n]
            dequant_rows(self.kind, self._w8, self._wi8, self._w16, self.row_bytes, r0, part,
                         *_N)
            np.matmul(part, X.T, out=out_t[r0:r0 + n])
        return np.ascontiguousarray(out_t.T)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Selected rows as float32 (embedding lookup)."""
        out = np.empty((len(ids), self.n_cols), dtype=np.float32)
        for i, r in enumerate(ids):
            if self.f32 is not None:
                out[i] = self.f32[int(r)]
            else:
                dequant_rows(self.kind, self._w8, self._wi8, self._w16, self.row_bytes, int(r),
                             out[i:i + 1], *_N)
        return out

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 with the fast kernels (tests and tools only)."""
        out = np.empty((self.n_rows, self.n_cols), dtype=np.float32)
        if self.f32 is not None:
            out[:] = self.f32
        else:
            dequant_rows(self.kind, self._w8, self._wi8, self._w16, self.row_bytes, 0, out, *_N)
        return out


def reference_dequantize(info: TensorInfo) -> np.ndarray:
    """The test oracle: gguf-py's plain numpy dequantisation of a whole tensor."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(np.asarray(info.data), info.qtype), dtype=np.float32).reshape(
        info.shape
    )
