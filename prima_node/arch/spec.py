"""What distinguishes the supported architectures from one another."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """The few facts the shared transformer block needs about an architecture.

    ``rope_neox``: rotate the two halves of each head (GPT-NeoX layout, Qwen) instead of adjacent
    pairs (llama.cpp's converter permutes Llama's q/k weights into the adjacent-pair layout).
    ``qkv_bias``: attention projections carry biases (Qwen2). ``qk_norm``: per-head RMSNorm of
    queries and keys before RoPE (Qwen3).
    """

    name: str
    rope_neox: bool
    qkv_bias: bool = False
    qk_norm: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("llama", rope_neox=False),  # Llama 2/3/3.1/3.2, Mistral dense
        ArchSpec("qwen2", rope_neox=True, qkv_bias=True),
        ArchSpec("qwen3", rope_neox=True, qk_norm=True),
    )
}
