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
    n_expert: int = 0  # a mixture of experts (architectures with ArchSpec.moe)
    n_expert_used: int = 0
    n_ff_exp: int = 0  # an expert's feed-forward width
    head_dim: int = 0  # 0: n_embd / n_head (Qwen3 sets its own: 128 at every width)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


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


#: The experts a preset gets in a mixture-of-experts architecture: (experts, used, expert
#: width). Qwen3-30B-A3B routes to 8 of 128 experts of width 768 (a sixteenth of its
#: weights per token); the tests' presets keep that spirit at sizes CI can hold.
MOE: dict[str, tuple[int, int, int]] = {
    "tiny": (8, 2, 256),
    "small": (16, 4, 512),
    "1b": (32, 4, 1024),
}


def with_experts(p: Preset, preset: str) -> Preset:
    """The preset's shapes with its mixture of experts."""
    n, used, width = MOE[preset]
    return Preset(**{**p.__dict__, "n_expert": n, "n_expert_used": used, "n_ff_exp": width})
