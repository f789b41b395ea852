"""Tests for prima_node.synth.vocab: synthetic but real tokenizer vocabularies.

The llama.cpp checks need llama-cpp-python in the environment; without it they fail
(on purpose: they are not skipped).
"""

# Test strings are multilingual on purpose.
# ruff: noqa: RUF001

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from prima_node.synth.vocab import (
    SPM_SPACE,
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_UNUSED,
    TOKEN_TYPE_USER_DEFINED,
    SyntheticVocab,
    _special_looking,
    build_corpus,
    build_vocab,
    bytes_to_unicode,
)

REQUIRED = [("bpe", "llama3"), ("bpe", "qwen"), ("spm", "llama2")]
OPTIONAL = [("spm", "llama3"), ("spm", "qwen"), ("bpe", "llama2")]
ALL_COMBOS = REQUIRED + OPTIONAL
SIZES = [1000, 2048, 8192, 32000]  # 2048 / 8192 / 32000: the tiny, small and 1b presets
VALID_TYPES = {
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_USER_DEFINED,
    TOKEN_TYPE_UNUSED,
    TOKEN_TYPE_BYTE,
}


def _digest(v: SyntheticVocab) -> str:
    payload = [
        v.kind, v.tokens, v.token_types, v.scores, v.merges, v.pre, v.bos_id, v.eos_id,
        v.eot_id, v.pad_id, v.unk_id, v.add_bos, v.add_eos, v.add_space_prefix,
        v.chat_template,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Pure-Python checks
# --------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_varied() -> None:
    corpus = build_corpus()
    text = "".join(corpus)
    assert 500_000 <= len(text) <= 2_000_000
    for needle in (
        "the ",
        "don't",
        "café",
        "你好",
        "こんにちは",
        "안녕",
        "👍",
        "def ",
        "{\n",
        "    ",
        "\t",
        "\n\n",
        "2024",
        "<|im_start|>",
        "[INST]",
        "привет",
    ):
        assert needle in text, needle
    build_corpus.cache_clear()
    assert build_corpus() == corpus


@pytest.mark.parametrize(("kind", "style"), ALL_COMBOS)
@pytest.mark.parametrize("size", SIZES)
def test_sizes_uniqueness_and_types(kind: str, style: str, size: int) -> None:
    t0 = time.perf_counter()
    v = build_vocab(kind, size, style=style)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"building took {elapsed:.1f}s"
    assert v.kind == kind
    assert v.n_vocab == size == len(v.tokens) == len(v.token_types)
    assert len(set(v.tokens)) == size
    assert all(v.tokens), "empty token"
    assert set(v.token_types) <= VALID_TYPES
    # No learned token looks like a special token to llama.cpp's name-based detection.
    for t, ty in zip(v.tokens, v.token_types, strict=True):
        if ty == TOKEN_TYPE_NORMAL:
            assert not _special_looking(t), t
    # The presets are all reachable by training: no filler tokens.
    assert TOKEN_TYPE_UNUSED not in v.token_types
    for tid in (v.bos_id, v.eos_id, v.eot_id, v.pad_id, v.unk_id):
        assert tid is None or 0 <= tid < size
    assert v.add_eos is False
    if kind == "bpe":
        assert v.scores is None
        assert v.merges is not None
        assert v.pre in ("llama-bpe", "qwen2")
    else:
        assert v.merges is None
        assert v.pre is None
        assert v.scores is not None and len(v.scores) == size
        assert v.add_space_prefix is True


@pytest.mark.parametrize(("kind", "style"), [("bpe", "llama3"), ("spm", "llama2")])
def test_deterministic_across_processes(kind: str, style: str) -> None:
    here = _digest(build_vocab(kind, 1000, style=style))
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('t', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        f"print(mod._digest(mod.build_vocab({kind!r}, 1000, style={style!r})))\n"
    )
    root = Path(__file__).resolve().parents[1]
    for seed in ("1", "987"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code, __file__],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            timeout=300,
        )
        assert out.stdout.strip() == here


