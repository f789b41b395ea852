"""Prima Home Cluster node: runs large language models across the devices of a home.

The engine's public API for people who embed it::

    from prima_node import Model
    with Model.open("model.gguf", threads=2, n_ctx=4096) as model:
        logits = model.logits([1, 2, 3])
"""

from __future__ import annotations

from .engine.model import Model
from .errors import ContextOverflowError, ModelLoadError, PrimaError

__version__ = "0.1.0"

__all__ = ["ContextOverflowError", "Model", "ModelLoadError", "PrimaError", "__version__"]
