"""An independent float64 numpy forward pass: the oracle the engine must match tightly.

It shares nothing with the engine but the GGUF reader: weights are dequantised with gguf-py's
numpy code, and every operation is written out plainly in float64 from the architectures'
published definitions. Compared with the engine run with a float32 KV cache, what differs is
float32 rounding only.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class ReferenceModel:
    def __init__(self, path: str) -> None:
        r = GGUFReader(path)
        self.meta = {k: f.contents() for k, f in r.fields.items()
                     if not k.startswith("tokenizer.")}
        self.w = {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
                  .reshape(tuple(reversed(t.shape.tolist()))) for t in r.tensors}
        a = self.arch = self.meta["general.architecture"]
        self.n_layer = self.meta[f"{a}.block_count"]
        self.n_head = self.meta[f"{a}.attention.head_count"]
        self.n_kv = self.meta[f"{a}.attention.head_count_kv"]
        self.eps = self.meta[f"{a}.attention.layer_norm_rms_epsilon"]
        self.base = self.meta.get(f"{a}.rope.freq_base", 10000.0)
        e = self.meta[f"{a}.embedding_length"]
        self.hd = self.meta.get(f"{a}.attention.key_length", e // self.n_head)

    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        d = self.hd
        inv = self.base ** (-np.arange(0, d, 2) / d)
        if "rope_freqs.weight" in self.w:
            inv = inv / self.w["rope_freqs.weight"]
        ang = pos[:, None, None] * inv[None, None, :]
        c, s = np.cos(ang), np.sin(ang)
        y = x.copy()
        if self.arch == "llama":  # adjacent pairs
            a, b = x[..., 0::2], x[..., 1::2]
            y[..., 0::2], y[..., 1::2] = a * c - b * s, a * s + b * c
        else:  # halves (NeoX)
            a, b = x[..., : d // 2], x[..., d // 2:]
            y[..., : d // 2], y[..., d // 2:] = a * c - b * s, a * s + b * c
        return y

    def logits(self, ids: list[int]) -> np.ndarray:
        w = self.w
        t = len(ids)
        pos = np.arange(t, dtype=np.float64)
        h = w["token_embd.weight"][ids]
        g = self.n_head // self.n_kv
        mask = np.triu(np.full((t, t), -np.inf), 1)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            x = self._norm(h, w[p + "attn_norm.weight"])
            q, k, v = (x @ w[p + n + ".weight"].T + w.get(p + n + ".bias", 0.0)
                       for n in ("attn_q", "attn_k", "attn_v"))
            q = q.reshape(t, self.n_head, self.hd)
            k = k.reshape(t, self.n_kv, self.hd)
            v = v.reshape(t, self.n_kv, self.hd)
            if p + "attn_q_norm.weight" in w:
                q = self._norm(q, w[p + "attn_q_norm.weight"])
                k = self._norm(k, w[p + "attn_k_norm.weight"])
            q, k = self._rope(q, pos), self._rope(k, pos)
            out = np.empty_like(q)
            for hh in range(self.n_head):
                s = q[:, hh] @ k[:, hh // g].T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                out[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, hh // g]
            h = h + out.reshape(t, -1) @ w[p + "attn_output.weight"].T
            x = self._norm(h, w[p + "ffn_norm.weight"])
            gate = x @ w[p + "ffn_gate.weight"].T
            up = x @ w[p + "ffn_up.weight"].T
            h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
        x = self._norm(h[-1], w["output_norm.weight"])
        out_w = w.get("output.weight", w["token_embd.weight"])
        return x @ out_w.T
