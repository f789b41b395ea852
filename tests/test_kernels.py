"""The compiled kernels against the numpy oracle (gguf-py's dequantisation), for every type.

Tolerances are float32 accumulation bounds: |error| <= c * sum_k |w_k x_k| with c a few times
float32 epsilon times sqrt(K); a wrong bit in any block layout gives errors many orders larger.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from kernel_data import random_tensor

from prima_node.kernels import FUSED_MAX_TOKENS, Weight, reference_dequantize
from prima_node.model_file import TensorInfo
from prima_node.quant.quantize import quantize

Q = GGMLQuantizationType
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# token counts covering decode (1), the fused small-batch path and the tiled BLAS path
BATCHES = [1, 2, FUSED_MAX_TOKENS, FUSED_MAX_TOKENS + 1, 37]


def _quantised_tensor(qtype: GGMLQuantizationType, rows: int, cols: int) -> TensorInfo:
    values = np.random.default_rng(3).normal(0, 0.02, (rows, cols)).astype(np.float32)
    data = quantize(values, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    return TensorInfo(f"q.{qtype.name}", qtype, (rows, cols), 0, rows * cols // block * size,
                      data)


def _check_products(info: TensorInfo) -> None:
    ref = reference_dequantize(info).astype(np.float64)
    w = Weight(info)
    rng = np.random.default_rng(7)
    for t in BATCHES:
        x = rng.normal(0, 1, (t, info.shape[1])).astype(np.float32)
        exact = x.astype(np.float64) @ ref.T
        bound = 8 * np.finfo(np.float32).eps * np.sqrt(info.shape[1]) * (np.abs(x) @ np.abs(ref).T)
        got = w.matvec(x[0])[None] if t == 1 else w.matmul(x)
        assert got.shape == exact.shape and got.dtype == np.float32
        excess = np.abs(got - exact) - bound
        assert excess.max() <= 0, f"{info.qtype.name} t={t}: error beyond float32 bound"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_random_blocks_match_reference(qtype: GGMLQuantizationType) -> None:
    # random bytes exercise every bit pattern of every field; 70 rows is not a multiple of
    # the thread count and cols 768 spans several K-quant super-blocks
    info = random_tensor(qtype, 70, 768, seed=int(qtype))
    ref = reference_dequantize(info)
    deq = Weight(info).dequantize()
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))
    _check_products(info)


@pytest.mark.parametrize("qtype", [q for q in TYPES if q != Q.F32], ids=lambda q: q.name)
def test_quantiser_output_matches_reference(qtype: GGMLQuantizationType) -> None:
    _check_products(_quantised_tensor(qtype, 96, 512))


def test_embedding_rows_match_reference() -> None:
    info = random_tensor(Q.Q6_K, 50, 512, seed=5)
    ids = np.array([0, 49, 7, 7])
    np.testing.assert_allclose(Weight(info).rows(ids), reference_dequantize(info)[ids],
                               rtol=1e-6, atol=1e-7)


def test_large_tiled_prefill_matches_reference() -> None:
    # more rows than one BLAS tile: tiles must be stitched without gaps or overlap
    info = random_tensor(Q.Q4_K, 4 * 256 + 17, 2048, seed=11)
    assert Weight(info).tile_rows < info.shape[0]
    _check_products(info)
