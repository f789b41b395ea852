"""llama.cpp (llama-cpp-python's low-level API) as the reference: for ``prima-node bench`` and
for the tests that compare logits.

Two ways to set it up. ``LlamaCpp.defaults(...)`` is llama.cpp as its own tools run it (flash
attention "auto", weight repacking on, 2048/512-token batches): the speed reference. ``LlamaCpp
(..., repack=False, flash_attn=True)`` is llama.cpp with the graph this engine builds: flash
attention on, no repacking (a repacked matrix product accumulates in another order), 512-token
micro-batches, logits computed for the last token of each call only (as a generation loop asks
for them; computing every row's logits can change the last layer's last bits). That is the
numerical reference, which the engine's logits equal.

The high-level ``llama_cpp.Llama`` class can neither turn repacking off nor ask for the last
token's logits only, hence the low-level API. Importing this module imports ``llama_cpp``,
which is only installed with the test tools (scripts/setup installs it everywhere it runs).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import TracebackType

import llama_cpp as lc
import numpy as np

_quiet = lc.llama_log_callback(lambda level, text, data: None)
lc.llama_log_set(_quiet, ctypes.c_void_p(0))
lc.llama_backend_init()


class LlamaCpp:
    """One llama.cpp model and context on a GGUF file, evaluated token list by token list."""

    def __init__(self, path: Path | str, *, n_ctx: int, threads: int = 2,
                 repack: bool = False, flash_attn: bool | None = True,
                 batch: int = 512, ubatch: int = 512, gpu_layers: int = 0) -> None:
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = repack
        mp.n_gpu_layers = gpu_layers  # explicit: llama.cpp's own default offloads everything
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = batch
        cp.n_ubatch = min(batch, ubatch)
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = {True: lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              False: lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                              None: lc.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.batch_size = batch
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_past = 0
        self._batch = lc.llama_batch_init(batch, 0, 1)

    @classmethod
    def defaults(cls, path: Path | str, *, n_ctx: int, threads: int,
                 gpu_layers: int = 0, repack: bool | None = None) -> LlamaCpp:
        """llama.cpp at its own default settings (the speed reference), ``gpu_layers`` of
        the model offloaded (n_layer + 1: the output layer too). ``repack=False`` is its
        ``--no-repack``, which a user gives where the repacked copy does not fit in memory."""
        lp = lc.llama_context_default_params()
        if repack is None:
            repack = bool(lc.llama_model_default_params().use_extra_bufts)
        return cls(path, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, repack=repack,
                   flash_attn=None, batch=int(lp.n_batch), ubatch=int(lp.n_ubatch))

    def reset(self) -> None:
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Evaluate tokens after what is cached; float32 logits of the last one."""
        b = self._batch
        for a in range(0, len(tokens), self.batch_size):
            chunk = tokens[a:a + self.batch_size]
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = i == len(chunk) - 1
            rc = lc.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
            self.n_past += len(chunk)
        ptr = lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy continuation of ``n`` tokens from an empty cache, with each step's logits."""
        self.reset()
        logits = [self.eval(prompt)]
        tokens: list[int] = []
        for _ in range(n):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(self.eval([tokens[-1]]))
        return tokens, logits

    def close(self) -> None:
        if self.ctx:
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ctx)
            lc.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
