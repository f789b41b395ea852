"""Which tensors a model has, by role, and the shapes its configuration implies.

The inventory the graph builder works from: each layer's projections, norms and (per
architecture) biases and Q/K norms, and the model's ends. Every tensor is checked against the
shape the configuration implies before any is handed to ggml, which aborts the process on a
product of mismatched shapes; a mismatch is a ModelLoadError naming the tensor.
"""

from __future__ import annotations

import numpy as np

from ..arch.config import ModelConfig
from ..errors import ModelLoadError
from ..model_file import ModelFile, TensorInfo

#: The roles whose weights are matrices multiplied with the activations (repackable).
MATMUL_ROLES = ("wq", "wk", "wv", "wqkv", "wo", "w_gate", "w_up", "w_down")


def check_vector(mf: ModelFile, name: str, size: int) -> TensorInfo:
    t = mf.tensor(name)
    n = int(np.prod(t.shape))
    if n != size or len(t.shape) != 1:
        raise ModelLoadError(mf.path, f"tensor {name!r} has shape {t.shape[::-1]} (GGUF order), "
                                      f"expected ({size},)")
    if t.qtype.name != "F32":
        raise ModelLoadError(mf.path, f"tensor {name!r} is {t.qtype.name}; norm weights and "
                                      "biases must be F32, as llama.cpp writes them")
    return t


def check_matrix(mf: ModelFile, name: str, rows: int, cols: int) -> TensorInfo:
    t = mf.tensor(name)
    if t.shape != (rows, cols):
        raise ModelLoadError(
            mf.path, f"tensor {name!r} has shape {t.shape[::-1]} (GGUF order), "
            f"expected {(cols, rows)}")
    return t


def check_experts(mf: ModelFile, name: str, n_expert: int, rows: int, cols: int) -> TensorInfo:
    """A mixture's expert matrices: ``n_expert`` matrices of (rows x cols) in one tensor."""
    t = mf.tensor(name)
    if t.shape != (n_expert, rows, cols):
        raise ModelLoadError(
            mf.path, f"tensor {name!r} has shape {t.shape[::-1]} (GGUF order), "
            f"expected {(cols, rows, n_expert)}")
    return t


def check_expert_bias(mf: ModelFile, name: str, n_expert: int, size: int) -> TensorInfo:
    """A bias per expert: ``n_expert`` rows of ``size`` F32 values in one tensor."""
    t = mf.tensor(name)
    if t.shape != (n_expert, size) or t.qtype.name != "F32":
        raise ModelLoadError(mf.path, f"tensor {name!r} is {t.qtype.name} of shape "
                                      f"{t.shape[::-1]} (GGUF order), expected F32 of "
                                      f"{(size, n_expert)}")
    return t