def test_same_arguments_same_object_contents() -> None:
    a = build_vocab("bpe", 2048, style="qwen")
    b = build_vocab("bpe", 2048, style="qwen")
    assert a == b
    assert a.tokens is not b.tokens  # callers may mutate their copy
    a.tokens.append("x")
    assert build_vocab("bpe", 2048, style="qwen").n_vocab == 2048


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_vocab("wordpiece", 2048, style="llama3")
    with pytest.raises(ValueError):
        build_vocab("bpe", 2048, style="gpt5")
    with pytest.raises(ValueError):
        build_vocab("bpe", 200, style="llama3")
    with pytest.raises(ValueError):
        build_vocab("spm", 300, style="llama2")


def test_llama3_special_ids() -> None:
    v = build_vocab("bpe", 8192, style="llama3")
    assert v.pre == "llama-bpe"
    assert v.add_bos is True
    n = v.n_vocab
    # Llama 3 order: the specials close the vocabulary, <|begin_of_text|> first.
    assert v.tokens[n - 16 : n - 5] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]  # fmt: skip
    assert v.bos_id == n - 16
    assert v.tokens[v.eos_id] == "<|eot_id|>"
    assert v.eot_id == v.eos_id
    assert v.pad_id is None and v.unk_id is None
    assert all(t == TOKEN_TYPE_CONTROL for t in v.token_types[n - 16 :])
    assert all(t == TOKEN_TYPE_NORMAL for t in v.token_types[: n - 16])


def test_qwen_special_ids() -> None:
    v = build_vocab("bpe", 8192, style="qwen")
    assert v.pre == "qwen2"
    assert v.add_bos is False
    assert v.tokens[v.bos_id] == "<|endoftext|>"
    assert v.pad_id is not None and v.tokens[v.pad_id] == "<|endoftext|>"
    assert v.tokens[v.eos_id] == "<|im_end|>"
    assert v.eot_id == v.eos_id
    assert v.tokens[v.bos_id + 1] == "<|im_start|>"
    types = dict(zip(v.tokens, v.token_types, strict=True))
    # As in Qwen 2.5 GGUFs: <tool_call> / </tool_call> are user-defined, not control.
    assert types["<tool_call>"] == TOKEN_TYPE_USER_DEFINED
    assert types["</tool_call>"] == TOKEN_TYPE_USER_DEFINED
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|file_sep|>"):
        assert types[t] == TOKEN_TYPE_CONTROL


