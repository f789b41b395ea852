"""What a model costs, layer by layer: the planner's view of a GGUF file.

Halda needs, per layer, the bytes a device must hold or re-read and the work per token by weight
type (each device's kernel speed differs per quant type); plus the KV cache per layer for a
context, the embedding and output sizes, and the bytes that cross a ring hop per token. All of it
follows from tensor shapes and types, so a profile can be read from a file on disk or computed
from a model's published shapes and llama.cpp's quantisation mixture, for models nobody has here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..arch.config import load_config
from ..arch.spec import ARCHITECTURES
from ..model_file import ModelFile
from ..quant.ftypes import tensor_type
from ..synth.presets import Preset
from ..synth.writer import tensor_plan

FORMAT = "prima-model-profile/1"
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class LayerProfile:
    """One transformer block: weight bytes and per-token matmul FLOPs by weight type.

    A mixture of experts holds every expert but a token reads only those it is routed to:
    ``bytes_by_type`` is what the layer holds (memory), ``touched_bytes_by_type`` what one
    token reads of it (the router, attention, and ``n_expert_used`` of the experts: memory
    bandwidth, and the compute priced from it), and ``flops_by_type`` that token's work. For a
    dense layer the two byte counts are the same (``touched_bytes_by_type`` is None)."""

    bytes_by_type: dict[str, int]
    flops_by_type: dict[str, int]  # 2 * rows * cols per weight a token uses, for one token
    other_flops: int  # norms, RoPE, SiLU, biases, softmax scaling (float32, per token)
    touched_bytes_by_type: dict[str, int] | None = None

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_type.values())

    @property
    def touched_bytes(self) -> int:
        """Bytes of weights one token reads in this layer."""
        touched = self.touched_bytes_by_type
        return self.bytes if touched is None else sum(touched.values())

    @property
    def flops(self) -> int:
        return sum(self.flops_by_type.values()) + self.other_flops


@dataclass(frozen=True)
class ModelProfile:
    name: str
    architecture: str
    quant: str  # the file type, e.g. Q4_K_M (or the main weight type of a file)
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    layers: list[LayerProfile]
    embedding_bytes: int  # token_embd (only one row per token is read)
    embedding_type: str
    output_bytes: int  # output_norm + output projection (token_embd again when tied)
    output_flops_by_type: dict[str, int]
    tied_embeddings: bool
    file_bytes: int  # weights only for computed profiles; the file's size for files
    source: str = ""  # the file it was read from, or "published shapes"
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived quantities ----------------------------------------------------------------------

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def mean_layer_bytes(self) -> float:
        return sum(layer.bytes for layer in self.layers) / max(1, self.n_layer)

    @property
    def expert_share(self) -> float:
        """A mixture's experts a token reads, as a share of those a layer holds (used / n;
        0 for a dense model), from ``extra["experts"]``."""
        experts = self.extra.get("experts")
        return experts["used"] / experts["n"] if experts else 0.0

    @property
    def mean_expert_bytes(self) -> float:
        """Bytes of a layer's experts (all of them), on average; 0 for a dense model."""
        share = self.expert_share
        if not 0 < share < 1:
            return 0.0
        return (self.mean_layer_bytes - self.mean_touched_layer_bytes) / (1 - share)

    @property
    def mean_touched_layer_bytes(self) -> float:
        """Bytes of weights one token reads in a layer, on average (less than the layer holds
        for a mixture of experts)."""
        return sum(layer.touched_bytes for layer in self.layers) / max(1, self.n_layer)

    @property
    def embedding_row_bytes(self) -> int:
        return self.embedding_bytes // max(1, self.n_vocab)

    def kv_bytes_per_layer(self, n_ctx: int, dtype_bytes: int = 2) -> int:
        """Keys and values of one layer for ``n_ctx`` positions (float16 by default)."""
        return 2 * self.n_embd_kv * n_ctx * dtype_bytes

    def attention_flops_per_layer(self, n_kv: int) -> int:
        """Q·Kᵀ and P·V for one new token attending over ``n_kv`` positions."""
        return 2 * 2 * self.n_head * self.head_dim * n_kv

    def scratch_bytes(self, batch: int, n_ctx: int = 4096) -> int:
        """What this project's engine allocates, besides weights and KV cache, to run a
        ``batch``-token prefill chunk at a context of ``n_ctx``: ggml's compute buffer (a
        layer's feed-forward gate, up and product live at once: three n_ff floats and three
        n_embd floats per token, and the float16 attention mask over the cache), ggml's work
        buffer (activations rounded to the weights' companion type before a product: at most
        2 bytes per n_ff value), the hidden states in and out and a copy of the mask on the
        Python side, and the logits row. Against what a chunk really adds to the process at its
        peak it is 1.15x for the 1b and the small shapes (tests/test_model_profile.py)."""
        e, f = self.n_embd, self.n_ff
        # the mask spans the cache positions read: the whole context, for a chunk at its end
        return batch * (14 * f + 20 * e + 4 * n_ctx) + 8 * self.n_vocab

    def activation_bytes(self, dtype_bytes: int = 4) -> int:
        """What crosses a ring hop per token: one hidden state (float32 by default)."""
        return self.n_embd * dtype_bytes

    # -- exchange format -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        doc = {"format": FORMAT, **asdict(self)}
        doc["summary"] = {
            "layer_bytes_mean": round(self.mean_layer_bytes),
            "kv_bytes_per_layer_per_token_f16": self.kv_bytes_per_layer(1),
            "activation_bytes_per_token_f32": self.activation_bytes(4),
            "weights_bytes": sum(layer.bytes for layer in self.layers)
            + self.embedding_bytes + self.output_bytes
            - (self.embedding_bytes if self.tied_embeddings else 0),
        }
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelProfile:
        if doc.get("format") != FORMAT:
            raise ValueError(f"not a model profile (expected format {FORMAT!r}, got "
                             f"{doc.get('format')!r})")
        fields = {k: v for k, v in doc.items() if k not in ("format", "summary")}
        try:
            fields["layers"] = [LayerProfile(**layer) for layer in fields["layers"]]
            profile = cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"the model profile is incomplete or malformed: {exc}") from None
        if len(profile.layers) != profile.n_layer:
            raise ValueError(f"the model profile lists {len(profile.layers)} layers but says "
                             f"n_layer is {profile.n_layer}")
        return profile

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        """A GGUF file or a JSON profile (so plans can be made for models not on disk)."""
        p = Path(path)
        if p.suffix.lower() == ".gguf":
            return from_gguf(p)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read the model profile {p}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"the model profile {p} is not valid JSON: {exc}") from None
        return cls.from_json(doc)


