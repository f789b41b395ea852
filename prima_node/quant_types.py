"""The GGML tensor types the engine can compute with, and their block geometry.

Kept apart from the kernels so that loading can reject an unsupported file before any kernel is
compiled, and so the planner can size layers without importing numba.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType

Q = GGMLQuantizationType

#: Types with a decode and a prefill kernel. This is what the files people download use:
#: Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, F16 and BF16 conversions.
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)

SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)


def type_name(code: int) -> str:
    """A readable name for a raw type code, including codes this gguf version does not know."""
    try:
        return GGMLQuantizationType(code).name
    except ValueError:
        return f"unknown type {code}"
