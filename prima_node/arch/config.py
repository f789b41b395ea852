"""Hyper-parameters of a model, read and checked from GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..model_file import ModelFile
from .spec import ARCHITECTURES, ArchSpec


@dataclass(frozen=True)
class Yarn:
    """YaRN's RoPE parameters as llama.cpp derives them from a file that names ``yarn``
    scaling: frequencies interpolated between ``beta_slow`` and ``beta_fast`` rotations over the
    original context, and the attention factor that cancels the magnitude correction ggml's
    kernel applies (so 1.0 up to float rounding, which must be the same rounding)."""

    ext_factor: float
    attn_factor: float
    beta_fast: float
    beta_slow: float
    n_ctx_orig: int


@dataclass(frozen=True)
class ModelConfig:
    arch: ArchSpec
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_scale: float  # position multiplier (1 / linear scaling factor)
    rope_factors: np.ndarray | None  # llama3-style per-frequency divisors (rope_freqs.weight)
    tied_embeddings: bool
    n_expert: int = 0  # mixture of experts: experts per layer (0: a dense feed-forward)
    n_expert_used: int = 0  # experts each token is routed to
    expert_weights_scale: float = 0.0  # the routing weights' scale after normalising (0: none)
    n_swa: int = 0  # sliding-window attention: positions a windowed layer sees (0: none)
    swa_pattern: int = 0  # every layer but each swa_pattern-th slides (0: none)
    rope_base_swa: float = 10000.0  # the RoPE base of the windowed layers
    rope_scale_swa: float = 1.0  # and their position multiplier
    final_softcap: float = 0.0  # logits = c * tanh(logits / c) (0: none)
    yarn: Yarn | None = None  # YaRN RoPE scaling (gpt-oss), on every layer

    def sliding(self, layer: int) -> bool:
        """Whether a layer attends within the sliding window (every layer but each
        ``swa_pattern``-th, as llama.cpp's ``set_swa_pattern``)."""
        n = self.swa_pattern
        return self.n_swa > 0 and n > 0 and layer % n < n - 1

    @property
    def query_scale(self) -> float:
        """What queries are multiplied by before attention where the architecture scales them
        (``ArchSpec.query_scale``: Gemma, Phi-3): 1/sqrt(head size), or for Gemma 3 27B
        1/sqrt(n_embd / n_head), as llama.cpp; other architectures scale the scores."""
        if self.arch.name == "gemma3" and self.n_layer == 62:  # Gemma 3 27B
            return 1.0 / math.sqrt(self.n_embd / self.n_head)
        return 1.0 / math.sqrt(self.head_dim)
    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


def _number(mf: ModelFile, key: str, value: Any, *, integer: bool, minimum: float) -> Any:
    """A metadata value as a number no smaller than ``minimum``: anything else (a string, NaN,
    an infinity, zero where a count is needed) is a load error naming the key, since ggml
    would abort on it, or every answer would be NaN."""
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError, OverflowError):
        raise ModelLoadError(mf.path, f"metadata key {key!r} is {value!r}, not a number") \
            from None
    if not math.isfinite(number) or number < minimum or (integer and float(value) != number):
        kind = "an integer" if integer else "a finite number"
        raise ModelLoadError(mf.path, f"metadata key {key!r} is {value!r}; it must be {kind} "
                                      f">= {minimum:g}: the file is corrupt")
    return number