# -- building profiles ----------------------------------------------------------------------------


def _nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _other_flops(n_embd: int, n_ff: int, n_head: int, head_dim: int, n_head_kv: int,
                 bias: bool) -> int:
    """The float32 element-wise work of a block per token (prima.cpp's §4.3 accounting)."""
    q, kv = n_head * head_dim, n_head_kv * head_dim
    flops = 2 * (4 * n_embd + 1)  # two RMS norms
    flops += int(2.5 * q + 2.5 * kv)  # RoPE on queries and keys
    flops += 8 * n_ff + n_ff  # SiLU gate and the product with up
    flops += 2 * n_embd  # the two residual additions
    if bias:
        flops += q + 2 * kv
    return flops


def _profile(tensors: Iterable[tuple[str, tuple[int, ...], GGMLQuantizationType]], *,
             name: str, arch: str, quant: str, n_layer: int, n_embd: int, n_head: int,
             n_head_kv: int, head_dim: int, n_ff: int, n_vocab: int, n_ctx_train: int,
             tied: bool, file_bytes: int | None, source: str, bias: bool,
             experts: tuple[int, int] = (0, 0)) -> ModelProfile:
    """``experts``: (experts per layer, experts a token uses) of a mixture of experts, whose
    3-D expert tensors a token reads ``used / n`` of."""
    n_expert, used = experts
    layers_b: list[dict[str, int]] = [{} for _ in range(n_layer)]
    layers_t: list[dict[str, int]] = [{} for _ in range(n_layer)]
    layers_f: list[dict[str, int]] = [{} for _ in range(n_layer)]
    emb_bytes, emb_type = 0, ""
    out_bytes = 0
    out_flops: dict[str, int] = {}
    total = 0
    for tname, shape, qtype in tensors:
        nb = _nbytes(qtype, shape)
        total += nb
        tn = qtype.name
        m = _LAYER.match(tname)
        if m is not None:
            i = int(m.group(1))
            layers_b[i][tn] = layers_b[i].get(tn, 0) + nb
            touched = nb
            if n_expert and "_exps." in tname and shape[0] == n_expert:
                touched = nb // n_expert * used  # the experts' matrices (and biases) it uses
                if len(shape) == 3:
                    layers_f[i][tn] = layers_f[i].get(tn, 0) + 2 * shape[1] * shape[2] * used
            elif len(shape) == 2:
                layers_f[i][tn] = layers_f[i].get(tn, 0) + 2 * shape[0] * shape[1]
            layers_t[i][tn] = layers_t[i].get(tn, 0) + touched
        elif tname == "token_embd.weight":
            emb_bytes, emb_type = nb, tn
            if tied:
                out_bytes += nb
                out_flops[tn] = 2 * shape[0] * shape[1]
        elif tname in ("output.weight", "output_norm.weight"):
            out_bytes += nb
            if len(shape) == 2:
                out_flops[tn] = out_flops.get(tn, 0) + 2 * shape[0] * shape[1]
    # a token's element-wise feed-forward work spans the experts it uses (and the router's
    # softmax over all of them)
    other = _other_flops(n_embd, n_ff * max(1, used), n_head, head_dim, n_head_kv, bias) \
        + 5 * n_expert
    layers = [LayerProfile(dict(sorted(b.items())), dict(sorted(f.items())), other,
                           dict(sorted(t.items())) if n_expert else None)
              for b, t, f in zip(layers_b, layers_t, layers_f, strict=True)]
    return ModelProfile(
        extra={"experts": {"n": n_expert, "used": used}} if n_expert else {},
        name=name, architecture=arch, quant=quant, n_layer=n_layer, n_embd=n_embd,
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff, n_vocab=n_vocab,
        n_ctx_train=n_ctx_train, layers=layers, embedding_bytes=emb_bytes,
        embedding_type=emb_type, output_bytes=out_bytes, output_flops_by_type=out_flops,
        tied_embeddings=tied, file_bytes=total if file_bytes is None else file_bytes,
        source=source)


