"""Write a synthetic GGUF model: random weights of realistic scale, a real tokenizer.

No model can be downloaded here, so tests, benchmarks and the demo cluster run on files this
module writes. They are real GGUF files that llama.cpp loads (the numerical reference), with the
tensor names, metadata and per-tensor quantisation mixtures of llama.cpp's own converter and
quantiser, so the same engine code runs real downloaded models.

Tensors are generated, quantised and streamed to disk one at a time (memory stays at one tensor),
each from its own seeded generator, so a file is reproducible byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..arch.spec import ARCHITECTURES
from ..quant.ftypes import FTYPES, tensor_type
from ..quant.quantize import quantize
from .presets import PRESETS, Preset, with_experts
from .vocab import SyntheticVocab, build_vocab

#: ftypes offered by ``make-model`` (the files people download).
MAKE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M",
              "Q6_K", "MXFP4_MOE")

ROPE_BASE = {"llama": 500000.0, "qwen2": 1000000.0, "qwen3": 1000000.0, "qwen3moe": 1000000.0,
             "gemma3": 1000000.0, "phi3": 10000.0, "gpt-oss": 150000.0}
#: The sliding window: 512 positions in the real Gemma 3 models, 128 in gpt-oss; the tests'
#: presets use 16 so that a 40-token prompt already slides
SLIDING_WINDOW = {"tiny": 16, "small": 16, "1b": 512}
#: gpt-oss's YaRN: a 32-fold extension of the context it was trained at
YARN_FACTOR = 32.0


@dataclass(frozen=True)
class _TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    std: float
    mean: float = 0.0


def vocab_style(arch: str, vocab: str) -> str:
    """Which real model family the tokenizer imitates for an architecture and vocab kind."""
    if vocab == "spm":
        return "llama2"
    return {"llama": "llama3", "gpt-oss": "gpt-oss"}.get(arch, "qwen")


def llama3_rope_factors(n_rot: int, base: float, factor: float = 32.0, low: float = 1.0,
                        high: float = 4.0, old_ctx: int = 8192) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1+'s RoPE scaling, as its converter stores them."""
    freqs = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def tensor_plan(arch: str, p: Preset, n_vocab: int) -> list[_TensorPlan]:
    """Every tensor of a model with these shapes (names and numpy shapes as llama.cpp's
    converter writes them; rope_freqs aside), with the spread the synthetic writer draws."""
    spec = ARCHITECTURES[arch]
    e, hd = p.n_embd, p.head_size
    nq, nkv = p.n_head * hd, p.n_head_kv * hd
    # embeddings scaled so that logits have a std of about 2, as trained models do
    plans = [_TensorPlan("token_embd.weight", (n_vocab, e), 2.0 / math.sqrt(e))]
    # Fan-in scaling gives every block an output of unit size, larger than the embedding, and
    # attention scores of unit spread: the layers, not the input token, decide the prediction,
    # as in a trained model (and the comparison with llama.cpp exercises every operation).
    s_e, s_q, s_f = 1.0 / math.sqrt(e), 1.0 / math.sqrt(nq), 1.0 / math.sqrt(p.n_ff)
    for i in range(p.n_layer):
        b = f"blk.{i}."
        plans.append(_TensorPlan(b + "attn_norm.weight", (e,), 0.1, 1.0))
        if spec.fused_qkv:  # queries, keys and values from one projection (Phi-3)
            plans.append(_TensorPlan(b + "attn_qkv.weight", (nq + 2 * nkv, e), 0.7 * s_e))
        else:
            plans += [
                _TensorPlan(b + "attn_q.weight", (nq, e), 0.5 * s_e),
                _TensorPlan(b + "attn_k.weight", (nkv, e), 0.5 * s_e),
                _TensorPlan(b + "attn_v.weight", (nkv, e), s_e),
            ]
        if spec.qkv_bias:
            plans += [_TensorPlan(b + "attn_q.bias", (nq,), 0.3),
                      _TensorPlan(b + "attn_k.bias", (nkv,), 0.3),
                      _TensorPlan(b + "attn_v.bias", (nkv,), 0.1)]
        if spec.sinks:  # a logit per head, of the order of the scores
            plans.append(_TensorPlan(b + "attn_sinks.weight", (p.n_head,), 1.0))
        if spec.qk_norm:
            plans += [_TensorPlan(b + "attn_q_norm.weight", (hd,), 0.1, 1.0),
                      _TensorPlan(b + "attn_k_norm.weight", (hd,), 0.1, 1.0)]
        plans.append(_TensorPlan(b + "attn_output.weight", (e, nq), s_q))
        if spec.qkv_bias and "bo" in spec.optional:
            plans.append(_TensorPlan(b + "attn_output.bias", (e,), 0.1))
        plans.append(_TensorPlan(b + spec.ffn_norm + ".weight", (e,), 0.1, 1.0))
        if spec.post_norms:
            plans += [_TensorPlan(b + "post_attention_norm.weight", (e,), 0.1, 1.0),
                      _TensorPlan(b + "post_ffw_norm.weight", (e,), 0.1, 1.0)]
        if spec.moe:  # a router of unit-spread logits, and the experts' matrices stacked
            n, f = p.n_expert, p.n_ff_exp
            plans += [
                _TensorPlan(b + "ffn_gate_inp.weight", (n, e), s_e),
                _TensorPlan(b + "ffn_gate_exps.weight", (n, f, e), s_e),
                _TensorPlan(b + "ffn_up_exps.weight", (n, f, e), s_e),
                _TensorPlan(b + "ffn_down_exps.weight", (n, e, f), 1.0 / math.sqrt(f)),
            ]
            if spec.expert_bias:
                plans += [_TensorPlan(b + "ffn_gate_inp.bias", (n,), 0.3),
                          _TensorPlan(b + "ffn_gate_exps.bias", (n, f), 0.1),
                          _TensorPlan(b + "ffn_up_exps.bias", (n, f), 0.1),
                          _TensorPlan(b + "ffn_down_exps.bias", (n, e), 0.1)]
        elif spec.fused_up:  # gate and up stacked in one matrix (Phi-3)
            plans += [
                _TensorPlan(b + "ffn_up.weight", (2 * p.n_ff, e), s_e),
                _TensorPlan(b + "ffn_down.weight", (e, p.n_ff), s_f),
            ]
        else:
            plans += [
                _TensorPlan(b + "ffn_gate.weight", (p.n_ff, e), s_e),
                _TensorPlan(b + "ffn_up.weight", (p.n_ff, e), s_e),
                _TensorPlan(b + "ffn_down.weight", (e, p.n_ff), s_f),
            ]
    plans.append(_TensorPlan("output_norm.weight", (e,), 0.1, 1.0))
    if not p.tied:
        plans.append(_TensorPlan("output.weight", (n_vocab, e), 2.0 / math.sqrt(e)))
    return plans