def load_config(mf: ModelFile) -> ModelConfig:
    """Read the architecture's keys; unsupported or inconsistent settings are load errors."""
    arch_name = mf.require("general.architecture")
    spec = ARCHITECTURES.get(arch_name)
    if spec is None:
        raise ModelLoadError(
            mf.path,
            f"architecture {arch_name!r} is not supported (supported: "
            f"{', '.join(sorted(ARCHITECTURES))})",
        )
    a = arch_name

    def count(key: str, default: Any = None) -> int:
        full = f"{a}.{key}"
        value = mf.require(full) if default is None else mf.get(full, default)
        if isinstance(value, list):  # per-layer arrays: only uniform models are supported
            if not value or len(set(value)) != 1:
                raise ModelLoadError(mf.path, f"{full} varies per layer, which is not supported")
            value = value[0]
        return int(_number(mf, full, value, integer=True, minimum=1))

    def real(key: str, default: Any = None) -> float:
        full = f"{a}.{key}"
        value = mf.require(full) if default is None else mf.get(full, default)
        return float(_number(mf, full, value, integer=False, minimum=0.0))

    n_embd = count("embedding_length")
    n_head, n_head_kv, head_dim, n_rot = _heads(mf, a, count, n_embd)
    rope_scale, yarn = _rope_scaling(mf, a, count, real)
    rms_eps = real("attention.layer_norm_rms_epsilon")
    rope_base = real("rope.freq_base", 10000.0)
    if rms_eps <= 0 or rope_base <= 0:
        raise ModelLoadError(mf.path, f"{a}.attention.layer_norm_rms_epsilon and "
                                      f"{a}.rope.freq_base must be positive (they are "
                                      f"{rms_eps} and {rope_base}): the file is corrupt")
    factors = (_rope_factors(mf, n_rot) if "rope_freqs" in spec.optional
               and "rope_freqs.weight" in mf.tensors else None)
    n_vocab = _vocab_size(mf, n_embd)
    n_ff, experts = _feed_forward(mf, spec, count, real)
    if spec.swa_pattern:
        experts.update(_sliding_window(mf, spec, count, real, rope_base, rope_scale))
    experts["final_softcap"] = real("final_logit_softcapping", 0.0)
    return ModelConfig(
        arch=spec,
        n_layer=count("block_count"),
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_rot=n_rot,
        n_vocab=n_vocab,
        n_ctx_train=count("context_length", 4096),
        rms_eps=rms_eps,
        rope_base=rope_base,
        rope_scale=rope_scale,
        rope_factors=factors,
        tied_embeddings="output.weight" not in mf.tensors,
        yarn=yarn,
        **experts,
    )


