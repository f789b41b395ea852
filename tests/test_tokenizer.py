"""The tokenizer against llama.cpp itself: same ids, same text, same special tokens.

Every check compares with llama.cpp (llama-cpp-python, ``vocab_only=True``) on the same GGUF
file, for the corpus in ``tokenizer_corpus.py``. The vocabularies are the project's synthetic
ones (real BPE / SentencePiece merges learned on a generated corpus), written as vocabulary-only
GGUF files: Llama 3 (``gpt2`` + ``llama-bpe``), Qwen 2.5 (``gpt2`` + ``qwen2``, with
user-defined ``<tool_call>`` tokens), the same Llama 3 vocabulary under ``pre = "default"``,
and Llama 2 (``llama``, SentencePiece with byte fallback). A failing case prints the string and
both id lists.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf

# The reference. scripts/setup always installs it: a missing one must fail, never skip quietly.
import llama_cpp
import pytest
from tokenizer_corpus import SPECIAL_TEXTS, categories, corpus

from prima_node.errors import ModelLoadError
from prima_node.synth.vocab import build_vocab, bytes_to_unicode
from prima_node.text.tokenizer import Tokenizer, supported_pre_tokenizers

VT = gguf.GGUFValueType
MODES = [(add, parse) for add in (False, True) for parse in (False, True)]
ATTR_CONTROL, ATTR_UNKNOWN, ATTR_USER_DEFINED = 1 << 3, 1 << 0, 1 << 4


# -- llama.cpp side ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _quiet_llama_cpp() -> Iterator[None]:
    """llama.cpp logs a warning per doubled BOS; keep the test output readable."""
    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    from llama_cpp import _logger

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    yield
    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class Ref:
    """llama.cpp's vocabulary for one file."""

    def __init__(self, path: Path) -> None:
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def encode(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special,
                                      special=parse_special))

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        size = 64 * len(ids) + 64
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, size, remove_special,
                                       unparse_special)
        assert n >= 0, "buffer too small for llama_detokenize"
        return buf.raw[:n]

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(512)  # Llama.detokenize breaks on pieces > 32 bytes
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 512, 0, special)
        assert n >= 0
        return buf.raw[:n]

    def special_ids(self) -> dict[str, int | None]:
        def get(fn: Callable[[Any], int]) -> int | None:
            v = fn(self.vocab)
            return None if v < 0 else v

        return {"bos": get(llama_cpp.llama_vocab_bos), "eos": get(llama_cpp.llama_vocab_eos),
                "eot": get(llama_cpp.llama_vocab_eot), "pad": get(llama_cpp.llama_vocab_pad)}


# -- vocabulary files ----------------------------------------------------------------------------


def _write_gguf(path: Path, kv: dict[str, tuple[Any, VT, VT | None]], arch: str) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for key, (value, vtype, sub) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def _infer(value: Any) -> tuple[Any, VT, VT | None]:
    if isinstance(value, bool):
        return value, VT.BOOL, None
    if isinstance(value, int):
        return value, VT.UINT32, None
    if isinstance(value, str):
        return value, VT.STRING, None
    first = value[0]
    sub = VT.STRING if isinstance(first, str) else VT.FLOAT32 if isinstance(first, float) \
        else VT.INT32
    return list(value), VT.ARRAY, sub


def read_kv(path: Path) -> dict[str, tuple[Any, VT, VT | None]]:
    """Every metadata key of ``path`` with its types (a fresh dict, cached underneath)."""
    return dict(_read_kv(path))


@functools.cache
def _read_kv(path: Path) -> dict[str, tuple[Any, VT, VT | None]]:
    reader = gguf.GGUFReader(path)
    out: dict[str, tuple[Any, VT, VT | None]] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        out[key] = (field.contents(), vtype, field.types[1] if vtype == VT.ARRAY else None)
    return out


def variant(base: Path, path: Path, **changes: Any) -> Path:
    """A copy of ``base``'s metadata with keys changed (``None`` removes one). Keyword names
    use ``__`` for the dots of the GGUF key."""
    kv = read_kv(base)
    for name, value in changes.items():
        key = name.replace("__", ".")
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = _infer(value)
    return _write_gguf(path, kv, "llama")