def write_model(
    out: str | Path,
    arch: str = "llama",
    preset: str = "tiny",
    quant: str = "F16",
    seed: int = 0,
    vocab: str = "bpe",
    n_layer: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic model and return its path. ``n_layer`` overrides the preset's depth."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if quant not in MAKE_TYPES:
        raise ValueError(f"unknown quantisation {quant!r} (choose from {', '.join(MAKE_TYPES)})")
    if vocab not in ("bpe", "spm"):
        raise ValueError("vocab must be 'bpe' or 'spm'")
    p = PRESETS[preset]
    if ARCHITECTURES[arch].moe:
        p = with_experts(p, preset)
    if arch == "gpt-oss":  # its files always have an output projection of their own
        p = dataclasses.replace(p, tied=False)
    if n_layer is not None:
        if n_layer < 1:
            raise ValueError("a model needs at least one layer")
        p = Preset(**{**p.__dict__, "n_layer": n_layer})
    voc = build_vocab(vocab, p.n_vocab, style=vocab_style(arch, vocab))
    if arch == "phi3":
        voc = _with_phi3_specials(voc)
    n_vocab = voc.n_vocab
    hd = p.head_size
    base = ROPE_BASE[arch] if vocab == "bpe" else 10000.0
    plans = tensor_plan(arch, p, n_vocab)
    rope_factors = None
    if arch == "llama" and vocab == "bpe":  # Llama 3.1+ files carry the llama3 RoPE factors
        rope_factors = llama3_rope_factors(hd, base)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(tmp, arch)
    _write_metadata(w, arch, preset, quant, seed, p, voc, base)
    types = {
        t.name: tensor_type(quant, t.name, t.shape, n_layer=p.n_layer, has_output=not p.tied,
                            n_gqa=p.n_head // p.n_head_kv, arch=arch)
        for t in plans
    }
    if rope_factors is not None:
        w.add_tensor_info("rope_freqs.weight", (rope_factors.size,), np.dtype(np.float32),
                          rope_factors.nbytes, raw_dtype=GGMLQuantizationType.F32)
    for t in plans:
        qt = types[t.name]
        block, size = GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(t.shape)) // block * size
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    if rope_factors is not None:
        w.write_tensor_data(rope_factors)
    for i, t in enumerate(plans):
        rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
        values = rng.standard_normal(t.shape, dtype=np.float32) * np.float32(t.std)
        if t.mean:
            values += np.float32(t.mean)
        data = quantize(values, types[t.name])
        w.write_tensor_data(data)
        if progress is not None:
            progress(i + 1, len(plans))
    w.close()
    tmp.replace(out)
    return out


#: Phi-3's special and chat tokens; llama.cpp insists on the first four in the vocabulary of a
#: model named Phi-3 (it sets their strip flags by name)
PHI3_SPECIALS = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>",
                 "<|user|>", "<|system|>")