def _heads(mf: ModelFile, a: str, count: Any, n_embd: int) -> tuple[int, int, int, int]:
    """Attention heads, key/value heads, the head size and the rotated dimensions, checked
    against each other."""
    n_head = count("attention.head_count")
    n_head_kv = count("attention.head_count_kv", n_head)
    if n_head % n_head_kv:
        raise ModelLoadError(
            mf.path, f"{n_head} attention heads cannot share {n_head_kv} key/value heads evenly"
        )
    head_dim = count("attention.key_length", max(1, n_embd // n_head))
    v_dim = count("attention.value_length", head_dim)
    if v_dim != head_dim:
        raise ModelLoadError(mf.path, "different key and value head sizes are not supported")
    n_rot = count("rope.dimension_count", head_dim)
    if n_rot > head_dim or n_rot % 2:
        raise ModelLoadError(mf.path, f"{a}.rope.dimension_count is {n_rot}; it must be even "
                                      f"and at most the head size {head_dim}")
    return n_head, n_head_kv, head_dim, n_rot


def _vocab_size(mf: ModelFile, n_embd: int) -> int:
    """The vocabulary's size, from the embedding matrix (which must match the model's width)."""
    emb = mf.tensor("token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[1] != n_embd:
        raise ModelLoadError(
            mf.path, f"token_embd.weight has shape {emb.shape[::-1]} (GGUF order), expected "
            f"({n_embd}, vocabulary size)"
        )
    return int(emb.shape[0])


def _rope_factors(mf: ModelFile, n_rot: int) -> np.ndarray:
    """Llama 3's per-frequency RoPE divisors (rope_freqs.weight), one per rotated pair."""
    t = mf.tensors["rope_freqs.weight"]
    factors = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if factors.size != n_rot // 2:
        raise ModelLoadError(
            mf.path, f"rope_freqs.weight has {factors.size} values, expected {n_rot // 2}"
        )
    if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ModelLoadError(mf.path, "rope_freqs.weight holds values that are not "
                                      "positive numbers: the file is corrupt")
    return factors


def _rope_scaling(mf: ModelFile, a: str, count: Any, real: Any) -> tuple[float, Yarn | None]:
    """The position multiplier, and YaRN's parameters where the file names it, as llama.cpp
    derives them (its loader reads only the factor and the original context; beta_fast 32,
    beta_slow 1 and the attention factor are its defaults, whatever else a file says)."""
    scaling = mf.get(f"{a}.rope.scaling.type", "none")
    if scaling in ("none", None):
        return 1.0, None
    if scaling not in ("linear", "yarn"):
        raise ModelLoadError(mf.path, f"RoPE scaling {scaling!r} is not supported (supported: "
                                      "none, linear, yarn, llama3)")
    factor = real("rope.scaling.factor")
    if factor <= 0:
        raise ModelLoadError(mf.path, f"{a}.rope.scaling.factor must be positive")
    if scaling == "linear":
        return 1.0 / factor, None
    f32 = np.float32
    scale = f32(1.0) / f32(factor)
    factor32 = f32(1.0) / scale
    log = f32(math.log(factor32))  # logf: correctly rounded, as glibc's
    mscale = f32(f32(0.1) * log) + f32(1.0) if factor32 > 1 else f32(1.0)
    attn = mscale * (f32(1.0) / (f32(f32(0.1) * log) + f32(1.0)))
    attn = attn * f32(real("rope.scaling.attn_factor", 1.0))
    orig = count("rope.scaling.original_context_length", count("context_length", 4096))
    return float(scale), Yarn(1.0, float(attn), 32.0, 1.0, orig)


def _sliding_window(mf: ModelFile, spec: ArchSpec, count: Any, real: Any, rope_base: float,
                    rope_scale: float) -> dict[str, Any]:
    """The window, the pattern of layers that use it and their RoPE (Gemma 3: base 10000
    unscaled unless the file says; gpt-oss: the global layers' base and scale)."""
    a = spec.name
    out: dict[str, Any] = {"swa_pattern": spec.swa_pattern}
    window = mf.get(f"{a}.attention.sliding_window")
    if window is not None:
        out["n_swa"] = int(_number(mf, f"{a}.attention.sliding_window", window,
                                   integer=True, minimum=0))
    pattern = mf.get(f"{a}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        raise ModelLoadError(mf.path, f"{a}.attention.sliding_window_pattern is a per-layer "
                                      "list, which is not supported")
    if pattern is not None:
        out["swa_pattern"] = count("attention.sliding_window_pattern")
    shared = spec.name == "gpt-oss"  # llama.cpp gives its windowed layers the global RoPE
    out["rope_base_swa"] = real("rope.freq_base_swa", rope_base if shared else 10000.0)
    out["rope_scale_swa"] = rope_scale if shared else 1.0
    if out["rope_base_swa"] <= 0:
        raise ModelLoadError(mf.path, f"{a}.rope.freq_base_swa must be positive: the file is "
                                      "corrupt")
    return out


#: llama.cpp's limit on experts per layer (LLAMA_MAX_EXPERTS)
MAX_EXPERTS = 512


def _feed_forward(mf: ModelFile, spec: ArchSpec, count: Any, real: Any
                  ) -> tuple[int, dict[str, Any]]:
    """The feed-forward width (an expert's, for a mixture of experts) and the experts' keys."""
    if not spec.moe:
        return count("feed_forward_length"), {}
    a = spec.name
    n_expert = count("expert_count")
    used = count("expert_used_count")
    if n_expert > MAX_EXPERTS or used > n_expert:
        raise ModelLoadError(mf.path, f"{a}.expert_used_count is {used} of {n_expert} experts "
                                      f"(at most {MAX_EXPERTS}): the file is corrupt")
    if mf.get(f"{a}.expert_feed_forward_length") is not None:
        n_ff = count("expert_feed_forward_length")
    else:  # llama.cpp's fallback for files without the key
        n_ff = max(1, count("feed_forward_length") // used)
    return n_ff, {"n_expert": n_expert, "n_expert_used": used,
                  "expert_weights_scale": real("expert_weights_scale", 0.0)}
