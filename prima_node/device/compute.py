"""The engine's own speed on this device, per weight type: what Halda's compute term divides by.

Measured with the kernels the node will run (not a generic GEMM), at the node's thread count, on
matrices of a real layer's width: the decode matvec (one token) and the prefill path (a batch of
tokens). Weight values do not change the speed, so one quantised block of rows is repeated to
fill the matrix instead of quantising megabytes of random numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
from gguf import GGMLQuantizationType

from ..kernels import KERNEL_KIND, Weight
from ..model_file import TensorInfo
from ..quant.quantize import quantize

PREFILL_TOKENS = 64


def _weight(qtype: GGMLQuantizationType, rows: int, cols: int) -> Weight:
    rng = np.random.default_rng(0)
    block = quantize(rng.standard_normal((16, cols)).astype(np.float32) * 0.02, qtype)
    data = np.ascontiguousarray(np.tile(block, (rows // 16,) + (1,) * (block.ndim - 1)))
    info = TensorInfo(name=f"bench.{qtype.name}", qtype=qtype, shape=(rows, cols), offset=0,
                      n_bytes=int(data.nbytes), data=data)
    return Weight(info)


def _best(fn: Callable[[], object], budget_s: float, min_runs: int = 3) -> float:
    fn()  # warm: caches, and the compiled kernel loaded
    best, runs, t_end = float("inf"), 0, time.perf_counter() + budget_s
    while runs < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if runs >= 200:
            break
    return best


def kernel_flops(types: Iterable[str], *, rows: int = 2048, cols: int = 4096,
                 budget_s: float = 0.4) -> dict[str, dict[str, float]]:
    """FLOP/s of the decode matvec and the prefill matmul for each weight type name."""
    out: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(1)
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((PREFILL_TOKENS, cols)).astype(np.float32)
    for name in types:
        qtype = GGMLQuantizationType[name]
        if qtype not in KERNEL_KIND:
            continue  # F32 norms and biases: element-wise work, counted separately
        w = _weight(qtype, rows, cols)
        flops = 2.0 * rows * cols
        t_vec = _best(partial(w.matvec, x), budget_s)
        t_mat = _best(partial(w.matmul, X), budget_s)
        out[name] = {"decode_flops": flops / t_vec,
                     "prefill_flops": flops * PREFILL_TOKENS / t_mat}
    return out
