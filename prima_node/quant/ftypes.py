"""llama.cpp file types and the per-tensor type mixture each one implies.

A "Q4_K_M" file is not all Q4_K: llama.cpp's quantiser keeps norms in F32,
promotes the output projection and some attn_v/ffn_down layers to more bits,
and falls back to 32-wide block types when a row is not a multiple of 256.
Synthetic models must reproduce that mixture, or their size, speed and the
kernels they exercise would not match the real files users download.

Source: llama.cpp ``src/llama-quant.cpp`` -- ``llama_tensor_get_type`` (outer
wrapper), ``llama_tensor_get_type_impl`` (the mixture rules),
``tensor_type_fallback`` (row-length fallbacks), ``tensor_allows_quantization``
and ``llama_ftype_get_default_type``; model-size labels from ``src/llama-model.cpp``
(``load_hparams``). Only the branches reachable for dense llama/qwen2/qwen3
models without an importance matrix or user overrides are reproduced.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

__all__ = ["FTYPES", "default_type", "tensor_type", "use_more_bits"]

Q = GGMLQuantizationType

FTYPES: dict[str, LlamaFileType] = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1,
    "Q4_K_S": LlamaFileType.MOSTLY_Q4_K_S,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K_S": LlamaFileType.MOSTLY_Q5_K_S,
    "Q5_K_M": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    "MXFP4_MOE": LlamaFileType.MOSTLY_MXFP4_MOE,
}

# llama_ftype_get_default_type
_DEFAULT_TYPE: dict[str, GGMLQuantizationType] = {
    "F32": Q.F32,
    "F16": Q.F16,
    "BF16": Q.BF16,
    "Q8_0": Q.Q8_0,
    "Q4_0": Q.Q4_0,
    "Q4_1": Q.Q4_1,
    "Q5_0": Q.Q5_0,
    "Q5_1": Q.Q5_1,
    "Q4_K_S": Q.Q4_K,
    "Q4_K_M": Q.Q4_K,
    "Q5_K_S": Q.Q5_K,
    "Q5_K_M": Q.Q5_K,
    "Q6_K": Q.Q6_K,
    "MXFP4_MOE": Q.MXFP4,
}

_UNQUANTISED = (Q.F32, Q.F16, Q.BF16)

# tensor_type_fallback: a type whose block does not divide the row length is
# replaced by one with 32-wide blocks (F16 if even that does not divide it).
_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def default_type(ftype: str) -> GGMLQuantizationType:
    """The type most 2-D weights get in a file of this ``ftype``."""
    try:
        return _DEFAULT_TYPE[ftype]
    except KeyError:
        raise ValueError(
            f"unknown file type {ftype!r} (known: {', '.join(FTYPES)})"
        ) from None


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get extra bits in the *_M mixtures.

    The first and last eighth of the layers plus every third layer in between;
    these are where quantisation error hurts perplexity most.
    """
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def _ggml_n_dims(shape: tuple[int, ...]) -> int:
    # ggml_n_dims ignores trailing size-1 ggml axes, i.e. leading numpy axes.
    n = len(shape)
    while n > 1 and shape[len(shape) - n] == 1:
        n -= 1
    return n


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    # tensor_allows_quantization, the parts that concern llama/qwen2/qwen3
    return (
        _ggml_n_dims(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


def _category(name: str) -> str:
    # tensor_get_category; the order matters ("attn_v" is a substring test)
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _layer_index(name: str, n_layer: int) -> int:
    # llama.cpp counts attn_v/ffn_down tensors in an order sorted by layer
    # (weight_name_comparer), so its running counter equals the block index.
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"cannot determine the layer of tensor {name!r}")
    i = int(m.group(1))
    if not 0 <= i < n_layer:
        raise ValueError(f"tensor {name!r} is outside the model's {n_layer} layers")
    return i


def _is_70b(arch: str, n_layer: int, n_gqa: int) -> bool:
    # llama-model.cpp's LLM_TYPE_70B label, which llama-quant.cpp consults.
    if arch == "llama":
        return n_layer == 80 and n_gqa > 1  # 80 layers without GQA is the 65B
    if arch == "qwen2":
        return n_layer == 80
    return False


def tensor_type(
    ftype: str,
    name: str,
    shape: tuple[int, ...],
    *,
    n_layer: int,
    has_output: bool,
    n_gqa: int = 1,
    arch: str = "llama",
) -> GGMLQuantizationType:
    """The type llama.cpp's quantiser gives tensor ``name`` in an ``ftype`` file.

    ``shape`` is in numpy order (rows, cols): the row length that must be a
    multiple of the block size is ``shape[-1]``. ``has_output`` is False for
    tied embeddings, where token_embd.weight doubles as the output projection
    and is treated like it. ``n_gqa`` (heads per KV head) and ``arch`` only
    matter for recognising llama.cpp's "70B" label (80 layers), which moves
    Q4_K attn_v layers to Q5_K.

    Tensors llama.cpp never quantises (1-D norms and biases, rope_freqs) are
    F32 as the converter writes them. Raises ValueError where llama.cpp would
    refuse to quantise, e.g. a row length that no fallback type divides.
    """
    new_type = default_type(ftype)
    shape = tuple(int(s) for s in shape)
    if not _allows_quantization(name, shape):
        return Q.F32
    if new_type in _UNQUANTISED:
        return new_type

    cat = _category(name)
    ncols = shape[-1]
    if ftype == "MXFP4_MOE":  # gpt-oss's files: the experts MXFP4, every other matrix Q8_0
        return Q.MXFP4 if len(shape) == 3 and shape[0] > 1 else Q.Q8_0

    if cat == "output" or (not has_output and cat == "token_embd"):
        if ncols % GGML_QUANT_SIZES[new_type][0] != 0:
            new_type = Q.Q8_0
        elif new_type != Q.Q8_0:
            new_type = Q.Q6_K
    elif cat == "token_embd":
        pass  # untied embeddings keep the default type for these ftypes
    elif cat == "attn_v":
        i = _layer_index(name, n_layer)
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layer):
            new_type = Q.Q6_K
        elif ftype == "Q4_K_S" and i < 4:
            new_type = Q.Q5_K
        if _is_70b(arch, n_layer, n_gqa) and new_type in (Q.Q3_K, Q.Q4_K):
            # attn_v is 8x smaller than attn_q there, so extra bits are cheap
            new_type = Q.Q5_K
    elif cat == "ffn_down":
        i = _layer_index(name, n_layer)
        if ftype in ("Q4_K_M", "Q5_K_M"):
            if use_more_bits(i, n_layer):
                new_type = Q.Q6_K
        elif ftype == "Q4_K_S" and i < n_layer // 8:
            new_type = Q.Q5_K

    block = GGML_QUANT_SIZES[new_type][0]
    if ncols % block != 0:
        fallback = _FALLBACK.get(new_type)
        if fallback is None:
            raise ValueError(
                f"{name}: row length {ncols} is not a multiple of {block} and llama.cpp "
                f"defines no fallback for {new_type.name}"
            )
        new_type = fallback
        if ncols % GGML_QUANT_SIZES[new_type][0] != 0:
            new_type = Q.F16
    return new_type