def test_llama2_special_ids() -> None:
    v = build_vocab("spm", 8192, style="llama2")
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert v.token_types[:3] == [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
    assert (v.unk_id, v.bos_id, v.eos_id, v.eot_id, v.pad_id) == (0, 1, 2, None, None)
    assert v.add_bos is True and v.add_space_prefix is True
    assert v.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert v.token_types[3:259] == [TOKEN_TYPE_BYTE] * 256
    assert all(t == TOKEN_TYPE_NORMAL for t in v.token_types[259:])


@pytest.mark.parametrize("style", ["llama3", "qwen", "llama2"])
def test_bpe_structure(style: str) -> None:
    v = build_vocab("bpe", 8192, style=style)
    vocab = set(v.tokens)
    assert set(bytes_to_unicode().values()) <= vocab  # all 256 byte-level characters
    assert v.merges is not None
    merged: list[str] = []
    for i, m in enumerate(v.merges):
        parts = m.split(" ")
        assert len(parts) == 2, m
        a, b = parts
        assert a in vocab and b in vocab and a + b in vocab, (i, m)
        merged.append(a + b)
    # Every learned token is produced by a merge, in id order of first appearance.
    first_seen = list(dict.fromkeys(merged))
    learned = [
        t
        for t, ty in zip(v.tokens, v.token_types, strict=True)
        if ty == TOKEN_TYPE_NORMAL and len(t) > 1
    ]
    assert learned == first_seen


@pytest.mark.parametrize("style", ["llama2", "qwen", "llama3"])
def test_spm_structure(style: str) -> None:
    v = build_vocab("spm", 8192, style=style)
    assert v.scores is not None
    vocab = set(v.tokens)
    for b in range(256):
        assert f"<0x{b:02X}>" in vocab
    assert SPM_SPACE in vocab
    normal = [
        (t, s)
        for t, s, ty in zip(v.tokens, v.scores, v.token_types, strict=True)
        if ty == TOKEN_TYPE_NORMAL
    ]
    scores = [s for _, s in normal]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)  # no ties: merge order is unambiguous
    assert scores[0] == 0.0
    # Merged pieces first (score = -rank), single characters last.
    n_multi = sum(1 for t, _ in normal if len(t) > 1)
    assert all(len(t) > 1 for t, _ in normal[:n_multi])
    assert all(len(t) == 1 for t, _ in normal[n_multi:])
    # "▁" only ever starts a piece (words are split before each space).
    assert all(SPM_SPACE not in t[1:] for t, _ in normal)
    # No special / byte token can be assembled from two learned pieces.
    specials = [t for t, ty in zip(v.tokens, v.token_types, strict=True) if ty != TOKEN_TYPE_NORMAL]
    for text in specials:
        for i in range(1, len(text)):
            assert not (text[:i] in vocab and text[i:] in vocab), (text, i)


def test_chat_templates_differ_per_style() -> None:
    l3 = build_vocab("bpe", 2048, style="llama3").chat_template
    qw = build_vocab("bpe", 2048, style="qwen").chat_template
    l2 = build_vocab("spm", 2048, style="llama2").chat_template
    assert "<|start_header_id|>" in l3 and "tool_calls" in l3 and "<|python_tag|>" in l3
    assert "<|im_start|>" in qw and "<tool_call>" in qw and "<tool_response>" in qw
    assert "[INST]" in l2 and "<<SYS>>" in l2


# --------------------------------------------------------------------------------------
# GGUF writing
# --------------------------------------------------------------------------------------

N_EMBD = 64
N_FF = 128


