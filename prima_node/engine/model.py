"""The engine's public face: a GGUF model opened for inference on this machine.

``Model`` owns the memory-mapped file and offers the three steps a ring is made of: ``embed``
(the ring's first node only), ``window(a, b)`` (any node), ``output`` (final norm + output
projection, the ring's first node only; both in ``ends``). On one machine, ``forward`` runs all
three as one ggml graph per step (what llama.cpp does), which is what ``logits`` and the
generation loop use.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..arch.config import ModelConfig, load_config
from ..model_file import ModelFile
from ..quant_types import type_name
from .backend import Backend, Compute, FileBuffer
from .ends import Ends, end_tensors
from .gpu import (
    Accelerator,
    GpuUnavailableError,
    SplitWindow,
    find_gpus,
    gpu_device,
    gpu_unavailable,
    resolve_gpu_layers,
)
from .graph import (
    EndTensors,
    StepShape,
    build_step,
    kv_length,
)
from .kv_cache import KVCache
from .tensors import check_all_tensors_used, end_tensor_infos, output_name
from .weights import WeightSet
from .window import LayerWindow, Shared, Window

_LOG = logging.getLogger("prima.engine")

#: Prompt tokens the generation loop evaluates per step (a chunk): bounds the activations and
#: a ring frame. 256 and 512 gave the same prefill throughput; 256 needs half the memory.
DEFAULT_BATCH = 256


def default_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _warn_if_gpu_idle() -> None:
    """``--gpu-layers auto`` on a build whose GPU backend found no device: every layer runs on
    the CPU, and the log says why (a driver missing or too old), not nothing."""
    reason = gpu_unavailable()
    if reason is not None:
        _LOG.warning("--gpu-layers auto: every layer runs on the CPU: %s", reason)


def should_repack(mf: ModelFile, available: int) -> bool:
    """Repack (llama.cpp's default) when the copies fit easily: the weights they replace must
    take at most half of the memory available now. A model that must be paged from disk stays
    in the file mapping, where the page cache can do that."""
    matrices = sum(t.n_bytes for t in mf.tensors.values() if len(t.shape) >= 2)
    return matrices <= available // 2


class Model:
    """A GGUF model of a supported architecture (``arch.spec``) ready to run from its memory
    map with ggml."""

    #: prompt tokens the generation loop hands ``forward`` at once: a cancelled request stops
    #: within one such chunk
    prefill_chunk: int = DEFAULT_BATCH

    def __init__(self, mf: ModelFile, cfg: ModelConfig, n_ctx: int, threads: int,
                 repack: bool | None = None, *, gpu: int | None = None,
                 gpu_layers: int = 0) -> None:
        self.file = mf
        self.config = cfg
        self.n_ctx = n_ctx
        self.threads = threads
        self.repack = repack
        self.backend = Backend(threads)
        self.compute = Compute(self.backend)
        self.buffer = FileBuffer(mf.mapping)
        self._weights: list[WeightSet] = []
        try:
            ends = WeightSet(mf, self.buffer, end_tensor_infos(mf, cfg))
        except BaseException:  # nothing of ggml's may outlive a failed open
            self.compute.close()
            self.buffer.close()
            self.backend.close()
            raise
        self._weights.append(ends)
        self.shared = Shared(mf, cfg, self.buffer, self.compute, end_tensors(ends, cfg), n_ctx)
        self._windows: weakref.WeakSet[Window] = weakref.WeakSet()
        #: guards ``_windows``: status pages sum over it from the event loop while the model
        #: thread adds windows
        self._windows_lock = threading.Lock()
        self._full: Window | None = None
        self._full_lock = threading.Lock()
        #: layers ``forward`` runs on the GPU (the first ones); ring windows say their own
        self.gpu_layers = gpu_layers
        self.accel: Accelerator | None = None
        if gpu is not None:
            try:
                self.accel = Accelerator(self.shared, gpu, output=gpu_layers == cfg.n_layer)
            except BaseException:
                self.close()
                raise
        self.ends = Ends(self.shared, self.compute, self.accel)

    @classmethod
    def open(cls, path: str | os.PathLike[str], threads: int | None = None,
             n_ctx: int = 4096, repack: bool | None = None, *, gpu: str | None = None,
             gpu_layers: int | str = 0) -> Model:
        """Open a GGUF file; raises ModelLoadError (naming file and cause) if it is unusable.

        ``repack``: whether ``forward`` (this machine running every layer) uses repacked
        matrices; None decides by the memory available when it first runs (``should_repack``).
        Windows for a ring are repacked where the node asks (``window``, ``repack_output``).
        ``gpu``: the GPU to use (ggml's name; None: the first, if GPU layers are asked for;
        "none": no GPU);
        ``gpu_layers``: how many of the first layers ``forward`` runs there (a number, ``all``
        or ``auto``: as many as fit in its free memory). A GPU named with no layers is there
        for ring windows' GPU layers; ``auto`` without a GPU is every layer on the CPU.
        """
        if n_ctx < 1:
            raise ValueError("n_ctx must be at least 1")
        mf = ModelFile.open(path)
        model = None
        try:
            cfg = load_config(mf)
            check_all_tensors_used(mf, cfg)  # every tensor checked before anything runs
            if gpu == "none":  # --gpu none: the CPU only, whatever the build has
                if gpu_layers not in (0, "auto"):
                    raise ValueError("--gpu none keeps every layer on the CPU: leave "
                                     "--gpu-layers out")
                gpu, gpu_layers = None, 0
            wants = gpu is not None or (gpu_layers != 0 and (gpu_layers != "auto" or find_gpus()))
            if gpu_layers == "auto" and not wants:
                _warn_if_gpu_idle()
            device = gpu_device(gpu) if wants else None
            n_gpu = resolve_gpu_layers(gpu_layers, mf, cfg, n_ctx, device)
            model = cls(mf, cfg, n_ctx, threads or default_threads(), repack, gpu=device,
                        gpu_layers=n_gpu)
            model._reserve()
        except BaseException:
            if model is not None:
                model.close()
            else:
                mf.close()
            raise
        return model

    def _reserve(self) -> None:
        """Size the persistent compute buffer once for the largest kept graph (a decode step
        at the longest context, with the embedding and the head), so that no later one moves
        it. Two layers: the last layer of a step computes only the rows whose output is wanted,
        the one before it all of them."""
        layer = LayerWindow(self.shared, 0, 1)
        kv = KVCache(2, self.config.n_embd_kv, self.n_ctx)
        try:
            shape = StepShape(1, kv_length(self.n_ctx, self.n_ctx), embed=True, logits=True,
                              last_only=True)
            graph = build_step(self.config, shape, layer.layers * 2, kv.layers, self.n_ctx,
                               self.shared.ends)
            try:
                self.compute.reserve(graph.builder.graph)
            finally:
                graph.free()
        finally:
            kv.close()
            layer.close()

    def _local(self) -> Window:
        """Every layer as one window, for ``forward``: built on first use, with repacked
        matrices if ``repack`` says so (None: if they fit, see ``should_repack``)."""
        with self._full_lock, self.compute.lock:
            self._require_open()
            if self._full is None:
                repack = self.repack
                if repack is None:
                    from ..device.memory import memory_info

                    repack = should_repack(self.file, memory_info().available)
                ends = None
                if repack and not (self.accel is not None and self.accel.has_output):
                    infos = end_tensor_infos(self.file, self.config)
                    out = WeightSet(self.file, self.buffer, infos,
                                    repack=[output_name(self.config)])
                    self._weights.append(out)
                    ends = end_tensors(out, self.config, packed=True)
                self._full = self._make_window(0, self.config.n_layer, self.gpu_layers,
                                               repack=repack, packed_ends=ends)
                self._register(self._full)
            return self._full

    @property
    def repacked_bytes(self) -> int:
        """Anonymous memory holding repacked matrices (0 until ``forward`` first runs, or
        without repacking)."""
        extra = sum(w.repacked_bytes for w in self._weights) + self.ends.repacked_bytes
        return extra + sum(w.repacked_bytes for w in self._window_list())

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.config.n_layer * self.config.n_embd_kv * 2  # K and V, float16

    def describe(self) -> dict[str, Any]:
        """What a status page shows about the model (plain JSON values)."""
        return describe(self)

    def gpu_status(self) -> dict[str, Any] | None:
        """The GPU this model uses (None: none), its memory now and what the model holds
        there (GPU layers' weights and caches, the end tensors' copies)."""
        return None if self.accel is None else self.accel.status(self.device_bytes)

    # -- the three steps of a forward pass --------------------------------------------------

    def embed(self, token_ids: Any) -> np.ndarray:
        """Embedding rows (tokens, n_embd) for token ids."""
        return self.ends.embed(self._check_ids(token_ids))

    def window(self, start: int, end: int, gpu_layers: int = 0, *,
               repack: bool = False) -> Window:
        """A new window over layers [start, end) with its own KV caches, its first
        ``gpu_layers`` on the model's GPU; with ``repack`` its CPU layers' matrices get
        repacked copies for decode steps (a node that holds its windows resident, as
        ``forward`` does when the whole model fits: the same kernels, so the same logits)."""
        with self.compute.lock:
            self._require_open()
            w = self._make_window(start, end, gpu_layers, repack=repack)
            self._register(w)
            return w

    def _make_window(self, start: int, end: int, gpu_layers: int, *, repack: bool = False,
                     packed_ends: EndTensors | None = None) -> Window:
        if gpu_layers == 0:
            return LayerWindow(self.shared, start, end, repack=repack, packed_ends=packed_ends)
        if self.accel is None:
            raise GpuUnavailableError(
                f"{gpu_layers} GPU layers were asked for, but this model was opened without a "
                "GPU")
        return SplitWindow(self.shared, start, end, gpu_layers, self.accel, embed=self.embed,
                           output=self.output, repack=repack, packed_ends=packed_ends)

    @property
    def device_bytes(self) -> int:
        """GPU memory the model holds: its windows' GPU layers and caches, the end tensors."""
        if self.accel is None:
            return 0
        return self.accel.device_bytes + sum(w.device_bytes for w in self._window_list())

    def _window_list(self) -> list[Window]:
        with self._windows_lock:
            return list(self._windows)

    def _register(self, w: Window) -> None:
        with self._windows_lock:
            self._windows.add(w)

    def output(self, h: np.ndarray, *, decode: bool = False) -> np.ndarray:
        """Final norm and output projection: logits (tokens, n_vocab) for hidden states;
        ``decode``: of a decode step, which uses the repacked projection if there is one
        (``repack_output``), as ``forward`` does."""
        return self.ends.output(h, decode=decode)

    def repack_output(self, on: bool) -> None:
        """Give decode steps' output projection a repacked copy (a ring head holding its share
        resident) or none."""
        self.ends.repack_output(on)

    def output_on_gpu(self, on: bool) -> None:
        """Compute the output projection on the model's GPU (a copy of it there; a ring
        head's plan may say so) or on the CPU from the file."""
        self.ends.output_on_gpu(on)

    # -- conveniences -------------------------------------------------------------------------

    def forward(self, token_ids: Any, session: str = "default", start_pos: int | None = None
                ) -> np.ndarray:
        """Evaluate tokens (one step: the generation loop gives at most ``DEFAULT_BATCH``)
        after the session's cached positions; logits of the last one. Beyond the context it is
        a ContextOverflowError, before anything runs."""
        full = self._local()
        ids = self._check_ids(token_ids)
        if ids.size == 0:
            raise ValueError("no tokens to evaluate")
        pos0 = full.n_cached(session) if start_pos is None else start_pos
        pos = np.arange(pos0, pos0 + ids.size, dtype=np.int64)
        return full.run(pos, session, tokens=ids, logits=True)[-1]

    def logits(self, token_ids: Any) -> np.ndarray:
        """float32 logits (n_vocab,) of the last position, evaluating from an empty cache."""
        full = self._local()
        full.clear("logits")
        try:
            return self.forward(token_ids, session="logits", start_pos=0)
        finally:
            full.drop("logits")

    def warm_up(self) -> None:
        """Run one prefill and one decode step, so that the first request does not pay for
        first-touch costs (the compute buffer's pages, the weights' first reads)."""
        full = self._local()
        self.forward([1] * 5, session="warm-up", start_pos=0)
        self.forward([1], session="warm-up")
        full.drop("warm-up")

    def clear(self, session: str = "default") -> None:
        self._local().clear(session)

    def n_cached(self, session: str = "default") -> int:
        """Positions held in a session's KV cache."""
        return self._local().n_cached(session)

    def truncate(self, session: str, n: int) -> None:
        """Keep a session's first ``n`` positions: the prefix cache reuses them."""
        self._local().truncate(session, n)

    def drop(self, session: str) -> None:
        """Release a session's KV memory."""
        self._local().drop(session)

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    def layer_byte_ranges(self, layer: int) -> list[tuple[int, int]]:
        """File byte ranges of one layer's tensors (for the prefetcher)."""
        prefix = f"blk.{layer}."
        return sorted(t.byte_range for n, t in self.file.tensors.items() if n.startswith(prefix))

    def close(self) -> None:
        """Free every window's caches and graphs, then ggml's buffers, then the file map."""
        if self.shared.closed:
            return
        with self.compute.lock:
            self.shared.closed = True
            for w in self._window_list():
                w.close()
            if hasattr(self, "ends"):
                self.ends.close()
            for ws in self._weights:
                ws.close()
            if self.accel is not None:
                self.accel.close()
            self.compute.close()
            self.buffer.close()
            self.backend.close()
        self._full = None
        self.file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_ids(self, token_ids: Any) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.config.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.config.n_vocab}")
        return ids

    def _require_open(self) -> None:
        if self.shared.closed:
            raise ValueError(f"{self.path} is closed")


def describe(model: Model) -> dict[str, Any]:
    """What a status page shows about a model: its file, shapes, types and GPU."""
    cfg, mf = model.config, model.file
    by_type: dict[str, int] = {}
    n_params = 0
    for t in mf.tensors.values():
        name = type_name(t.qtype)
        by_type[name] = by_type.get(name, 0) + t.n_bytes
        n_params += int(np.prod(t.shape))
    return {
        "name": mf.get("general.name") or model.path.stem,
        "file": model.path.name,
        "path": str(model.path),
        "size_bytes": mf.size,
        "architecture": cfg.arch.name,
        "n_params": n_params,
        "n_layers": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_vocab": cfg.n_vocab,
        "n_ctx_train": cfg.n_ctx_train,
        "n_ctx": model.n_ctx,
        # the quant type holding most of the bytes names the file's kind (Q4_K, Q8_0, ...)
        "quant": max(by_type, key=lambda k: by_type[k]) if by_type else None,
        "tensor_bytes_by_type": by_type,
        "kv_bytes_per_token": model.kv_bytes_per_token,
        "gpu": model.gpu_status(),
        "gpu_layers": model.gpu_layers,
    }