def _with_phi3_specials(voc: SyntheticVocab) -> SyntheticVocab:
    """The vocabulary with Phi-3's chat tokens (control tokens) in place of its last tokens,
    those it lacks."""
    tokens, types = list(voc.tokens), list(voc.token_types)
    missing = [t for t in PHI3_SPECIALS if t not in tokens]
    for i, text in enumerate(missing):
        slot = len(tokens) - len(missing) + i
        tokens[slot], types[slot] = text, int(gguf.TokenType.CONTROL)
    return dataclasses.replace(voc, tokens=tokens, token_types=types)


def _write_metadata(w: gguf.GGUFWriter, arch: str, preset: str, quant: str, seed: int, p: Preset,
                    voc: SyntheticVocab, rope_base: float) -> None:
    hd = p.head_size
    w.add_name(f"Prima synthetic {arch} {preset} {quant} (random weights, seed {seed})")
    w.add_description("Random weights for tests and demos: it produces fluent-looking nonsense. "
                      "Use a real GGUF model for real answers.")
    w.add_file_type(int(FTYPES[quant]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(p.n_ctx_train)
    w.add_embedding_length(p.n_embd)
    w.add_block_count(p.n_layer)
    w.add_feed_forward_length(p.n_ff)
    w.add_head_count(p.n_head)
    w.add_head_count_kv(p.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5 if arch in ("llama", "gpt-oss") else 1e-6)
    if ARCHITECTURES[arch].swa_pattern:
        w.add_sliding_window(SLIDING_WINDOW[preset])
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(voc.n_vocab)
    if arch == "gpt-oss":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(YARN_FACTOR)
        w.add_rope_scaling_orig_ctx_len(int(p.n_ctx_train / YARN_FACTOR))
    if arch in ("qwen3", "qwen3moe", "gemma3", "gpt-oss"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    if p.n_expert:
        w.add_expert_count(p.n_expert)
        w.add_expert_used_count(p.n_expert_used)
        w.add_expert_feed_forward_length(p.n_ff_exp)
    voc.write_to(w)

