"""Per-session key/value cache for the layers of one window."""

from __future__ import annotations

import numpy as np

from ..errors import ContextOverflowError


class KVCache:
    """Keys and values of ``n_layers`` layers for up to ``n_ctx`` positions.

    float16 by default, like llama.cpp (half the memory of float32, which decides how long a
    context a small device can hold); float32 for bit-faithful checks.

    Allocated zeroed up front (the OS commits pages only as positions are written, so an unused
    context costs address space, not memory). ``n`` is the number of valid positions; truncating
    is just lowering it, which is what prefix reuse needs.
    """

    def __init__(self, n_layers: int, n_head_kv: int, n_ctx: int, head_dim: int,
                 dtype: type[np.floating] = np.float16) -> None:
        if dtype not in (np.float16, np.float32):
            raise ValueError("the KV cache type must be float16 or float32")
        shape = (n_layers, n_head_kv, n_ctx, head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.n_ctx = n_ctx
        self.n = 0

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def check_positions(self, positions: np.ndarray) -> None:
        """Positions must continue (or rewrite the tail of) what is cached, without gaps."""
        if positions.ndim != 1 or positions.size == 0:
            raise ValueError("positions must be a non-empty 1-D array")
        first = int(positions[0])
        if first < 0 or first > self.n:
            raise ValueError(
                f"positions start at {first} but the cache holds {self.n}; "
                "truncate the session first or continue from its end"
            )
        if positions.size > 1 and not np.all(np.diff(positions) == 1):
            raise ValueError("positions must be consecutive")
        last = int(positions[-1])
        if last >= self.n_ctx:
            raise ContextOverflowError(
                f"position {last} is beyond the context of {self.n_ctx} tokens"
            )

    def store(self, layer: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Write keys/values (tokens, n_head_kv, head_dim) at the given positions."""
        a, b = int(positions[0]), int(positions[-1]) + 1
        self.k[layer, :, a:b, :] = k.transpose(1, 0, 2)
        self.v[layer, :, a:b, :] = v.transpose(1, 0, 2)

    def layer_views(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """One layer's K and V as the attention kernel takes them (float16 as raw bits)."""
        k, v = self.k[layer], self.v[layer]
        if k.dtype == np.float16:
            return k.view(np.uint16), v.view(np.uint16)
        return k, v

    def truncate(self, n: int) -> None:
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        self.n = min(self.n, n)