def vocab_file(path: Path, kind: str, size: int, style: str, **replace: Any) -> Path:
    """A vocabulary-only GGUF of the project's synthetic vocabulary (no tensors needed)."""
    voc = build_vocab(kind, size, style=style)
    if replace:
        voc = dataclasses.replace(voc, **replace)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"synthetic {kind} {style}")
    voc.write_to(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


VOCABS = {
    "llama-bpe": ("bpe", 8192, "llama3", {}),
    "qwen2": ("bpe", 8192, "qwen", {}),
    "default": ("bpe", 8192, "llama3", {"pre": "default"}),
    "spm": ("spm", 8192, "llama2", {}),
    "harmony": ("bpe", 8192, "gpt-oss", {}),  # o200k_harmony's specials, gpt-4o pre-tokenizer
    "llama-bpe-tiny": ("bpe", 2048, "llama3", {}),
    "spm-tiny": ("spm", 2048, "llama2", {}),
}
MAIN = ["llama-bpe", "qwen2", "default", "spm", "harmony"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocabs")
    return {name: vocab_file(root / f"{name}.gguf", kind, size, style, **rep)
            for name, (kind, size, style, rep) in VOCABS.items()}


Ours = Callable[[str], Tokenizer]
Theirs = Callable[[str], Ref]


@pytest.fixture(scope="module")
def ours(files: dict[str, Path]) -> Ours:
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = Tokenizer.open(files[name])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def theirs(files: dict[str, Path]) -> Theirs:
    cache: dict[str, Ref] = {}

    def get(name: str) -> Ref:
        if name not in cache:
            cache[name] = Ref(files[name])
        return cache[name]

    return get


def _show(ids: list[int], tok: Tokenizer) -> str:
    return f"{ids[:40]}{' ...' if len(ids) > 40 else ''} {[tok.token_text(i) for i in ids[:16]]}"


# -- encoding parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*MAIN, "llama-bpe-tiny", "spm-tiny"])
def test_encode_matches_llama_cpp(name: str, ours: Ours, theirs: Theirs) -> None:
    tok, ref = ours(name), theirs(name)
    texts = corpus()
    assert len(texts) >= 1000
    failures: list[str] = []
    for text in texts:
        for add, parse in MODES:
            ours = tok.encode(text, add_special=add, parse_special=parse)
            theirs = ref.encode(text, add, parse)
            if ours != theirs:
                failures.append(f"add_special={add} parse_special={parse} text={text!r}\n"
                                f"   ours:      {_show(ours, tok)}\n"
                                f"   llama.cpp: {_show(theirs, tok)}")
    summary = f"{name}: {len(texts)} strings x {len(MODES)} modes, {len(failures)} differ"
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures[:20])


def test_corpus_covers_every_category() -> None:
    cats = categories()
    for name in ("prose", "accented", "cjk", "emoji", "code", "whitespace", "numbers",
                 "contractions", "special", "odd"):
        assert len(cats[name]) >= 20, name
    texts = set(corpus())
    assert "" in texts and "<|eot_id|>" in texts and "'LL" in texts and "'S" in texts
    assert any("\u200d" in t for t in texts)  # ZWJ emoji sequences
    assert all(any(s in t for t in texts) for s in SPECIAL_TEXTS)


# -- decoding parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAIN)
def test_token_pieces_match_llama_cpp(name: str, ours: Ours, theirs: Theirs) -> None:
    tok, ref = ours(name), theirs(name)
    assert tok.n_vocab == ref.n_vocab
    bad = [(i, special, tok.token_bytes(i, special=special), ref.piece(i, special))
           for i in range(tok.n_vocab) for special in (False, True)
           if tok.token_bytes(i, special=special) != ref.piece(i, special)]
    assert not bad, bad[:20]


@pytest.mark.parametrize("name", MAIN)
def test_detokenize_matches_llama_cpp(name: str, ours: Ours, theirs: Theirs) -> None:
    """decode_bytes(clean_spaces=True) is llama_detokenize, for remove/unparse_special."""
    tok, ref = ours(name), theirs(name)
    failures = []
    for text in corpus():
        for add in (False, True):
            ids = tok.encode(text, add_special=add, parse_special=True)
            for remove in (False, True):
                for unparse in (False, True):
                    ours = tok.decode_bytes(ids, special=unparse, remove_special=remove,
                                            clean_spaces=True)
                    theirs = ref.detokenize(ids, remove, unparse)
                    if ours != theirs:
                        failures.append(f"remove={remove} unparse={unparse} {text!r}\n"
                                        f"   ours:      {ours!r}\n   llama.cpp: {theirs!r}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("name", MAIN)
def test_decode_round_trips(name: str, ours: Ours) -> None:
    tok = ours(name)
    failures = []
    for text in corpus():
        ids = tok.encode(text, add_special=False)
        expected = text
        if tok.kind == "llama":
            # SentencePiece escapes spaces as U+2581 and unescapes every U+2581 on the way
            # back: text that already contains one comes back with a space (llama.cpp too).
            expected = text.replace("\u2581", " ")
        if tok.decode(ids) != expected:
            failures.append(f"{text!r} -> {tok.decode(ids)!r}")
        if tok.kind == "gpt2":
            # BOS is a control token: not rendered unless asked for
            if tok.decode(tok.encode(text)) != text:
                failures.append(f"add_special {text!r} -> {tok.decode(tok.encode(text))!r}")
            # special tokens written in the text come back as written
            ids = tok.encode(text, add_special=False, parse_special=True)
            if tok.decode(ids, special=True) != text:
                failures.append(f"parse_special {text!r} -> {tok.decode(ids, special=True)!r}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("name", MAIN)
def test_stream_equals_decode(name: str, ours: Ours) -> None:
    """Token-by-token output is always a prefix of the full text: a character split across
    tokens is held back, never emitted as U+FFFD, and the pieces add up to decode()."""
    tok = ours(name)
    for text in corpus():
        ids = tok.encode(text, add_special=True, parse_special=True)
        for special in (False, True):
            full = tok.decode(ids, special=special)
            stream = tok.stream(special=special)
            out = ""
            for i in ids:
                out += stream.feed(i)
                assert full.startswith(out), (text, ids, out)
            out += stream.flush()
            assert out == full, (text, ids)


def test_stream_holds_back_split_characters(ours: Ours) -> None:
    tok = ours("spm")
    ch = next(chr(c) for c in range(0x9FA0, 0x9FB0) if tok.token_id(chr(c)) is None)
    ids = tok.encode(ch, add_special=False)  # not a piece: three <0xNN> byte tokens
    expected = [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
    assert [tok.token_text(i) for i in ids][-3:] == expected
    stream = tok.stream()
    outputs = [stream.feed(i) for i in ids]
    assert outputs[-3:] == ["", "", ch] and "".join(outputs) == tok.decode(ids)
    stream = tok.stream()
    stream.feed(ids[-3])
    assert stream.flush() == "\ufffd"  # an unfinished character at the very end


# -- special tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAIN)
def test_plain_text_never_makes_control_tokens(name: str, ours: Ours) -> None:
    tok = ours(name)
    hidden = {i for i in range(tok.n_vocab) if tok.token_attr(i) & (ATTR_CONTROL | ATTR_UNKNOWN)}
    for text in corpus():
        assert not hidden & set(tok.encode(text, add_special=False)), text


def test_control_tokens_only_with_parse_special(ours: Ours, theirs: Theirs) -> None:
    tok, ref = ours("llama-bpe"), theirs("llama-bpe")
    eot = tok.token_id("<|eot_id|>")
    assert eot is not None and tok.is_control(eot) and tok.is_special(eot)
    text = "Hi<|eot_id|>there"
    plain = tok.encode(text, add_special=False)
    parsed = tok.encode(text, add_special=False, parse_special=True)
    assert eot not in plain and parsed.count(eot) == 1
    assert tok.decode(plain) == text and tok.decode(parsed, special=True) == text
    assert tok.decode(parsed) == "Hithere"  # control tokens are not rendered by default
    assert (plain, parsed) == (ref.encode(text, False, False), ref.encode(text, False, True))


def test_user_defined_tokens_split_without_parse_special(ours: Ours, theirs: Theirs) -> None:
    tok, ref = ours("qwen2"), theirs("qwen2")
    call, im_end = tok.token_id("<tool_call>"), tok.token_id("<|im_end|>")
    assert call is not None and im_end is not None
    assert tok.token_attr(call) & ATTR_USER_DEFINED and not tok.is_control(call)
    text = "x<tool_call>{}</tool_call><|im_end|>"
    plain = tok.encode(text, add_special=False)
    assert call in plain and im_end not in plain
    assert im_end in tok.encode(text, add_special=False, parse_special=True)
    assert tok.decode(plain) == text  # user-defined tokens are always rendered
    assert plain == ref.encode(text, False, False)


def test_spm_space_prefix_after_special_tokens(ours: Ours, theirs: Theirs) -> None:
    tok, ref = ours("spm"), theirs("spm")
    ids = tok.encode("a</s>b", add_special=False, parse_special=True)
    assert tok.token_text(ids[0]) == "\u2581a" and ids[1] == tok.eos_id
    assert tok.token_text(ids[2]).startswith("\u2581")  # llama.cpp re-adds the prefix
    assert ids == ref.encode("a</s>b", False, True)
    assert tok.decode(tok.encode("Hello")) == " Hello"  # after a kept BOS the space stays
    assert tok.decode(tok.encode("Hello", add_special=False)) == "Hello"


def _extended(base: Path, path: Path, extra: list[tuple[str, int, float]]) -> Path:
    """``base`` with tokens appended: (text, token type, score)."""
    kv = read_kv(base)
    changes: dict[str, Any] = {
        "tokenizer__ggml__tokens": list(kv["tokenizer.ggml.tokens"][0]) + [t for t, _, _ in extra],
        "tokenizer__ggml__token_type": list(kv["tokenizer.ggml.token_type"][0])
        + [ty for _, ty, _ in extra],
    }
    if "tokenizer.ggml.scores" in kv:
        changes["tokenizer__ggml__scores"] = [float(x) for x in kv["tokenizer.ggml.scores"][0]] \
            + [sc for _, _, sc in extra]
    return variant(base, path, **changes)


def _same_as_llama_cpp(path: Path, texts: list[str]) -> Tokenizer:
    tok, ref = Tokenizer.open(path), Ref(path)
    for text in texts:
        for add, parse in MODES:
            ours = tok.encode(text, add_special=add, parse_special=parse)
            assert ours == ref.encode(text, add, parse), (text, add, parse, ours)
    return tok


def test_overlapping_special_tokens(tmp_path: Path, files: dict[str, Path]) -> None:
    """llama.cpp splits out the longest special token first, wherever it is, then the shorter
    ones in what is left, so "[[x]]]" gives "[[" + "x]]]", not "[[x" + "]]]"."""
    extra = [("[[x", 4, 0.0), ("x]]]", 4, 0.0), ("<y>", 3, 0.0), ("<y><y>", 3, 0.0)]
    path = _extended(files["qwen2"], tmp_path / "overlap.gguf", extra)
    texts = ["[[x]]]", "a[[x]]]b[[x", "<y><y><y>", "x]]]<y>[[x<y><y>", "[[[x]]]]"]
    tok = _same_as_llama_cpp(path, texts)
    ids = tok.encode("[[x]]]", add_special=False)
    assert tok.token_id("x]]]") in ids and tok.token_id("[[x") not in ids


def test_ignore_merges_and_whole_word_tokens(tmp_path: Path, files: dict[str, Path]) -> None:
    """A token no merge sequence reaches: Llama 3 (ignore_merges) emits it whole, the default
    pre-tokenizer builds the word from merges."""
    g = bytes_to_unicode()[0x20]
    extra = [(f"{g}zyxwvut", 1, 0.0), ("zyxwvut", 1, 0.0), ("QQQQ", 1, 0.0)]
    texts = [" zyxwvut", "zyxwvut", "a zyxwvut, zyxwvutz QQQQ QQQQQ"]
    for base in ("llama-bpe", "default"):
        path = _extended(files[base], tmp_path / f"whole-{base}.gguf", extra)
        tok = _same_as_llama_cpp(path, texts)
        whole = tok.token_id(f"{g}zyxwvut") in tok.encode(" zyxwvut", add_special=False)
        assert whole == (base == "llama-bpe")


def test_spm_merges_through_characters_that_are_not_tokens(tmp_path: Path,
                                                            files: dict[str, Path]) -> None:
    """llama.cpp joins any two symbols whose concatenation is a token, even when a symbol is
    a character the vocabulary lacks; leftovers become byte tokens."""
    tok0 = Tokenizer.open(files["spm"])
    assert tok0.token_id("\u01c2") is None and tok0.token_id("\u01c3") is None
    extra = [("\u2581\u01c2", 1, 10.0), ("\u2581\u01c2\u01c3", 1, 11.0), ("\u01c3\u01c3", 1, 12.0)]
    path = _extended(files["spm"], tmp_path / "phantom.gguf", extra)
    texts = ["\u01c2\u01c3", "x \u01c2\u01c3 \u01c2", "\u01c3", "\u01c3\u01c3\u01c3 \u01c2\u01c2"]
    tok = _same_as_llama_cpp(path, texts)
    assert tok.encode("\u01c2\u01c3", add_special=False) == [tok.token_id("\u2581\u01c2\u01c3")]
    assert [tok.token_text(i) for i in tok.encode("\u01c3", add_special=False)] == \
        ["\u2581", "<0xC7>", "<0x83>"]


def test_rstrip_tokens_of_phi3(tmp_path: Path, files: dict[str, Path]) -> None:
    """llama.cpp marks Phi-3's special tokens RSTRIP (by model name): spaces after them go.
    (It also insists on an <|endoftext|> token in such a vocabulary, which Phi-3 has.)"""
    kv = read_kv(files["spm"])
    tokens = list(kv["tokenizer.ggml.tokens"][0])
    types = list(kv["tokenizer.ggml.token_type"][0])
    tokens[8100], types[8100] = "<|endoftext|>", 3
    path = variant(files["spm"], tmp_path / "phi3.gguf", general__name="Phi-3 mini (test)",
                   tokenizer__ggml__tokens=tokens, tokenizer__ggml__token_type=types)
    tok, ref = Tokenizer.open(path), Ref(path)
    for text in ("a</s>   b", "<s>  x </s>\n\ny", "<unk>  z", "</s>", " </s> ",
                 "<|endoftext|>  w"):
        for add, parse in MODES:
            assert tok.encode(text, add_special=add, parse_special=parse) == \
                ref.encode(text, add, parse), text
    assert tok.encode("a</s>   b", parse_special=True) == tok.encode("a</s>b", parse_special=True)


# -- flags, special ids, end of generation --------------------------------------------------------


def _assert_vocab_facts(tok: Tokenizer, ref: Ref, *, check_eot: bool = True) -> None:
    ids = ref.special_ids()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["bos"], ids["eos"], ids["pad"])
    if check_eot:
        assert tok.eot_id == ids["eot"]
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(ref.vocab)
    assert tok.add_eos == llama_cpp.llama_vocab_get_add_eos(ref.vocab)
    theirs = frozenset(i for i in range(ref.n_vocab) if llama_cpp.llama_vocab_is_eog(ref.vocab, i))
    assert tok.eog_ids == theirs
    attrs = [llama_cpp.llama_vocab_get_attr(ref.vocab, i) for i in range(ref.n_vocab)]
    assert [tok.token_attr(i) for i in range(tok.n_vocab)] == attrs
    for i in range(tok.n_vocab):
        assert tok.is_control(i) == bool(llama_cpp.llama_vocab_is_control(ref.vocab, i))


@pytest.mark.parametrize("name", MAIN)
def test_special_ids_attrs_and_eog_match(name: str, ours: Ours, theirs: Theirs) -> None:
    tok, ref = ours(name), theirs(name)
    # harmony's files name no EOT token and hold two with EOT names (<|end|>, <|endoftext|>):
    # llama.cpp keeps whichever its std::unordered_map yields first, an order of its hash
    # table, not of the file. The id plays no part in generation (the EOG set, checked here
    # exactly, is what ends it), so it is the one fact not compared for this vocabulary.
    _assert_vocab_facts(tok, ref, check_eot=name != "harmony")
    expected = {"llama-bpe": {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"},
                "default": {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"},
                "qwen2": {"<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>",
                          "<|file_sep|>"},
                "spm": {"</s>"},
                # <|end|> ends a message, not the answer (llama.cpp's o200k_harmony rule)
                "harmony": {"<|return|>", "<|call|>", "<|endoftext|>"}}[name]
    assert {tok.token_text(i) for i in tok.eog_ids} == expected


def test_flags_from_the_file(tmp_path: Path, files: dict[str, Path]) -> None:
    cases = [
        ("llama-bpe", {"tokenizer__ggml__add_bos_token": False}),
        ("llama-bpe", {"tokenizer__ggml__add_eos_token": True}),
        ("llama-bpe", {"tokenizer__ggml__add_bos_token": None}),  # llama-bpe default: add BOS
        ("llama-bpe", {"tokenizer__ggml__add_space_prefix": True}),  # decode drops a space
        ("qwen2", {"tokenizer__ggml__add_bos_token": True}),
        ("qwen2", {"tokenizer__ggml__bos_token_id": None, "tokenizer__ggml__add_bos_token": None}),
        ("spm", {"tokenizer__ggml__add_eos_token": True}),
        ("spm", {"tokenizer__ggml__add_space_prefix": False}),
        ("spm", {"tokenizer__ggml__add_bos_token": None, "tokenizer__ggml__eos_token_id": None}),
    ]
    texts = ["Hello world", "", " lead", "  two", "<s>x</s>", "<|eot_id|>y", "end."]
    for k, (base, changes) in enumerate(cases):
        path = variant(files[base], tmp_path / f"flags{k}.gguf", **changes)
        tok, ref = Tokenizer.open(path), Ref(path)
        _assert_vocab_facts(tok, ref)
        for text in texts:
            for add, parse in MODES:
                ids = tok.encode(text, add_special=add, parse_special=parse)
                assert ids == ref.encode(text, add, parse), (changes, text)
                for remove in (False, True):
                    assert tok.decode_bytes(ids, remove_special=remove, clean_spaces=True) == \
                        ref.detokenize(ids, remove, False), (changes, text)
        if changes.get("tokenizer__ggml__add_eos_token"):
            assert tok.encode("hi")[-1] == tok.eos_id


def test_eog_name_heuristics(tmp_path: Path, files: dict[str, Path]) -> None:
    """Tokens llama.cpp recognises by name end generation / change type, whatever the file says."""
    kv = read_kv(files["qwen2"])
    tokens = list(kv["tokenizer.ggml.tokens"][0])
    types = list(kv["tokenizer.ggml.token_type"][0])
    renamed = {"<|eom_id|>": 1, "<end_of_turn>": 4, "<|return|>": 3, "<|call|>": 3,
               "<|end|>": 3, "<|channel|>": 3, "<|tool_response>": 3, "</s>": 3,
               "<unused7>": 3, "<|fim_prefix_x|>": 3, "<EOT>": 1}
    for k, (text, ttype) in enumerate(renamed.items()):
        i = 8160 - 5 * k  # late (long, rare) learned tokens, now carrying special names
        tokens[i], types[i] = text, ttype
    path = variant(files["qwen2"], tmp_path / "names.gguf", tokenizer__ggml__tokens=tokens,
                   tokenizer__ggml__token_type=types, tokenizer__ggml__eot_token_id=None)
    tok, ref = Tokenizer.open(path), Ref(path)
    _assert_vocab_facts(tok, ref)
    texts = {tok.token_text(i) for i in tok.eog_ids}
    assert "<|end|>" not in texts and "</s>" not in texts  # the harmony / gemma4 exceptions
    assert {"<|eom_id|>", "<end_of_turn>", "<|return|>", "<|call|>", "<EOT>"} <= texts
    for text in ("a<|channel|>b<|end|>c", "<unused7></s><|tool_response>", "<EOT> x"):
        for add, parse in MODES:
            assert tok.encode(text, add_special=add, parse_special=parse) == \
                ref.encode(text, add, parse)


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "spm"])
def test_eot_found_by_name(name: str, tmp_path: Path, files: dict[str, Path]) -> None:
    """Without tokenizer.ggml.eot_token_id llama.cpp looks the EOT token up by name. With
    several candidates (Llama 3 has <|eot_id|> and <|end_of_text|>) its pick follows its hash
    map's order; ours takes the first name on llama.cpp's list. The EOG set is the same."""
    path = variant(files[name], tmp_path / f"noeot-{name}.gguf", tokenizer__ggml__eot_token_id=None)
    tok, ref = Tokenizer.open(path), Ref(path)
    _assert_vocab_facts(tok, ref, check_eot=False)
    candidates = {"<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"}
    theirs = ref.special_ids()["eot"]
    if theirs is None:
        assert tok.eot_id is None
    else:
        assert tok.eot_id is not None and tok.token_text(tok.eot_id) in candidates
        assert llama_cpp.llama_vocab_get_text(ref.vocab, theirs).decode() in candidates
        assert {tok.eot_id, theirs} <= tok.eog_ids


# -- pre-tokenizers --------------------------------------------------------------------------------


def test_every_supported_pre_tokenizer(tmp_path: Path, files: dict[str, Path]) -> None:
    """Each tokenizer.ggml.pre value we accept: llama.cpp's flags and splitting, on a sample."""
    texts = [t for k, t in enumerate(corpus()) if k % 8 == 0]
    assert len(supported_pre_tokenizers()) >= 40
    for pre in supported_pre_tokenizers():
        path = variant(files["llama-bpe-tiny"], tmp_path / f"pre-{pre}.gguf",
                       tokenizer__ggml__pre=pre, tokenizer__ggml__add_bos_token=None)
        tok, ref = Tokenizer.open(path), Ref(path)
        _assert_vocab_facts(tok, ref)
        for text in texts:
            for parse in (False, True):
                ids = tok.encode(text, parse_special=parse)
                assert ids == ref.encode(text, True, parse), (pre, text)
            assert tok.decode_bytes(ids, clean_spaces=True) == ref.detokenize(ids, False, False), \
                (pre, text)


def _probe_vocab(path: Path, pre: str) -> Path:
    """Byte-level vocabulary with a token for every byte pair, so that every pre-token
    boundary shows in the ids: a character class difference cannot hide."""
    chars = [bytes_to_unicode()[b] for b in range(256)]
    tokens = chars + [a + b for a in chars for b in chars]
    kv = {
        "tokenizer.ggml.model": _infer("gpt2"), "tokenizer.ggml.pre": _infer(pre),
        "tokenizer.ggml.tokens": _infer(tokens),
        "tokenizer.ggml.token_type": _infer([1] * len(tokens)),
        "tokenizer.ggml.merges": _infer([f"{a} {b}" for a in chars for b in chars]),
        "tokenizer.ggml.add_bos_token": _infer(False),
    }
    return _write_gguf(path, kv, "llama")


def _sweep_code_points() -> list[int]:
    """Dense where scripts crowd and where recent Unicode versions added characters, sparse
    elsewhere (the full 0..0x10FFFF sweep, run while building this, found the differences
    tokenizer_bpe._LLAMA_CPP_UNKNOWN lists and nothing else)."""
    from prima_node.text.tokenizer_bpe import _LLAMA_CPP_UNKNOWN

    cps = set(range(0, 0x3000)) | set(range(0xA600, 0xA800)) | set(range(0x10000, 0x11000))
    for ranges in _LLAMA_CPP_UNKNOWN.values():
        for lo, hi in ranges:
            cps.update(range(lo - 4, min(hi, lo + 200) + 5))
    cps.update(range(0x3000, 0x110000, 61))
    return sorted(c for c in cps if not 0xD800 <= c < 0xE000)


@pytest.mark.parametrize("pre", ["llama-bpe", "default", "qwen35"])
def test_unicode_sweep(pre: str, tmp_path: Path) -> None:
    """Letters, digits, punctuation and marks exactly as llama.cpp's Unicode tables have them."""
    path = _probe_vocab(tmp_path / f"probe-{pre}.gguf", pre)
    tok, ref = Tokenizer.open(path), Ref(path)
    cps = _sweep_code_points()

    def segment(c: int) -> str:
        ch = chr(c)
        return f"a{ch}1{ch}'s{ch} {ch}!{ch}\t{ch}{ch}a"

    bad: list[int] = []

    def check(group: list[int]) -> None:
        text = "\n".join(segment(c) for c in group)
        if tok.encode(text, add_special=False) == ref.encode(text, False, False):
            return
        if len(group) == 1:
            bad.append(group[0])
            return
        check(group[: len(group) // 2])
        check(group[len(group) // 2:])

    for k in range(0, len(cps), 256):
        check(cps[k:k + 256])
    assert not bad, f"{len(bad)} code points split differently: {[hex(c) for c in bad[:40]]}"


# -- errors --------------------------------------------------------------------------------------


def test_unsupported_vocabularies_are_load_errors(tmp_path: Path, files: dict[str, Path]) -> None:
    base = files["llama-bpe-tiny"]
    cases = [
        ({"tokenizer__ggml__model": "bert"}, ["'bert'", "not supported"]),
        ({"tokenizer__ggml__model": "t5"}, ["'t5'"]),
        ({"tokenizer__ggml__model": None}, ["tokenizer.ggml.model"]),
        ({"tokenizer__ggml__tokens": None}, ["tokenizer.ggml.tokens", "missing"]),
        ({"tokenizer__ggml__merges": None}, ["tokenizer.ggml.merges", "missing"]),
        ({"tokenizer__ggml__pre": "klingon-bpe"}, ["'klingon-bpe'", "llama-bpe"]),
    ]
    for k, (changes, words) in enumerate(cases):
        path = variant(base, tmp_path / f"bad{k}.gguf", **changes)
        with pytest.raises(ModelLoadError) as info:
            Tokenizer.open(path)
        message = str(info.value)
        assert str(path) in message, message
        for word in words:
            assert word in message, (word, message)
    kv = read_kv(base)
    tokens = list(kv["tokenizer.ggml.tokens"][0])
    tokens[300] = tokens[301]
    path = variant(base, tmp_path / "dup.gguf", tokenizer__ggml__tokens=tokens)
    with pytest.raises(ModelLoadError, match="duplicate token"):
        Tokenizer.open(path)


def test_missing_pre_means_default(tmp_path: Path, files: dict[str, Path]) -> None:
    path = variant(files["llama-bpe-tiny"], tmp_path / "nopre.gguf", tokenizer__ggml__pre=None)
    tok, ref = Tokenizer.open(path), Ref(path)
    assert tok.pre is None
    for text in corpus()[:300]:
        assert tok.encode(text) == ref.encode(text, True, False), text


def test_invalid_ids(ours: Ours) -> None:
    tok = ours("llama-bpe")
    n = tok.n_vocab
    for bad in (n, -1, 10**9):
        with pytest.raises(ValueError, match=rf"{bad}.*{n} tokens"):
            tok.decode([1, 2, bad])
        with pytest.raises(ValueError, match=str(n)):
            tok.token_bytes(bad)
        with pytest.raises(ValueError, match=str(n)):
            tok.stream().feed(bad)
    assert tok.token_id("no such piece, surely") is None
    assert tok.token_text(tok.token_id("<|eot_id|>") or 0) == "<|eot_id|>"
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_from_model_file(files: dict[str, Path]) -> None:
    from prima_node.model_file import ModelFile

    mf = ModelFile.open(files["qwen2"])
    try:
        tok = Tokenizer.from_model_file(mf)
    finally:
        mf.close()
    assert tok.kind == "gpt2" and tok.pre == "qwen2" and tok.n_vocab == 8192
    assert tok.encode("hello") == Tokenizer.open(files["qwen2"]).encode("hello")
    assert not tok.add_bos and tok.eos_id == tok.token_id("<|im_end|>")
