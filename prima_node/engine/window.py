"""A window of consecutive transformer layers: the unit of work of a ring node.

A node of the cluster runs "layers [a, b) of the plan on these hidden states for this session";
this class is exactly that, with its own KV caches for those layers only. Windows share nothing
but the read-only model file, so a node can hold several (one per ring round) independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch.config import ModelConfig
from ..errors import ModelLoadError
from ..kernels import Weight
from ..model_file import ModelFile, TensorInfo
from . import ops
from .kv_cache import KVCache


def _vector(mf: ModelFile, name: str, size: int) -> np.ndarray:
    t = mf.tensor(name)
    v = np.asarray(t.data).reshape(-1)
    if v.size != size:
        raise ModelLoadError(mf.path, f"tensor {name!r} has {v.size} values, expected {size}")
    return v if v.dtype == np.float32 else v.astype(np.float32)


def _matrix(mf: ModelFile, name: str, rows: int, cols: int) -> Weight:
    t = mf.tensor(name)
    if t.shape != (rows, cols):
        raise ModelLoadError(
            mf.path, f"tensor {name!r} has shape {t.shape[::-1]} (GGUF order), "
            f"expected {(cols, rows)}"
        )
    return Weight(t)


@dataclass
class LayerWeights:
    """One transformer block's tensors, as file-backed views."""

    attn_norm: np.ndarray
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    ffn_norm: np.ndarray
    w_gate: Weight
    w_up: Weight
    w_down: Weight
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    tensors: tuple[TensorInfo, ...] = ()

    @classmethod
    def load(cls, mf: ModelFile, cfg: ModelConfig, i: int) -> LayerWeights:
        p = f"blk.{i}."
        e, hd = cfg.n_embd, cfg.head_dim
        nq, nkv = cfg.n_head * hd, cfg.n_embd_kv
        lw = cls(
            attn_norm=_vector(mf, p + "attn_norm.weight", e),
            wq=_matrix(mf, p + "attn_q.weight", nq, e),
            wk=_matrix(mf, p + "attn_k.weight", nkv, e),
            wv=_matrix(mf, p + "attn_v.weight", nkv, e),
            wo=_matrix(mf, p + "attn_output.weight", e, nq),
            ffn_norm=_vector(mf, p + "ffn_norm.weight", e),
            w_gate=_matrix(mf, p + "ffn_gate.weight", cfg.n_ff, e),
            w_up=_matrix(mf, p + "ffn_up.weight", cfg.n_ff, e),
            w_down=_matrix(mf, p + "ffn_down.weight", e, cfg.n_ff),
        )
        if cfg.arch.qkv_bias:
            lw.bq = _vector(mf, p + "attn_q.bias", nq)
            lw.bk = _vector(mf, p + "attn_k.bias", nkv)
            lw.bv = _vector(mf, p + "attn_v.bias", nkv)
        if cfg.arch.qk_norm:
            lw.q_norm = _vector(mf, p + "attn_q_norm.weight", hd)
            lw.k_norm = _vector(mf, p + "attn_k_norm.weight", hd)
        lw.tensors = tuple(t for name, t in mf.tensors.items() if name.startswith(p))
        return lw


