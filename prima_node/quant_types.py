"""The GGML tensor types the engine can compute with.

ggml's CPU backend multiplies activations with weights of every type below (its own kernels, the
same llama.cpp runs). Kept apart from the engine so that loading can reject an unsupported file
before ggml sees it (ggml aborts the process on a type it cannot handle), and so the planner can
size layers without loading ggml.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType

Q = GGMLQuantizationType

#: Weight types ggml's CPU backend runs (matrix products and embedding lookups). Types gguf
#: knows but that only ever appear as activations (Q8_1, Q8_K) or as integers are not here.
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16,
    Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS,
    Q.TQ1_0, Q.TQ2_0, Q.MXFP4, Q.NVFP4, Q.Q1_0,
)

#: Types whose logits tests/test_conformance.py checks against llama.cpp's on the same file
#: (identical): the file types the synthetic-model tool writes, files of llama.cpp's own
#: quantiser, and every other type converted with ggml's quantiser. That is all of them.
CHECKED_TYPES: tuple[GGMLQuantizationType, ...] = SUPPORTED_TYPES

SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)


def type_name(code: int) -> str:
    """A readable name for a raw type code, including codes this gguf version does not know."""
    try:
        return GGMLQuantizationType(code).name
    except ValueError:
        return f"unknown type {code}"