def from_gguf(path: str | Path) -> ModelProfile:
    """The profile of a GGUF file, from its tensor table (no weight is read)."""
    mf = ModelFile.open(path)
    try:
        cfg = load_config(mf)
        tensors = [(t.name, t.shape, GGMLQuantizationType(t.qtype))
                   for t in mf.tensors.values()]
        by_type: dict[str, int] = {}
        for _, shape, qtype in tensors:
            if len(shape) == 2:
                by_type[qtype.name] = by_type.get(qtype.name, 0) + _nbytes(qtype, shape)
        ftype = mf.get("general.file_type")
        quant = _FILE_TYPES.get(int(ftype), "") if ftype is not None else ""
        return _profile(
            tensors, name=str(mf.get("general.name") or mf.path.stem), arch=cfg.arch.name,
            quant=quant or max(by_type, key=lambda k: by_type[k]), n_layer=cfg.n_layer,
            n_embd=cfg.n_embd, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv,
            head_dim=cfg.head_dim, n_ff=cfg.n_ff, n_vocab=cfg.n_vocab,
            n_ctx_train=cfg.n_ctx_train, tied=cfg.tied_embeddings, file_bytes=mf.size,
            source=mf.path.name, bias=cfg.arch.qkv_bias,
            experts=(cfg.n_expert, cfg.n_expert_used))
    finally:
        mf.close()


#: llama.cpp's LLAMA_FTYPE values of the files people download.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
               15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
               38: "MXFP4_MOE"}


@dataclass(frozen=True)
class PublishedModel:
    """A released model's shapes (from its config.json), enough to profile it at any quant."""

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tied: bool = False
    head_dim: int = 0  # 0: n_embd / n_head
    experts: tuple[int, int, int] = (0, 0, 0)  # a mixture: experts, used per token, width
    ftype: str = "Q4_K_M"  # the file type people run it at (its example profile's)

    @property
    def example_name(self) -> str:
        """The file name of its profile in ``examples/models``."""
        return f"{self.name}-{self.ftype.lower()}.json"


