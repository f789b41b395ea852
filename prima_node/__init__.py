"""Prima Home Cluster node: runs large language models across the devices of a home.

The engine's public API for people who embed it::

    from prima_node import Model
    with Model.open("model.gguf", threads=2, n_ctx=4096) as model:
        logits = model.logits([1, 2, 3])
"""

from __future__ import annotations

from ._blas import prefer_avx512_blas

prefer_avx512_blas()  # before numpy loads OpenBLAS

from .engine.model import Model  # noqa: E402
from .errors import ContextOverflowError, ModelLoadError, PrimaError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ContextOverflowError", "Model", "ModelLoadError", "PrimaError", "__version__"]
