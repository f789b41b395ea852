"""Hyper-parameters of a model, read and checked from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelLoadError
from ..model_file import ModelFile
from .spec import ARCHITECTURES, ArchSpec


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

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


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

    def need(key: str) -> int:
        value = mf.require(f"{a}.{key}")
        if isinstance(value, list):  # per-layer arrays: only uniform models are supported
            if len(set(value)) != 1:
                raise ModelLoadError(mf.path, f"{a}.{key} varies per layer, which is not supported")
            value = value[0]
        return int(value)

    n_embd = need("embedding_length")
    n_head = need("attention.head_count")
    n_head_kv = int(mf.get(f"{a}.attention.head_count_kv", n_head))
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise ModelLoadError(
            mf.path, f"{n_head} attention heads cannot share {n_head_kv} key/value heads evenly"
        )
    head_dim = int(mf.get(f"{a}.attention.key_length", n_embd // n_head))
    v_dim = int(mf.get(f"{a}.attention.value_length", head_dim))
    if v_dim != head_dim:
        raise ModelLoadError(mf.path, "different key and value head sizes are not supported")
    n_rot = int(mf.get(f"{a}.rope.dimension_count", head_dim))
    scaling = mf.get(f"{a}.rope.scaling.type", "none")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = 1.0 / float(mf.require(f"{a}.rope.scaling.factor"))
    elif scaling not in ("none", None):
        raise ModelLoadError(
            mf.path, f"RoPE scaling {scaling!r} is not supported (supported: none, linear, llama3)"
        )
    factors = None
    if "rope_freqs.weight" in mf.tensors:
        t = mf.tensors["rope_freqs.weight"]
        factors = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if factors.size != n_rot // 2:
            raise ModelLoadError(
                mf.path, f"rope_freqs.weight has {factors.size} values, expected {n_rot // 2}"
            )
    emb = mf.tensor("token_embd.weight")
    if emb.shape[1] != n_embd:
        raise ModelLoadError(
            mf.path, f"token_embd.weight has width {emb.shape[1]}, expected {n_embd}"
        )
    return ModelConfig(
        arch=spec,
        n_layer=need("block_count"),
        n_embd=n_embd,
        n_ff=need("feed_forward_length"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_rot=n_rot,
        n_vocab=emb.shape[0],
        n_ctx_train=int(mf.get(f"{a}.context_length", 4096)),
        rms_eps=float(mf.require(f"{a}.attention.layer_norm_rms_epsilon")),
        rope_base=float(mf.get(f"{a}.rope.freq_base", 10000.0)),
        rope_scale=rope_scale,
        rope_factors=factors,
        tied_embeddings="output.weight" not in mf.tensors,
    )