PUBLISHED: dict[str, PublishedModel] = {m.name: m for m in (
    PublishedModel("llama3-8b", "llama", 32, 4096, 32, 8, 14336, 128256, 8192),
    PublishedModel("llama3-70b", "llama", 80, 8192, 64, 8, 28672, 128256, 8192),
    PublishedModel("deepseek-r1-distill-llama-70b", "llama", 80, 8192, 64, 8, 28672, 128256,
                   131072),
    PublishedModel("qwen2.5-32b", "qwen2", 64, 5120, 40, 8, 27648, 152064, 32768),
    PublishedModel("qwq-32b", "qwen2", 64, 5120, 40, 8, 27648, 152064, 131072),
    PublishedModel("qwen2.5-72b", "qwen2", 80, 8192, 64, 8, 29568, 152064, 32768),
    PublishedModel("llama3.3-70b", "llama", 80, 8192, 64, 8, 28672, 128256, 131072),
    PublishedModel("qwen3-32b", "qwen3", 64, 5120, 64, 8, 25600, 151936, 40960, head_dim=128),
    # 30B weights, 3B of them read per token: 8 of 128 experts of width 768 in each layer
    PublishedModel("qwen3-30b-a3b", "qwen3moe", 48, 2048, 32, 4, 6144, 151936, 40960,
                   head_dim=128, experts=(128, 8, 768)),
    # gpt-oss: 4 of 32 (20b) or 128 (120b) experts of width 2880; files MXFP4_MOE
    PublishedModel("gpt-oss-20b", "gpt-oss", 24, 2880, 64, 8, 2880, 201088, 131072,
                   head_dim=64, experts=(32, 4, 2880), ftype="MXFP4_MOE"),
    PublishedModel("gpt-oss-120b", "gpt-oss", 36, 2880, 64, 8, 2880, 201088, 131072,
                   head_dim=64, experts=(128, 4, 2880), ftype="MXFP4_MOE"),
    PublishedModel("gemma3-270m", "gemma3", 18, 640, 4, 1, 2048, 262144, 32768, tied=True,
                   head_dim=256),
    PublishedModel("gemma3-27b", "gemma3", 62, 5376, 32, 16, 21504, 262208, 131072,
                   tied=True, head_dim=128),
)}


def from_published(name: str, ftype: str | None = None) -> ModelProfile:
    """The profile a llama.cpp ``ftype`` file of a published model would have (by default at
    the file type people run it at: Q4_K_M, or MXFP4_MOE for gpt-oss)."""
    m = PUBLISHED.get(name)
    if m is None:
        raise ValueError(f"unknown published model {name!r} (known: {', '.join(PUBLISHED)})")
    return from_shapes(m, ftype or m.ftype)


def from_shapes(m: PublishedModel, ftype: str) -> ModelProfile:
    """The profile of a model with these shapes quantised by llama.cpp to ``ftype``."""
    n_expert, used, width = m.experts
    preset = Preset(n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
                    n_head_kv=m.n_head_kv, n_ff=m.n_ff, n_vocab=m.n_vocab, tied=m.tied,
                    n_ctx_train=m.n_ctx_train, n_expert=n_expert, n_expert_used=used,
                    n_ff_exp=width, head_dim=m.head_dim)
    n_gqa = m.n_head // m.n_head_kv
    tensors = [(t.name, t.shape, tensor_type(ftype, t.name, t.shape, n_layer=m.n_layer,
                                             has_output=not m.tied, n_gqa=n_gqa, arch=m.arch))
               for t in tensor_plan(m.arch, preset, m.n_vocab)]
    return _profile(tensors, name=f"{m.name}-{ftype.lower()}", arch=m.arch, quant=ftype,
                    n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                    n_head_kv=m.n_head_kv, head_dim=preset.head_size,
                    n_ff=width or m.n_ff, n_vocab=m.n_vocab, n_ctx_train=m.n_ctx_train,
                    tied=m.tied, file_bytes=None, source="published shapes",
                    bias=ARCHITECTURES[m.arch].qkv_bias, experts=(n_expert, used))
