"""A window of consecutive transformer layers: the unit of work of a ring node.

A node of the cluster runs "layers [a, b) of the plan on these hidden states for this session";
this class is exactly that, with its own KV caches for those layers only. Windows of one model
share the file mapping, the CPU backend and the compute buffer (a GPU's, for layers on one:
``gpu.py``), never caches, so a node can hold several (one per ring round) independently.

Each step is a ggml graph. Building one costs about a microsecond per node from Python, so the
graphs of decode steps (one token) are kept per session and cache length bucket, and only their
inputs (positions, cache rows, mask) change from token to token; prefill chunks, which vary in
length and cost far more to compute than to build, get a fresh graph each.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..arch.config import ModelConfig
from ..model_file import ModelFile
from .backend import Compute, FileBuffer
from .graph import EndTensors, LayerTensors, StepGraph, StepShape, build_step, kv_length
from .graph import step_inputs as _step_inputs
from .kv_cache import KVCache
from .tensors import MATMUL_ROLES, layer_tensor_infos
from .weights import WeightSet

if TYPE_CHECKING:
    from .gpu import Accelerator

#: Decode graphs kept per window (each is a few hundred kB of ggml tensor descriptions).
CACHED_GRAPHS = 8

#: Weight types whose repacked copies (where a window has them) prefill uses too: ggml
#: multiplies batches faster with them. Measured with 128-token prompts on 2 threads: gpt-oss
#: 1b preset (MXFP4 experts) 1.20 s repacked against 1.60 s from the file's layout; Q8_0 the
#: same either way (llama 1b: 1.17 against 1.14 s); Q4_K slower repacked (0.85 against
#: 0.56 s), so decode steps alone use those.
PREFILL_PACKED = frozenset({"MXFP4"})


@dataclass
class Shared:
    """What every window of one opened model shares."""

    file: ModelFile
    config: ModelConfig
    buffer: FileBuffer
    compute: Compute
    ends: EndTensors
    n_ctx: int
    closed: bool = False


class Window(Protocol):
    """What a node and the generation loop use of a window: layers on one device
    (``LayerWindow``) or a window whose first layers run on a GPU (``gpu.SplitWindow``)."""

    start: int
    end: int

    def forward(self, h: np.ndarray, positions: np.ndarray, session: str = "default", *,
                last_only: bool = False) -> np.ndarray: ...
    def run(self, positions: np.ndarray, session: str, *, hidden: np.ndarray | None = None,
            tokens: np.ndarray | None = None, logits: bool = False,
            last_only: bool = False) -> np.ndarray: ...
    def n_cached(self, session: str) -> int: ...
    def clear(self, session: str) -> None: ...
    def truncate(self, session: str, n: int) -> None: ...
    def drop(self, session: str) -> None: ...
    def byte_ranges(self) -> list[tuple[int, int]]: ...
    @property
    def sessions(self) -> list[str]: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def repacked_bytes(self) -> int: ...
    @property
    def device_bytes(self) -> int: ...
    def close(self) -> None: ...


class LayerWindow:
    """Layers [start, end) with per-session KV caches of ``n_ctx`` positions.

    ``repack``: also give the window's matrices ggml's interleaved CPU layout (anonymous memory,
    faster one-token products) for decode steps: only for a window held in memory for good,
    never one that is streamed. ``packed_ends`` are the model's embedding and output tensors
    with a repacked output projection, for decode steps that end with the logits.
    ``device``: the layers live and compute on a GPU instead (weights and caches copied into
    its memory, or the weights read in place where it shares the host's memory: Metal); such
    a window takes hidden states, never token ids (the embedding table stays in the file
    mapping).
    """

    def __init__(self, shared: Shared, start: int, end: int, *, repack: bool = False,
                 packed_ends: EndTensors | None = None,
                 device: Accelerator | None = None) -> None:
        cfg = shared.config
        if not 0 <= start < end <= cfg.n_layer:
            raise ValueError(f"window [{start}, {end}) is outside the model's {cfg.n_layer} layers")
        self.shared = shared
        self.cfg = cfg
        self.start, self.end = start, end
        self.n_ctx = shared.n_ctx
        self.device = device
        self.compute = device.compute if device is not None else shared.compute
        ends = device.ends if device is not None else shared.ends
        self.ends = ends
        roles = [layer_tensor_infos(shared.file, cfg, i) for i in range(start, end)]
        # every tensor of the layers (including any the graph does not use) belongs to them
        prefixes = tuple(f"blk.{i}." for i in range(start, end))
        self._tensors = tuple(t for n, t in shared.file.tensors.items() if n.startswith(prefixes))
        self.packed_ends = packed_ends or ends
        self.weights = WeightSet(
            shared.file, shared.buffer, [t for r in roles for t in r.values()],
            repack=[r[k].name for r in roles for k in MATMUL_ROLES if k in r] if repack else (),
            copy_to=device.buffer_type if device is not None else None,
            map_on=device.map_on if device is not None else None)
        sliding = [cfg.sliding(i) for i in range(start, end)]
        self.layers = [LayerTensors(**{k: self.weights[t.name] for k, t in r.items()},
                                    sliding=swa) for r, swa in zip(roles, sliding, strict=True)]
        #: the same, with repacked matrices where there are any (for decode steps)
        self.packed_layers = [LayerTensors(**{k: self.weights.packed(t.name)
                                              for k, t in r.items()}, sliding=swa)
                              for r, swa in zip(roles, sliding, strict=True)]
        #: for prefill: repacked matrices of the types batches are faster with that way
        self.prefill_layers = [
            LayerTensors(**{k: self.weights.packed(t.name) if t.qtype.name in PREFILL_PACKED
                            else self.weights[t.name] for k, t in r.items()}, sliding=swa)
            for r, swa in zip(roles, sliding, strict=True)]
        #: the sliding window's size where a layer of the window has one (its mask is built)
        self.n_swa = cfg.n_swa if any(sliding) else 0
        self._sessions: dict[str, KVCache] = {}
        self._graphs: OrderedDict[tuple[str, StepShape], StepGraph] = OrderedDict()
        self.closed = False

    # -- sessions -----------------------------------------------------------------------------

    def cache(self, session: str) -> KVCache:
        with self.shared.compute.lock:
            kv = self._sessions.get(session)
            if kv is None:
                kv = KVCache(self.end - self.start, self.cfg.n_embd_kv, self.n_ctx,
                             self.device.buffer_type if self.device is not None else None)
                self._sessions[session] = kv
            return kv

    def n_cached(self, session: str) -> int:
        kv = self._sessions.get(session)
        return 0 if kv is None else kv.n

    def clear(self, session: str) -> None:
        """Forget a session's positions (its memory is kept for reuse)."""
        if session in self._sessions:
            self._sessions[session].truncate(0)

    def truncate(self, session: str, n: int) -> None:
        """Keep only the first n positions of a session (prefix reuse)."""
        if session in self._sessions:
            self._sessions[session].truncate(n)

    def drop(self, session: str) -> None:
        """Release a session's cache memory (and the graphs that write to it)."""
        with self.shared.compute.lock:
            for key in [k for k in self._graphs if k[0] == session]:
                self._graphs.pop(key).free()
            kv = self._sessions.pop(session, None)
            if kv is not None:
                kv.close()

    @property
    def sessions(self) -> list[str]:
        return list(self._sessions)

    # -- layout -------------------------------------------------------------------------------

    def byte_ranges(self) -> list[tuple[int, int]]:
        """File byte ranges of this window's tensors, sorted (for prefetch / release); none
        for GPU layers, which compute from their copies (or, on Metal, from the mapping that
        Metal keeps resident)."""
        if self.device is not None:
            return []
        return sorted(t.byte_range for t in self._tensors)

    @property
    def weight_bytes(self) -> int:
        return sum(b - a for a, b in self.byte_ranges())

    @property
    def repacked_bytes(self) -> int:
        """Anonymous memory holding repacked copies of this window's matrices."""
        return self.weights.repacked_bytes

    @property
    def device_bytes(self) -> int:
        """GPU memory this window holds: its weights' copies and its sessions' caches."""
        if self.device is None:
            return 0
        # a copy: the model thread may add a session while a status page asks
        return self.weights.device_bytes + sum(kv.nbytes for kv in list(self._sessions.values()))

    # -- compute ------------------------------------------------------------------------------

    def forward(self, h: np.ndarray, positions: np.ndarray, session: str = "default", *,
                last_only: bool = False) -> np.ndarray:
        """Run the window on hidden states h (tokens, n_embd) at the given positions.

        Returns the new hidden states (only the last token's with ``last_only``); the session's
        cache then holds positions up to the last.
        """
        return self.run(positions, session, hidden=h, last_only=last_only)

    def run(self, positions: np.ndarray, session: str, *, hidden: np.ndarray | None = None,
            tokens: np.ndarray | None = None, logits: bool = False,
            last_only: bool = False) -> np.ndarray:
        """One step: from hidden states or (the model's first window) token ids, to hidden
        states or (the last window, ``logits``) the last token's logits. Every input is checked
        here: ggml aborts the process on a mismatched one."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if logits and self.device is not None and not self.device.has_output:
            raise ValueError("the output projection is not on this GPU: compute the logits "
                             "on the CPU")
        values = self._inputs(positions, hidden, tokens)
        with self.shared.compute.lock:  # also keeps close() from freeing what this step uses
            if self.closed or self.shared.closed:
                raise ValueError(f"this window of {self.shared.file.path} is closed")
            kv = self.cache(session)
            kv.check_positions(positions)
            shape = StepShape(int(positions.size),
                              kv_length(int(positions[-1]) + 1, self.n_ctx),
                              embed=tokens is not None, logits=logits,
                              last_only=last_only or logits)
            values.update(_step_inputs(shape, positions, self.n_swa))
            once = shape.n_tokens > 1  # prefill chunks: built, run and freed
            graph = self._graph(session, shape, kv)
            kv.n = int(positions[0])  # rewriting the tail, if any, starts here
            try:
                out = graph.run(self.compute, values, once=once)
            finally:
                if once:
                    graph.free()
            kv.n = int(positions[-1]) + 1
        return out

    def _inputs(self, positions: np.ndarray, hidden: np.ndarray | None,
                tokens: np.ndarray | None) -> dict[str, np.ndarray]:
        """The step's hidden states or token ids, checked against the positions."""
        if (hidden is None) == (tokens is None):
            raise ValueError("a step takes either hidden states or token ids")
        if tokens is not None:
            if self.device is not None:
                raise ValueError("GPU layers take hidden states: embed the tokens first")
            ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
            if ids.size != positions.size:
                raise ValueError(f"{ids.size} tokens do not match {positions.size} positions")
            if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.n_vocab):
                raise ValueError(f"a token id is outside the vocabulary of {self.cfg.n_vocab}")
            return {"tokens": ids.astype(np.int32)}
        assert hidden is not None
        h = np.ascontiguousarray(hidden, dtype=np.float32)
        if h.ndim != 2 or h.shape != (positions.size, self.cfg.n_embd):
            raise ValueError(
                f"hidden states of shape {h.shape} do not match {positions.size} positions x "
                f"{self.cfg.n_embd}")
        return {"hidden": h}

    def _graph(self, session: str, shape: StepShape, kv: KVCache) -> StepGraph:
        """A decode graph from the cache (unless the compute buffer moved since it was
        allocated), or a new graph."""
        key = (session, shape)
        graph = self._graphs.get(key)
        if graph is not None and graph.generation == self.compute.generation:
            self._graphs.move_to_end(key)
            return graph
        if graph is not None:
            self._graphs.pop(key).free()
        decode = shape.n_tokens == 1
        layers = self.packed_layers if decode else self.prefill_layers
        graph = build_step(self.cfg, shape, layers,
                           kv.layers, self.n_ctx,
                           self.packed_ends if decode else self.ends)
        if shape.n_tokens == 1:
            self._graphs[key] = graph
            while len(self._graphs) > CACHED_GRAPHS:
                self._graphs.popitem(last=False)[1].free()
        return graph

    def close(self) -> None:
        """Free the caches, graphs and weight descriptions (the model closes its windows, a
        node those a new plan replaces); using the window afterwards is an error."""
        with self.shared.compute.lock:
            self.closed = True
            for g in self._graphs.values():
                g.free()
            self._graphs.clear()
            for kv in self._sessions.values():
                kv.close()
            self._sessions.clear()
            self.weights.close()
