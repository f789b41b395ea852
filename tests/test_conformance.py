"""Conformance with llama.cpp, the numerical reference, on the same GGUF files.

The engine builds the same ggml graph as llama.cpp for these architectures and runs it on the
same ggml build, so with llama.cpp set up alike (flash attention on, no weight repacking,
512-token batches, logits of the last token only: ``prima_node.reference.LlamaCpp``) the logits
are expected to be identical, bit for bit. The check allows 1e-4 of the largest logit (an
engine error is orders of magnitude larger: a wrong RoPE base or attention scale moves logits
by percents); greedy continuations of 32 tokens must be identical.

Covered: every architecture x file type x {tiny, small} preset (synthetic models written by the
project's own tool, which follows llama.cpp's quantisation mixtures), more weight types written
by llama.cpp's own quantiser, and the real SmolLM2-135M-Instruct on prose, code, multilingual and
chat-template prompts. With repacking on (llama.cpp's default, and this engine's on a device
that holds its whole model) decode steps multiply with repacked matrices and prefill chunks
with the file's layout, which is faster there; fed one token at a time, both engines use the
repacked matrices throughout and are compared that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import ModelFactory
from greedy import engine_greedy

from prima_node import Model, ggml
from prima_node.default_model import default_model
from prima_node.packaged_models import gemma3_270m
from prima_node.quant_types import SUPPORTED_TYPES
from prima_node.reference import LlamaCpp
from prima_node.text.tokenizer import Tokenizer

ARCHS = ["llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3"]
QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M",
          "Q6_K"]
PRESETS = ["tiny", "small"]
Q = gguf.GGMLQuantizationType
PROMPT = 40
GEN = 32
N_CTX = 128
#: max |logit difference| allowed, as a fraction of the largest |logit| (module docstring)
RELATIVE = 1e-4


@dataclass
class CaseResult:
    worst: float  # max over the prompt and every continuation step of max |diff| / max |logit|
    identical: bool  # every logit of every step equal, bit for bit
    tokens_equal: bool


_RESULTS: dict[str, CaseResult] = {}


def _compare(name: str, path: Path, prompt: list[int]) -> CaseResult:
    ours_t, ours = engine_greedy(path, prompt, GEN, threads=2, n_ctx=N_CTX, repack=False)
    with LlamaCpp(path, n_ctx=N_CTX) as ref:
        theirs_t, theirs = ref.greedy(prompt, GEN)
    steps = min(len(ours), len(theirs))
    worst = max(float(np.abs(ours[i] - theirs[i]).max() / np.abs(theirs[i]).max())
                for i in range(steps))
    result = CaseResult(worst, all(np.array_equal(ours[i], theirs[i]) for i in range(steps)),
                        ours_t == theirs_t)
    _RESULTS[name] = result
    assert worst <= RELATIVE, f"{name}: logits differ by {worst:.2e} of the largest"
    assert result.tokens_equal, f"{name}: greedy tokens {ours_t} vs llama.cpp {theirs_t}"
    return result


def _prompt(n_vocab: int, seed: int = 1234) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, n_vocab, PROMPT)]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_models_match_llama_cpp(make_model: ModelFactory, arch: str, quant: str,
                                          preset: str) -> None:
    path = make_model(arch, preset, quant)
    with Model.open(path, n_ctx=N_CTX) as m:
        n_vocab = m.config.n_vocab
    _compare(f"{arch} {quant} {preset}", path, _prompt(n_vocab))


#: gpt-oss as its files come (MXFP4 experts, the rest Q8_0), and two plain types
GPT_OSS_QUANTS = ["MXFP4_MOE", "Q8_0", "F16"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quant", GPT_OSS_QUANTS)
def test_gpt_oss_matches_llama_cpp(make_model: ModelFactory, quant: str, preset: str) -> None:
    """Attention sinks, alternating sliding windows, YaRN, biased experts and OpenAI's
    SwiGLU: each changes the logits when left out, so equality checks every one of them."""
    path = make_model("gpt-oss", preset, quant)
    with Model.open(path, n_ctx=N_CTX) as m:
        n_vocab = m.config.n_vocab
        assert m.config.yarn is not None and m.config.n_swa > 0
    _compare(f"gpt-oss {quant} {preset}", path, _prompt(n_vocab))


def test_sentencepiece_vocabulary_model_matches_llama_cpp(make_model: ModelFactory) -> None:
    path = make_model("llama", "small", "Q4_K_M", vocab="spm")
    with Model.open(path, n_ctx=N_CTX) as m:
        n_vocab = m.config.n_vocab
    _compare("llama Q4_K_M small spm", path, _prompt(n_vocab))


#: llama.cpp file types written by llama.cpp's own quantiser (from an F32 model; its mixtures,
#: as in files people download) that need no importance matrix.
LLAMA_QUANTISED = ["Q3_K_M", "IQ4_XS", "IQ3_S", "TQ2_0"]


@pytest.mark.parametrize("ftype", LLAMA_QUANTISED)
def test_types_from_llama_cpp_s_quantiser_match_llama_cpp(make_model: ModelFactory,
                                                          tmp_path: Path, ftype: str) -> None:
    import llama_cpp as lc

    source = make_model("qwen2", "small", "F32")
    out = tmp_path / f"{ftype}.gguf"
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    assert lc.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    with Model.open(out, n_ctx=N_CTX) as m:
        n_vocab = m.config.n_vocab
        types = {t.qtype.name for t in m.file.tensors.values()}
    assert len(types - {"F32", "F16", "Q8_0", "Q6_K", "Q5_0", "Q4_K", "Q5_K"}) >= 1, types
    _compare(f"qwen2 {ftype} small (llama.cpp's quantiser)", out, _prompt(n_vocab))


#: Every weight type ggml runs that no file type above covers, written with ggml's own
#: quantiser (an importance matrix of ones for the types that require one): every matrix of an
#: F32 model converted to the type, norms kept F32.
GGML_QUANTISED = [t for t in SUPPORTED_TYPES if t not in (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)]


def _ggml_quantised(source: Path, dst: Path, qtype: Q) -> Path:
    from gguf_edit import rewrite

    g = ggml.load()
    ones = np.ones(4096, np.float32)

    def convert(t: gguf.ReaderTensor) -> tuple[np.ndarray, Q] | None:
        if len(t.shape) != 2:
            return None
        cols, rows = (int(d) for d in t.shape)
        values = np.ascontiguousarray(np.asarray(t.data, np.float32).reshape(rows, cols))
        out = np.empty((rows, g.ggml_row_size(int(qtype), cols)), np.uint8)
        imatrix = ones.ctypes.data if g.ggml_quantize_requires_imatrix(int(qtype)) else None
        g.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, cols,
                              imatrix)
        return out, qtype

    return rewrite(source, dst, transform=convert)


@pytest.mark.parametrize("qtype", GGML_QUANTISED, ids=lambda q: q.name)
def test_every_other_ggml_weight_type_matches_llama_cpp(make_model: ModelFactory, tmp_path: Path,
                                                        qtype: Q) -> None:
    path = _ggml_quantised(make_model("llama", "tiny", "F32"), tmp_path / "q.gguf", qtype)
    with Model.open(path, n_ctx=N_CTX) as m:
        n_vocab = m.config.n_vocab
        assert m.file.tensor("blk.0.ffn_down.weight").qtype == qtype
    _compare(f"llama {qtype.name} tiny (ggml's quantiser)", path, _prompt(n_vocab))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_optional_biases_match_llama_cpp(make_model: ModelFactory, tmp_path: Path,
                                         arch: str) -> None:
    """The tensors an architecture's files may carry beyond the required ones (llama: a bias on
    every projection; qwen2: on the output too) are added where llama.cpp adds them (they used
    to load and be ignored)."""
    from gguf_edit import rewrite

    source = make_model(arch, "small", "Q8_0")
    rng = np.random.default_rng(5)
    with Model.open(source, n_ctx=N_CTX) as m:
        c = m.config
    if arch == "llama":
        sizes = {"attn_q.bias": c.n_head * c.head_dim, "attn_k.bias": c.n_embd_kv,
                 "attn_v.bias": c.n_embd_kv, "attn_output.bias": c.n_embd,
                 "ffn_up.bias": c.n_ff, "ffn_gate.bias": c.n_ff, "ffn_down.bias": c.n_embd}
        extra = {f"blk.{i}.{name}": rng.normal(0, 0.05, size) for i in range(c.n_layer)
                 for name, size in sizes.items()}
    else:  # its attention biases are in every qwen2 file already
        extra = {"output.bias": rng.normal(0, 0.5, c.n_vocab)}
    path = rewrite(source, tmp_path / "biased.gguf", add=extra)
    _compare(f"{arch} Q8_0 small, optional biases", path, _prompt(c.n_vocab))


#: prose, code, multilingual text, and a conversation in the model's chat template
SMOLLM2_PROMPTS = {
    "prose": "The old lighthouse keeper climbed the stairs every evening, and",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "multilingual": "Bonjour! Wie geht es dir? 今日はいい天気ですね。Привет,",
    "chat": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Turn on the kitchen lights, please.<|im_end|>\n<|im_start|>assistant\n",
}


#: the same for Gemma 3 (its own turn markers; the 270M file carries no template)
GEMMA3_PROMPTS = {**{k: v for k, v in SMOLLM2_PROMPTS.items() if k != "chat"},
                  "chat": "<start_of_turn>user\nYou are a helpful assistant.\n\nTurn on the "
                          "kitchen lights, please.<end_of_turn>\n<start_of_turn>model\n"}


@pytest.mark.parametrize("kind", list(GEMMA3_PROMPTS))
def test_gemma3_270m_matches_llama_cpp(kind: str) -> None:
    """The real Gemma 3 270M (sliding-window layers, GeGLU, post-norms, scaled embeddings)."""
    path = gemma3_270m()
    with Model.open(path, n_ctx=N_CTX) as m:
        tok = Tokenizer.from_model_file(m.file)
        ids = tok.encode(GEMMA3_PROMPTS[kind], add_special=True, parse_special=kind == "chat")
    _compare(f"Gemma 3 270M {kind}", path, ids)


@pytest.mark.parametrize("kind", list(SMOLLM2_PROMPTS))
def test_smollm2_matches_llama_cpp(kind: str) -> None:
    path = default_model()
    with Model.open(path, n_ctx=N_CTX) as m:
        tok = Tokenizer.from_model_file(m.file)
        ids = tok.encode(SMOLLM2_PROMPTS[kind], add_special=kind != "chat",
                         parse_special=kind == "chat")
    _compare(f"SmolLM2 {kind}", path, ids)


@pytest.mark.parametrize(("arch", "quant"), [("llama", "Q4_K_M"), ("qwen3moe", "Q4_K_M"),
                                          ("gpt-oss", "MXFP4_MOE")])
def test_repacked_matrices_match_llama_cpp_s(make_model: ModelFactory, arch: str,
                                             quant: str) -> None:
    """With repacking, decode steps multiply with the repacked matrices, as llama.cpp does with
    its default settings; fed one token at a time, both engines use them for every step, and
    their logits are identical again. (The repacked kernels round the activations otherwise
    than the file layout's: on these random networks the two differ by up to 2 % of the
    largest logit, in llama.cpp alike, so the file-layout results are no reference here.) A
    mixture's expert tensors are repacked too, as llama.cpp does: with them left in the file's
    layout the two engines differed by 7 %. gpt-oss's MXFP4 experts are repacked alike."""
    path = make_model(arch, "small", quant)
    with Model.open(path, n_ctx=N_CTX, repack=True) as m:
        tokens = _prompt(m.config.n_vocab)[:16]
        ours = [m.forward([t], session="s") for t in tokens]
        assert m.repacked_bytes > 0  # its Q4_K and Q6_K (MXFP4, Q8_0) matrices were repacked
        for _ in range(GEN):
            tokens.append(int(np.argmax(ours[-1])))
            ours.append(m.forward([tokens[-1]], session="s"))
    with LlamaCpp(path, n_ctx=N_CTX, repack=True) as ref:
        theirs = [ref.eval([t]) for t in tokens]
    worst = max(float(np.abs(a - b).max() / np.abs(b).max())
                for a, b in zip(ours, theirs, strict=True))
    _RESULTS[f"{arch} {quant} small, repacked, one token a step"] = CaseResult(
        worst, all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)),
        [int(np.argmax(x)) for x in ours] == [int(np.argmax(x)) for x in theirs])
    assert worst <= RELATIVE, worst


def summary_lines() -> list[str]:
    """The measured table of the cases that ran (printed by conftest's terminal summary)."""
    if not _RESULTS:
        return []
    lines = [f"{'case':48}{'worst rel':>11}  identical  greedy {GEN}"]
    for name, r in _RESULTS.items():
        lines.append(f"{name:48}{r.worst:11.2e}  {'yes' if r.identical else 'no':9}  "
                     f"{'equal' if r.tokens_equal else 'DIFFER'}")
    same = sum(r.identical for r in _RESULTS.values())
    lines.append(f"bit-identical logits in {same} of {len(_RESULTS)} cases")
    return lines