def write_tiny_llama(path: Path, v: SyntheticVocab, seed: int = 0) -> None:
    """A minimal (1 block, 64 wide) llama-architecture model around ``v``."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("synthetic-vocab-test")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(N_EMBD // 2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    v.write_to(w)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones: np.ndarray[Any, np.dtype[np.float32]] = np.ones(N_EMBD, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(v.n_vocab, N_EMBD))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("blk.0.attn_norm.weight", ones)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", rand(N_EMBD, N_EMBD))
    w.add_tensor("blk.0.ffn_norm.weight", ones)
    w.add_tensor("blk.0.ffn_gate.weight", rand(N_FF, N_EMBD))
    w.add_tensor("blk.0.ffn_up.weight", rand(N_FF, N_EMBD))
    w.add_tensor("blk.0.ffn_down.weight", rand(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


@pytest.mark.parametrize(("kind", "style"), REQUIRED)
def test_gguf_roundtrip(tmp_path: Path, kind: str, style: str) -> None:
    v = build_vocab(kind, 2048, style=style)
    path = tmp_path / "m.gguf"
    write_tiny_llama(path, v)
    r = gguf.GGUFReader(str(path))
    assert _field(r, "tokenizer.ggml.model") == ("gpt2" if kind == "bpe" else "llama")
    assert _field(r, "tokenizer.ggml.tokens") == v.tokens
    assert _field(r, "tokenizer.ggml.token_type") == v.token_types
    assert _field(r, "tokenizer.ggml.bos_token_id") == v.bos_id
    assert _field(r, "tokenizer.ggml.eos_token_id") == v.eos_id
    assert _field(r, "tokenizer.ggml.add_bos_token") == v.add_bos
    assert _field(r, "tokenizer.ggml.add_eos_token") is False
    assert _field(r, "tokenizer.chat_template") == v.chat_template
    if kind == "bpe":
        assert _field(r, "tokenizer.ggml.pre") == v.pre
        assert _field(r, "tokenizer.ggml.merges") == v.merges
        assert r.get_field("tokenizer.ggml.scores") is None
        assert _field(r, "tokenizer.ggml.eot_token_id") == v.eot_id
    else:
        assert _field(r, "tokenizer.ggml.scores") == pytest.approx(v.scores)
        assert _field(r, "tokenizer.ggml.add_space_prefix") is True
        assert _field(r, "tokenizer.ggml.unknown_token_id") == 0
        assert r.get_field("tokenizer.ggml.merges") is None
    # Byte-identical output for the same arguments.
    path2 = tmp_path / "m2.gguf"
    write_tiny_llama(path2, build_vocab(kind, 2048, style=style))
    assert path.read_bytes() == path2.read_bytes()


# --------------------------------------------------------------------------------------
# Chat templates, rendered the way transformers renders them
# --------------------------------------------------------------------------------------


def _render(template: str, **kwargs: Any) -> str:
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**kwargs)


CONVO = [
    {"role": "system", "content": "You are a bot."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]  # fmt: skip
TOOL_CONVO = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]},
    {"role": "tool", "content": '{"temp": 20}'},
]  # fmt: skip


def test_llama3_chat_template_renders() -> None:
    v = build_vocab("bpe", 2048, style="llama3")
    out = _render(
        v.chat_template,
        messages=CONVO,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        add_generation_prompt=True,
    )
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a bot.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    out = _render(
        v.chat_template,
        messages=TOOL_CONVO,
        tools=TOOLS,
        bos_token="<|begin_of_text|>",
        add_generation_prompt=True,
    )
    assert "Environment: ipython\n" in out
    assert "Given the following functions" in out and '"name": "get_weather"' in out
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    ) in out
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp\\": 20}"<|eot_id|>' in out


def test_qwen_chat_template_renders() -> None:
    v = build_vocab("bpe", 2048, style="qwen")
    out = _render(v.chat_template, messages=CONVO, add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nYou are a bot.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    out = _render(v.chat_template, messages=CONVO[1:2], add_generation_prompt=False)
    assert out == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    out = _render(v.chat_template, messages=TOOL_CONVO, tools=TOOLS, add_generation_prompt=True)
    assert "# Tools\n\nYou may call one or more functions" in out
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in out
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in out
    assert (
        '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    ) in out


def test_llama2_chat_template_renders() -> None:
    v = build_vocab("spm", 2048, style="llama2")
    out = _render(v.chat_template, messages=CONVO, bos_token="<s>", eos_token="</s>")
    assert out == (
        "<s>[INST] <<SYS>>\nYou are a bot.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"
    )
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError):
        _render(v.chat_template, messages=[CONVO[2]], bos_token="<s>", eos_token="</s>")


# --------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python) loads the files and tokenizes with them
# --------------------------------------------------------------------------------------

TEXTS: list[str] = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "multiple    spaces   inside   words",
    "\ttab\tseparated\tvalues",
    "line one\nline two\n\nline four",
    "windows\r\nline endings\r\n",
    "\n\n\n",
    " ",
    "a",
    "I don't think it's what we'll do; they're sure you've seen what I'd done.",
    "DON'T SHOUT, IT'S RUDE! We'Ll See.",
    "1234567890 12 345 6789",
    "pi is 3.14159, e is 2.71828 and 1e-9 is small",
    "Prices: $1,234.56, €99.99, £5; 100% sure on 2024-06-01 at 13:45.",
    "0xDEADBEEF 0b1010 v1.2.3",
    "café naïve résumé déjà vu façade",
    "Straße über Größe Mädchen",
    "mañana el niño comió jalapeños",
    "Dvořák żółć Kraków Ångström",
    "Ελλάδα γεια σου, привет мир!",
    "مرحبا بالعالم שלום עולם नमस्ते",
    "你好世界",
    "今天天气很好。我们去公园吧！",
    "日本語のテキスト、こんにちは世界！",
    "안녕하세요 세계",
    "😀👍🎉",
    "family: 👨\u200d👩\u200d👧\u200d👦 and coder 👩🏽\u200d💻 🏳️\u200d🌈",
    "flags 🇺🇸🇯🇵🇫🇷",
    "e\u0301 (combining) vs é, ﬁ ligature, Ｆｕｌｌ ｗｉｄｔｈ",
    "zero\u200bwidth and\u00a0nbsp",
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    '<div class="x">Hello &amp; bye</div>',
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "        deeply indented\n            more\n",
    "end with newline\n",
    "~!@#$%^&*()_+-=[]{}|;':\",./<>?`",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nHi [/INST] Hello </s>",
    "text<|endoftext|>more text",
    "<unk> <s> </s> <pad>",
    "<|not_a_special_token|> <|eot_id",
    "",
]

# ggml_log_level in the ggml bundled with llama-cpp-python 0.3.x.
_GGML_LOG_WARN = 3
_GGML_LOG_ERROR = 4


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - environment problem
        pytest.fail(f"llama-cpp-python is required for this test: {e}")
    return llama_cpp


class _Loaded:
    def __init__(self, llm: Any, warnings: list[str]) -> None:
        self.llm = llm
        self.warnings = warnings
        self.vocab = llm._model.vocab


def _load(path: Path) -> _Loaded:
    llama_cpp = _llama_cpp()
    import llama_cpp._logger as lc_logger

    messages: list[str] = []

    @llama_cpp.llama_log_callback
    def cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR):
            messages.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    finally:
        llama_cpp.llama_log_set(lc_logger.llama_log_callback, ctypes.c_void_p(0))
    # llama-cpp-python builds a context even for vocab_only models, and the context
    # complains that n_ctx_train is 0 (hparams are not read in vocab_only mode).
    warnings = [m for m in messages if not m.startswith("llama_context:")]
    return _Loaded(llm, warnings)


def _tokenize(loaded: _Loaded, text: str, *, special: bool) -> list[int]:
    toks = loaded.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
    return [int(t) for t in toks]


def _detokenize(loaded: _Loaded, tokens: list[int], *, special: bool) -> str:
    llama_cpp = _llama_cpp()
    buf = ctypes.create_string_buffer(1024)
    out = b""
    for t in tokens:
        n = llama_cpp.llama_token_to_piece(loaded.vocab, t, buf, len(buf), 0, special)
        assert 0 <= n <= len(buf)
        out += buf.raw[:n]
    return out.decode("utf-8")


def _fragments(text: str, specials: list[str]) -> list[tuple[str, bool]]:
    """Split like llama.cpp's tokenizer_st_partition: longest special texts first."""
    frags: list[tuple[str, bool]] = [(text, False)] if text else []
    for sp in sorted(specials, key=len, reverse=True):
        nxt: list[tuple[str, bool]] = []
        for frag, is_special in frags:
            if is_special or sp not in frag:
                nxt.append((frag, is_special))
                continue
            parts = frag.split(sp)
            for i, p in enumerate(parts):
                if i:
                    nxt.append((sp, True))
                if p:
                    nxt.append((p, False))
        frags = nxt
    return frags


