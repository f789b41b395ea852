"""Model architectures: one short declarative module each over shared transformer blocks.

Adding an architecture means describing how it differs (RoPE layout, biases, norms); the
executor never branches on architecture names.
"""

from __future__ import annotations

from .config import ModelConfig, load_config
from .spec import ARCHITECTURES, ArchSpec

__all__ = ["ARCHITECTURES", "ArchSpec", "ModelConfig", "load_config"]
