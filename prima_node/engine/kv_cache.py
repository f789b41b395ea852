"""Per-session key/value cache for the layers of one window, as ggml tensors.

float16, like llama.cpp (half the memory of float32, which decides how long a context a small
device can hold). One K and one V tensor of (context x KV width) per layer, in an anonymous
mapping: the OS commits pages only as positions are written, so an unused context costs address
space, not memory. ``n`` is the number of valid positions; truncating is just lowering it, which
is what prefix reuse needs (attention masks everything from ``n`` on, so stale rows are never
read).
"""

from __future__ import annotations

import numpy as np

from .. import ggml
from ..errors import ContextOverflowError
from .backend import AnonymousBuffer, DeviceBuffer


class KVCache:
    """Keys and values of ``n_layers`` layers for up to ``n_ctx`` positions; in a GPU's memory
    (``buffer_type``) for GPU layers, allocated whole there (VRAM is not committed lazily)."""

    def __init__(self, n_layers: int, n_embd_kv: int, n_ctx: int,
                 buffer_type: int | None = None) -> None:
        g = ggml.load()
        self.g = g
        self.n_ctx = n_ctx
        self.n = 0
        self.ctx = g.ggml_init(ggml.InitParams(g.ggml_tensor_overhead() * (2 * n_layers + 1),
                                               None, True))
        if not self.ctx:
            raise MemoryError("ggml could not create a context for a KV cache")
        tensors = [int(g.ggml_new_tensor_2d(self.ctx, ggml.TYPE_F16, n_embd_kv, n_ctx))
                   for _ in range(2 * n_layers)]
        per_tensor = -(-int(g.ggml_nbytes(tensors[0])) // 64) * 64
        self.buffer: AnonymousBuffer | DeviceBuffer
        try:
            if buffer_type is None:
                self.buffer = AnonymousBuffer(per_tensor * len(tensors))
                for t in tensors:
                    self.buffer.place(t)
            else:
                self.buffer = DeviceBuffer(self.ctx, buffer_type, zero=True)
        except BaseException:
            buffer = getattr(self, "buffer", None)
            if buffer is not None:
                buffer.close()
            g.ggml_free(self.ctx)
            raise
        #: (K, V) tensor pair per layer of the window
        self.layers = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(n_layers)]
        self.nbytes = self.buffer.size if buffer_type is not None else per_tensor * len(tensors)

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

    def truncate(self, n: int) -> None:
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        self.n = min(self.n, n)

    def close(self) -> None:
        self.buffer.close()
        if self.ctx:
            self.g.ggml_free(self.ctx)
            self.ctx = 0