def _expected_detok(v: SyntheticVocab, text: str, *, special: bool) -> str:
    """What concatenating the pieces of llama.cpp's tokenization gives back."""
    parsed = [
        t
        for t, ty in zip(v.tokens, v.token_types, strict=True)
        if ty == TOKEN_TYPE_USER_DEFINED
        or (special and ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN))
    ]
    if v.kind == "bpe":
        return text
    # SPM: every raw-text fragment at the start or after a special token gets a space.
    out = []
    prev_special = True
    for frag, is_special in _fragments(text, parsed):
        if is_special:
            out.append(frag)
        else:
            out.append((" " if prev_special else "") + frag)
        prev_special = is_special
    return "".join(out)


LLAMA_CASES = [(k, s, 2048) for k, s in ALL_COMBOS] + [(k, s, 32000) for k, s in REQUIRED]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth_vocab")


@pytest.mark.parametrize(("kind", "style", "size"), LLAMA_CASES)
def test_llama_cpp_loads_and_round_trips(gguf_dir: Path, kind: str, style: str, size: int) -> None:
    llama_cpp = _llama_cpp()
    v = build_vocab(kind, size, style=style)
    path = gguf_dir / f"{kind}-{style}-{size}.gguf"
    write_tiny_llama(path, v)
    loaded = _load(path)
    assert loaded.warnings == [], "".join(loaded.warnings)
    vocab = loaded.vocab

    assert llama_cpp.llama_vocab_n_tokens(vocab) == v.n_vocab
    assert llama_cpp.llama_vocab_type(vocab) == (2 if kind == "bpe" else 1)  # BPE / SPM
    assert llama_cpp.llama_vocab_bos(vocab) == v.bos_id
    assert llama_cpp.llama_vocab_eos(vocab) == v.eos_id
    assert llama_cpp.llama_vocab_eot(vocab) == (-1 if v.eot_id is None else v.eot_id)
    assert llama_cpp.llama_vocab_pad(vocab) == (-1 if v.pad_id is None else v.pad_id)
    assert bool(llama_cpp.llama_vocab_get_add_bos(vocab)) == v.add_bos
    assert bool(llama_cpp.llama_vocab_get_add_eos(vocab)) is False
    assert llama_cpp.llama_vocab_is_eog(vocab, v.eos_id)
    for tid in range(v.n_vocab):
        assert llama_cpp.llama_vocab_get_text(vocab, tid) == v.tokens[tid].encode("utf-8")
        if v.scores is not None:
            assert llama_cpp.llama_vocab_get_score(vocab, tid) == pytest.approx(v.scores[tid])

    control_ids = {
        i for i, ty in enumerate(v.token_types) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)
    }
    for text in TEXTS:
        for special in (False, True):
            toks = _tokenize(loaded, text, special=special)
            assert all(0 <= t < v.n_vocab for t in toks)
            if not special:
                assert not control_ids.intersection(toks), (text, toks)
            got = _detokenize(loaded, toks, special=special)
            assert got == _expected_detok(v, text, special=special), (text, special, toks)

    # Special-token text is parsed to the special token when asked to.
    for tid, (text, ty) in enumerate(zip(v.tokens, v.token_types, strict=True)):
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN):
            assert _tokenize(loaded, text, special=True) == [tid], text
            plain = _tokenize(loaded, text, special=False)
            if ty == TOKEN_TYPE_USER_DEFINED:
                assert plain == [tid], text  # user-defined tokens are always parsed
            else:
                assert tid not in plain, text

    # add_bos is honoured by llama.cpp.
    with_bos = loaded.llm.tokenize(b"Hello", add_bos=True, special=False)
    assert (with_bos[0] == v.bos_id) == v.add_bos


@pytest.mark.parametrize(("kind", "style"), REQUIRED)
def test_llama_cpp_tokenizes_corpus_without_byte_fallback_for_common_text(
    gguf_dir: Path, kind: str, style: str
) -> None:
    """Plain English tokenizes into learned multi-character tokens, not bytes."""
    v = build_vocab(kind, 8192, style=style)
    path = gguf_dir / f"common-{kind}-{style}.gguf"
    write_tiny_llama(path, v)
    loaded = _load(path)
    text = "the people in this world would like to know what time it is"
    toks = _tokenize(loaded, text, special=False)
    assert len(toks) <= len(text.split()) + 3
    assert all(v.token_types[t] == TOKEN_TYPE_NORMAL for t in toks)
