"""The engine's public face: a GGUF model opened for inference on this machine.

``Model`` owns the memory-mapped file and offers the three steps a ring is made of: ``embed``
(head only), ``window(a, b)`` (any node), ``head`` (final norm + output projection, head only).
A full forward pass is embed -> window(0, L) -> head, which is what ``logits`` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..arch.config import ModelConfig, load_config
from ..errors import ContextOverflowError, ModelLoadError
from ..kernels import Weight
from ..model_file import ModelFile
from ..quant_types import type_name
from . import ops
from .window import LayerWindow, _vector

#: Prompt tokens evaluated per step: bounds the attention scratch and the activations.
DEFAULT_BATCH = 256


def default_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """Use ``threads`` for the kernels (numba) and for BLAS in this process."""
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    threadpool_limits(threads)


class Model:
    """A GGUF model (llama, qwen2, qwen3) ready to run from its memory map."""

    def __init__(self, mf: ModelFile, cfg: ModelConfig, n_ctx: int, threads: int,
                 kv_dtype: type[np.floating] = np.float16) -> None:
        self.file = mf
        self.config = cfg
        self.n_ctx = n_ctx
        self.threads = threads
        self.kv_dtype = kv_dtype
        self.token_embd = Weight(mf.tensor("token_embd.weight"))
        self.output_norm = _vector(mf, "output_norm.weight", cfg.n_embd)
        self.output = self.token_embd if cfg.tied_embeddings else Weight(mf.tensor("output.weight"))
        if self.output.n_cols != cfg.n_embd:
            raise ModelLoadError(mf.path, "output.weight does not match the embedding width")
        self._full: LayerWindow | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], threads: int | None = None,
             n_ctx: int = 4096, kv_dtype: str = "f16") -> Model:
        """Open a GGUF file; raises ModelLoadError (naming file and cause) if it is unusable.

        ``kv_dtype`` "f16" (default, as llama.cpp) or "f32" (twice the memory, no rounding).
        """
        kv_types: dict[str, type[np.floating]] = {"f16": np.float16, "f32": np.float32}
        kv = kv_types.get(kv_dtype)
        if kv is None:
            raise ValueError("kv_dtype must be 'f16' or 'f32'")
        if n_ctx < 1:
            raise ValueError("n_ctx must be at least 1")
        mf = ModelFile.open(path)
        try:
            cfg = load_config(mf)
            threads = threads or default_threads()
            set_threads(threads)
            model = cls(mf, cfg, n_ctx, threads, kv)
            model._full = model.window(0, cfg.n_layer)  # validates every layer's tensors now
        except BaseException:
            mf.close()
            raise
        return model

    @property
    def path(self) -> Path:
        return self.file.path

    def describe(self) -> dict[str, Any]:
        """What a status page shows about the model (plain JSON values)."""
        cfg, mf = self.config, self.file
        by_type: dict[str, int] = {}
        n_params = 0
        for t in mf.tensors.values():
            name = type_name(t.qtype)
            by_type[name] = by_type.get(name, 0) + t.n_bytes
            n_params += int(np.prod(t.shape))
        return {
            "name": mf.get("general.name") or self.path.stem,
            "file": self.path.name,
            "path": str(self.path),
            "size_bytes": mf.size,
            "architecture": cfg.arch.name,
            "n_params": n_params,
            "n_layers": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_vocab": cfg.n_vocab,
            "n_ctx_train": cfg.n_ctx_train,
            "n_ctx": self.n_ctx,
            # the quant type holding most of the bytes names the file's kind (Q4_K, Q8_0, ...)
            "quant": max(by_type, key=lambda k: by_type[k]) if by_type else None,
            "tensor_bytes_by_type": by_type,
            "kv_bytes_per_token": 2 * cfg.n_layer * cfg.n_embd_kv
            * np.dtype(self.kv_dtype).itemsize,
        }

    # -- the three steps of a forward pass --------------------------------------------------

    def embed(self, token_ids: Any) -> np.ndarray:
        """Embedding rows (tokens, n_embd) for token ids."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.config.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.config.n_vocab}")
        return self.token_embd.rows(ids)

    def window(self, start: int, end: int) -> LayerWindow:
        """A new window over layers [start, end) with its own KV caches."""
        return LayerWindow(self.file, self.config, start, end, self.n_ctx, self.kv_dtype)

    def head(self, h: np.ndarray) -> np.ndarray:
        """Final norm and output projection: logits (tokens, n_vocab) for hidden states."""
        x = ops.rms_norm(np.atleast_2d(h).astype(np.float32, copy=False), self.output_norm,
                         self.config.rms_eps)
        return self.output.matmul(x)

    # -- conveniences -------------------------------------------------------------------------

    def forward(self, token_ids: Any, session: str = "default", start_pos: int | None = None,
                batch: int = DEFAULT_BATCH) -> np.ndarray:
        """Evaluate tokens after the session's cached positions; logits of the last one."""
        full = self._require_full()
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no tokens to evaluate")
        pos0 = full.n_cached(session) if start_pos is None else start_pos
        if pos0 + ids.size > self.n_ctx:  # refuse before any chunk runs: nothing half-done
            raise ContextOverflowError(
                f"{ids.size} tokens from position {pos0} go beyond the context of {self.n_ctx} "
                "tokens (open the model with a larger n_ctx, or shorten the prompt)")
        h = None
        for a in range(0, ids.size, batch):
            chunk = ids[a:a + batch]
            pos = np.arange(pos0 + a, pos0 + a + chunk.size, dtype=np.int64)
            h = full.forward(self.embed(chunk), pos, session)
        assert h is not None
        return self.head(h[-1:])[0]

    def logits(self, token_ids: Any) -> np.ndarray:
        """float32 logits (n_vocab,) of the last position, evaluating from an empty cache."""
        full = self._require_full()
        full.clear("logits")
        try:
            return self.forward(token_ids, session="logits", start_pos=0)
        finally:
            full.drop("logits")

    def warm_up(self) -> None:
        """Compile (first run on a machine) or load the kernels this model uses, so that the
        first request is not the one that pays for it."""
        full = self._require_full()
        self.forward([1] * 5, session="warm-up", start_pos=0)  # tiled BLAS path
        self.forward([1] * 2, session="warm-up")  # fused small-batch path
        self.forward([1], session="warm-up")  # decode path
        full.drop("warm-up")

    def clear(self, session: str = "default") -> None:
        self._require_full().clear(session)

    def n_cached(self, session: str = "default") -> int:
        """Positions held in a session's KV cache."""
        return self._require_full().n_cached(session)

    def truncate(self, session: str, n: int) -> None:
        """Keep a session's first ``n`` positions: the prefix cache reuses them."""
        self._require_full().truncate(session, n)

    def drop(self, session: str) -> None:
        """Release a session's KV memory."""
        self._require_full().drop(session)

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    def layer_byte_ranges(self, layer: int) -> list[tuple[int, int]]:
        """File byte ranges of one layer's tensors (for the prefetcher)."""
        prefix = f"blk.{layer}."
        return sorted(t.byte_range for n, t in self.file.tensors.items() if n.startswith(prefix))

    def close(self) -> None:
        self._full = None
        self.file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _require_full(self) -> LayerWindow:
        if self._full is None:
            raise ValueError(f"{self.path} is closed")
        return self._full
