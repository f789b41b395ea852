"""Shapes of the synthetic models: small enough for tests, or real-sized for benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    tied: bool
    n_ctx_train: int = 8192


PRESETS: dict[str, Preset] = {
    # a few MB: fast tests; widths are multiples of 256 so every K-quant applies
    "tiny": Preset(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=768, n_vocab=2048,
                   tied=True),
    # tens of MB: an untied output head and a 4:1 GQA ratio
    "small": Preset(n_embd=512, n_layer=6, n_head=8, n_head_kv=2, n_ff=1536, n_vocab=8192,
                    tied=False),
    # Llama-3.2-1B shapes (its vocabulary is 128k; 32k keeps files and set-up smaller)
    "1b": Preset(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=32000,
                 tied=True, n_ctx_train=131072),
}