class LayerWindow:
    """Layers [start, end) with per-session KV caches of ``n_ctx`` positions."""

    def __init__(self, mf: ModelFile, cfg: ModelConfig, start: int, end: int, n_ctx: int,
                 kv_dtype: type[np.floating] = np.float16) -> None:
        if not 0 <= start < end <= cfg.n_layer:
            raise ValueError(f"window [{start}, {end}) is outside the model's {cfg.n_layer} layers")
        self.cfg = cfg
        self.start, self.end = start, end
        self.n_ctx = n_ctx
        self.kv_dtype = kv_dtype
        self.layers = [LayerWeights.load(mf, cfg, i) for i in range(start, end)]
        self._sessions: dict[str, KVCache] = {}

    # -- sessions -----------------------------------------------------------------------------

    def cache(self, session: str) -> KVCache:
        kv = self._sessions.get(session)
        if kv is None:
            cfg = self.cfg
            kv = KVCache(self.end - self.start, cfg.n_head_kv, self.n_ctx, cfg.head_dim,
                         self.kv_dtype)
            self._sessions[session] = kv
        return kv

    def n_cached(self, session: str) -> int:
        kv = self._sessions.get(session)
        return 0 if kv is None else kv.n

    def clear(self, session: str) -> None:
        """Forget a session's positions (its memory is kept for reuse)."""
        if session in self._sessions:
            self._sessions[session].truncate(0)

    def truncate(self, session: str, n: int) -> None:
        """Keep only the first n positions of a session (prefix reuse)."""
        if session in self._sessions:
            self._sessions[session].truncate(n)

    def drop(self, session: str) -> None:
        """Release a session's cache memory."""
        self._sessions.pop(session, None)

    @property
    def sessions(self) -> list[str]:
        return list(self._sessions)

    # -- layout -------------------------------------------------------------------------------

    def byte_ranges(self) -> list[tuple[int, int]]:
        """File byte ranges of this window's tensors, sorted (for prefetch / release)."""
        return sorted(t.byte_range for lw in self.layers for t in lw.tensors)

    @property
    def weight_bytes(self) -> int:
        return sum(b - a for a, b in self.byte_ranges())

    # -- compute ------------------------------------------------------------------------------

    def forward(self, h: np.ndarray, positions: np.ndarray, session: str = "default") -> np.ndarray:
        """Run the window on hidden states h (tokens, n_embd) at the given positions.

        Returns the new hidden states; the session's cache then holds positions up to the last.
        """
        cfg = self.cfg
        positions = np.asarray(positions, dtype=np.int64)
        h = np.ascontiguousarray(h, dtype=np.float32)
        if h.ndim != 2 or h.shape != (positions.size, cfg.n_embd):
            raise ValueError(
                f"hidden states of shape {h.shape} do not match {positions.size} positions x "
                f"{cfg.n_embd}"
            )
        kv = self.cache(session)
        kv.check_positions(positions)
        kv.n = int(positions[0])  # rewriting the tail, if any, starts here
        cos, sin = ops.rope_tables(positions, cfg.n_rot, cfg.rope_base, cfg.rope_scale,
                                   cfg.rope_factors)
        for li, lw in enumerate(self.layers):
            h = self._layer(lw, li, kv, h, positions, cos, sin)
        kv.n = int(positions[-1]) + 1
        return h

    def _layer(self, lw: LayerWeights, li: int, kv: KVCache, h: np.ndarray, pos: np.ndarray,
               cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        t = h.shape[0]
        hd = cfg.head_dim
        x = ops.rms_norm(h, lw.attn_norm, cfg.rms_eps)
        q = lw.wq.matmul(x)
        k = lw.wk.matmul(x)
        v = lw.wv.matmul(x)
        if lw.bq is not None:
            q += lw.bq
            k += lw.bk
            v += lw.bv
        q = q.reshape(t, cfg.n_head, hd)
        k = k.reshape(t, cfg.n_head_kv, hd)
        v = v.reshape(t, cfg.n_head_kv, hd)
        if lw.q_norm is not None and lw.k_norm is not None:
            q = ops.rms_norm(q, lw.q_norm, cfg.rms_eps)
            k = ops.rms_norm(k, lw.k_norm, cfg.rms_eps)
        ops.apply_rope(q, cos, sin, cfg.arch.rope_neox)
        ops.apply_rope(k, cos, sin, cfg.arch.rope_neox)
        kv.store(li, pos, k, v)
        attn = np.empty_like(q)
        kc, vc = kv.layer_views(li)
        ops.attend(q, kc, vc, pos, np.float32(1.0 / np.sqrt(hd)), attn)
        h = h + lw.wo.matmul(attn.reshape(t, -1))
        x = ops.rms_norm(h, lw.ffn_norm, cfg.rms_eps)
        g = lw.w_gate.matmul(x)
        u = lw.w_up.matmul(x)
        return h + lw.w_down.matmul(ops.silu_mul(g, u))
