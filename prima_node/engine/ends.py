"""The ends of a forward pass run apart from the layers: the embedding lookup and the final norm
with the output projection, as a ring's first node runs them around the windows.

Where the output projection is computed is a plan's choice, changed while the node runs: from
the file on the CPU, from a repacked copy for decode steps (a ring head holding its share
resident, as ``Model.forward`` does when the model fits), or from a copy on the GPU (the plan
puts the output there). One-token graphs are kept, per kind, until the copy they read goes.
"""

from __future__ import annotations

import numpy as np

from ..arch.config import ModelConfig
from .backend import Compute
from .gpu import Accelerator, GpuUnavailableError
from .graph import EndTensors, StepGraph, build_embed, build_output
from .tensors import end_tensor_infos, output_name
from .weights import WeightSet
from .window import Shared


def end_tensors(ws: WeightSet, cfg: ModelConfig, *, packed: bool = False) -> EndTensors:
    """The ends' tensors in ``ws`` (the output projection's repacked copy with ``packed``)."""
    output = ws.packed(output_name(cfg)) if packed else ws[output_name(cfg)]
    return EndTensors(token_embd=ws["token_embd.weight"], output_norm=ws["output_norm.weight"],
                       output=output, rope_freqs=ws.get("rope_freqs.weight"),
                       output_bias=ws.get("output.bias"))


class Ends:
    """The embedding and the output of one opened model, on its CPU or its GPU."""

    def __init__(self, shared: Shared, compute: Compute, accel: Accelerator | None) -> None:
        self.shared = shared
        self.config = shared.config
        self.compute = compute
        self.accel = accel
        self._graphs: dict[tuple[str, int], StepGraph] = {}
        self._packed: WeightSet | None = None  # a ring head's, see repack_output

    @property
    def repacked_bytes(self) -> int:
        return self._packed.repacked_bytes if self._packed is not None else 0

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows (tokens, n_embd) for token ids already checked."""
        return self._run("embed", ids.astype(np.int32))

    def output(self, h: np.ndarray, *, decode: bool = False) -> np.ndarray:
        """Logits (tokens, n_vocab) for hidden states; a decode step's from the repacked
        projection where there is one."""
        h = np.ascontiguousarray(np.atleast_2d(h), dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.config.n_embd:
            raise ValueError(f"hidden states of shape {h.shape} are not (tokens, "
                             f"{self.config.n_embd})")
        return self._run("output-packed" if decode and h.shape[0] == 1 else "output", h)

    def repack_output(self, on: bool) -> None:
        """Give decode steps' output projection a repacked copy, or none."""
        with self.compute.lock:
            self._require_open()
            self._forget("output-packed")
            if self._packed is not None:
                self._packed.close()
                self._packed = None
            if on:
                sh = self.shared
                self._packed = WeightSet(sh.file, sh.buffer, end_tensor_infos(sh.file, self.config),
                                         repack=[output_name(self.config)])

    def output_on_gpu(self, on: bool) -> None:
        """Compute the output projection from a copy on the model's GPU, or on the CPU."""
        with self.compute.lock:
            self._require_open()
            if self.accel is None:
                if on:
                    raise GpuUnavailableError("the plan puts the output on a GPU, but this "
                                              "model was opened without one")
                return
            self._forget("output-gpu")  # they point at the copy being freed
            self.accel.hold_output(on)

    def close(self) -> None:
        """Free the kept graphs and the repacked copy (the caller holds the compute lock)."""
        for graph in self._graphs.values():
            graph.free()
        self._graphs.clear()
        if self._packed is not None:
            self._packed.close()
            self._packed = None

    def _forget(self, kind: str) -> None:
        for key in [k for k in self._graphs if k[0] == kind]:
            self._graphs.pop(key).free()

    def _run(self, kind: str, values: np.ndarray) -> np.ndarray:
        """The embedding lookup or the output projection alone; the output on the GPU where
        it holds a copy, or a decode step's with the repacked copy."""
        n = int(values.shape[0])
        with self.compute.lock:
            self._require_open()
            accel = self.accel if kind != "embed" else None
            if accel is not None and not accel.has_output:
                accel = None
            packed = self._packed
            if kind == "output-packed" and (packed is None or accel is not None):
                kind = "output"  # nothing repacked (or the GPU's copy computes it)
            compute = accel.compute if accel is not None else self.compute
            key = ("output-gpu" if accel is not None else kind, n)
            graph = self._graphs.get(key)
            if graph is None or graph.generation not in (-1, compute.generation):
                if graph is not None:
                    graph.free()
                build = build_embed if kind == "embed" else build_output
                if accel is not None:
                    ends = accel.ends
                elif kind == "output-packed" and packed is not None:
                    ends = end_tensors(packed, self.config, packed=True)
                else:
                    ends = self.shared.ends
                graph = build(self.config, ends, n)
            out = graph.run(compute, {"tokens" if kind == "embed" else "hidden": values},
                            once=n > 1)
            if n == 1:
                self._graphs[key] = graph
            else:
                graph.free()
        return out

    def _require_open(self) -> None:
        if self.shared.closed:
            raise ValueError(f"{self.shared.file.path} is closed")
