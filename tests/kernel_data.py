"""Random but valid GGUF block bytes for kernel tests, independent of the project's quantiser.

Random bytes are valid blocks of every supported type once their half-precision scale fields are
set to finite values, so the kernels can be checked on every bit pattern, not only on the ones a
quantiser happens to produce.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from prima_node.model_file import TensorInfo

Q = GGMLQuantizationType

#: Byte offsets of the float16 fields inside one block of each type.
HALF_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def random_tensor(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> TensorInfo:
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        data = rng.normal(0, 1, (rows, cols)).astype(np.float32)
    elif qtype == Q.F16:
        data = rng.normal(0, 1, (rows, cols)).astype(np.float16)
    elif qtype == Q.BF16:
        f = rng.normal(0, 1, (rows, cols)).astype(np.float32)
        data = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    else:
        nb = cols // block
        raw = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
        for off in HALF_FIELDS[qtype]:
            scales = rng.uniform(0.001, 0.05, (rows, nb)).astype(np.float16)
            raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, nb, 2)
        data = raw.reshape(rows, nb * size)
    n_bytes = rows * cols // block * size
    return TensorInfo(name=f"test.{qtype.name}", qtype=qtype, shape=(rows, cols), offset=0,
                      n_bytes=n_bytes, data=data)