def layer_tensor_infos(mf: ModelFile, cfg: ModelConfig, i: int) -> dict[str, TensorInfo]:
    """Layer ``i``'s tensors by role, each checked against the shapes the config implies."""
    p = f"blk.{i}."
    e, hd = cfg.n_embd, cfg.head_dim
    nq, nkv = cfg.n_head * hd, cfg.n_embd_kv
    out = {
        "attn_norm": check_vector(mf, p + "attn_norm.weight", e),
        "wo": check_matrix(mf, p + "attn_output.weight", e, nq),
        "ffn_norm": check_vector(mf, p + cfg.arch.ffn_norm + ".weight", e),
    }
    if cfg.arch.fused_qkv and p + "attn_qkv.weight" in mf.tensors:
        out["wqkv"] = check_matrix(mf, p + "attn_qkv.weight", nq + 2 * nkv, e)
    else:
        out["wq"] = check_matrix(mf, p + "attn_q.weight", nq, e)
        out["wk"] = check_matrix(mf, p + "attn_k.weight", nkv, e)
        out["wv"] = check_matrix(mf, p + "attn_v.weight", nkv, e)
    if cfg.arch.moe:  # the router, and every expert's matrices in one 3-D tensor each
        n = cfg.n_expert
        out["gate_inp"] = check_matrix(mf, p + "ffn_gate_inp.weight", n, e)
        out["w_gate"] = check_experts(mf, p + "ffn_gate_exps.weight", n, cfg.n_ff, e)
        out["w_up"] = check_experts(mf, p + "ffn_up_exps.weight", n, cfg.n_ff, e)
        out["w_down"] = check_experts(mf, p + "ffn_down_exps.weight", n, e, cfg.n_ff)
        if cfg.arch.expert_bias:  # gpt-oss: the router's bias, and a row per expert
            out["gate_inp_b"] = check_vector(mf, p + "ffn_gate_inp.bias", n)
            for role, name, size in (("up_exps_b", "ffn_up_exps.bias", cfg.n_ff),
                                     ("gate_exps_b", "ffn_gate_exps.bias", cfg.n_ff),
                                     ("down_exps_b", "ffn_down_exps.bias", e)):
                out[role] = check_expert_bias(mf, p + name, n, size)
    elif cfg.arch.fused_up:  # gate and up in one matrix of twice the width
        out["w_up"] = check_matrix(mf, p + "ffn_up.weight", 2 * cfg.n_ff, e)
        out["w_down"] = check_matrix(mf, p + "ffn_down.weight", e, cfg.n_ff)
    else:
        out["w_gate"] = check_matrix(mf, p + "ffn_gate.weight", cfg.n_ff, e)
        out["w_up"] = check_matrix(mf, p + "ffn_up.weight", cfg.n_ff, e)
        out["w_down"] = check_matrix(mf, p + "ffn_down.weight", e, cfg.n_ff)
    # biases: used where a file of the architecture may have them (ArchSpec.optional), as in
    # llama.cpp, whose graph adds each one after its projection
    for role, name, size in (("bq", "attn_q.bias", nq), ("bk", "attn_k.bias", nkv),
                             ("bv", "attn_v.bias", nkv), ("bo", "attn_output.bias", e),
                             ("b_up", "ffn_up.bias", cfg.n_ff),
                             ("b_gate", "ffn_gate.bias", cfg.n_ff),
                             ("b_down", "ffn_down.bias", e)):
        if role in cfg.arch.optional and p + name in mf.tensors:
            out[role] = check_vector(mf, p + name, size)
    if cfg.arch.qk_norm:
        out["q_norm"] = check_vector(mf, p + "attn_q_norm.weight", hd)
        out["k_norm"] = check_vector(mf, p + "attn_k_norm.weight", hd)
    if cfg.arch.sinks:
        out["sinks"] = check_vector(mf, p + "attn_sinks.weight", cfg.n_head)
    if cfg.arch.post_norms:
        out["attn_post_norm"] = check_vector(mf, p + "post_attention_norm.weight", e)
        out["ffn_post_norm"] = check_vector(mf, p + "post_ffw_norm.weight", e)
    return out




def end_tensor_infos(mf: ModelFile, cfg: ModelConfig) -> list[TensorInfo]:
    """The embedding, final norm, output projection (and its bias, if any) and RoPE factors,
    checked."""
    infos = [check_matrix(mf, "token_embd.weight", cfg.n_vocab, cfg.n_embd),
             check_vector(mf, "output_norm.weight", cfg.n_embd)]
    if not cfg.tied_embeddings:
        infos.append(check_matrix(mf, "output.weight", cfg.n_vocab, cfg.n_embd))
    if "output_bias" in cfg.arch.optional and "output.bias" in mf.tensors:
        infos.append(check_vector(mf, "output.bias", cfg.n_vocab))
    if cfg.rope_factors is not None:
        infos.append(check_vector(mf, "rope_freqs.weight", cfg.n_rot // 2))
    return infos


def check_all_tensors_used(mf: ModelFile, cfg: ModelConfig) -> None:
    """Every tensor of the file must have a place in the graph: one that does not (a fused
    QKV projection, a norm this architecture has no place for) would otherwise be silently
    ignored and every answer computed without it. llama.cpp refuses such files alike."""
    used = {t.name for t in end_tensor_infos(mf, cfg)}
    for i in range(cfg.n_layer):
        used |= {t.name for t in layer_tensor_infos(mf, cfg, i).values()}
    extra = sorted(set(mf.tensors) - used)
    if extra:
        raise ModelLoadError(
            mf.path, f"tensor {extra[0]!r} ({len(extra)} such in all) has no place in this "
            f"engine's {cfg.arch.name} graph; computing without it would give wrong answers")


def output_name(cfg: ModelConfig) -> str:
    """The output projection's tensor: the embedding itself when they are tied."""
    return "token_embd.weight" if cfg.tied_embeddings else "output.weight"
