"""Model architectures: declared, not coded.

Each architecture is one ``ArchSpec`` in ``spec.py``: how it differs from the shared
transformer block (RoPE layout, Q/K norms, the optional tensors its files may carry);
``config.py`` reads and checks its hyper-parameters. The graph builder (``engine/graph.py``)
never branches on an architecture's name.
"""

from __future__ import annotations

from .config import ModelConfig, load_config
from .spec import ARCHITECTURES, ArchSpec

__all__ = ["ARCHITECTURES", "ArchSpec", "ModelConfig", "load_config"]
