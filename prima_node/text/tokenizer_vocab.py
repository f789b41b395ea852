"""What llama.cpp derives from a GGUF file's ``tokenizer.*`` metadata, before any text is seen.

llama.cpp does not use the token types in the file as they are: it patches them with name-based
heuristics (``<|eot_id|>``, ``<|im_end|>``, ``<|fim_pad|>`` ... become CONTROL tokens and end
generation; control tokens named "unused" are marked unused; a few gpt-oss tokens are always
rendered), fills in special ids the file leaves out, and chooses defaults per vocabulary kind
and pre-tokenizer. Special-token splitting, decoding and the end-of-generation set all depend on
the patched attributes, so they are computed here once, in the same order as llama.cpp's
``llama_vocab::impl::load`` (src/llama-vocab.cpp), and nothing else in the package re-derives
them.

Where llama.cpp's result depends on the iteration order of a ``std::unordered_map`` (several
tokens in one vocabulary match the same name list, e.g. both ``<|im_end|>`` and
``<|endoftext|>`` for the EOT id when the file does not name one), the first name in
llama.cpp's list wins here; llama.cpp's own choice is then platform-dependent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError
from .tokenizer_bpe import PreTokenizer, pre_tokenizer_for

if TYPE_CHECKING:
    from ..model_file import ModelFile

__all__ = [
    "ATTR_BYTE",
    "ATTR_CONTROL",
    "ATTR_LSTRIP",
    "ATTR_NORMAL",
    "ATTR_RSTRIP",
    "ATTR_UNKNOWN",
    "ATTR_UNUSED",
    "ATTR_USER_DEFINED",
    "VocabData",
    "read_vocab",
]

# llama_token_attr bit flags (include/llama.h); the public Tokenizer reports these values.
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# tokenizer.ggml.token_type values (gguf.TokenType) -> attribute
_TYPE_TO_ATTR = {
    1: ATTR_NORMAL,
    2: ATTR_UNKNOWN,
    3: ATTR_CONTROL,
    4: ATTR_USER_DEFINED,
    5: ATTR_UNUSED,
    6: ATTR_BYTE,
}

_KIND_SPM = "llama"
_KIND_BPE = "gpt2"
SUPPORTED_MODELS = (_KIND_BPE, _KIND_SPM)

# -- name lists llama.cpp matches token texts against (src/llama-vocab.cpp) ----------------------

_EOT_NAMES = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)  # fmt: skip
_EOM_NAMES = ("<|eom_id|>",)
_FIM_PRE_NAMES = (
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
    "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>",
)  # fmt: skip
_FIM_SUF_NAMES = (
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
    "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>",
)  # fmt: skip
_FIM_MID_NAMES = (
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
    "\u2581<MID>", "<|code_middle|>", "<|middle|>",
)  # fmt: skip
_FIM_PAD_NAMES = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_NAMES = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_NAMES = ("<|file_sep|>",)
_EOG_NAMES = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))  # fmt: skip
# gpt-oss: llama.cpp always renders these (USER_DEFINED, whatever the file says)
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


@dataclass(frozen=True)
class VocabData:
    """A vocabulary as llama.cpp sees it after loading (attributes patched, ids resolved)."""

    path: str
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre_name: str | None  # tokenizer.ggml.pre as written (None if absent)
    pre: PreTokenizer | None  # gpt2 only
    tokens: list[str]
    token_to_id: dict[str, int]
    scores: list[float]
    attrs: list[int]
    merges: list[str]  # gpt2 only (empty for llama)
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool
    eog_ids: frozenset[int]
    special_cache: tuple[int, ...]  # llama.cpp's cache_special_tokens, longest text first


def _err(mf: ModelFile, problem: str) -> ModelLoadError:
    return ModelLoadError(mf.path, problem)


def _str_list(mf: ModelFile, key: str) -> list[str]:
    value = mf.get(key)
    if value is None:
        raise _err(mf, f"required metadata key {key!r} is missing (the file has no vocabulary)")
    # GGUF arrays are homogeneous: the first element's type is the array's
    if not isinstance(value, list) or (value and not isinstance(value[0], str)):
        raise _err(mf, f"metadata key {key!r} must be an array of strings")
    return value


def _num_list(mf: ModelFile, key: str, n: int) -> list[Any] | None:
    value = mf.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or (value and not isinstance(value[0], (int, float))):
        raise _err(mf, f"metadata key {key!r} must be a numeric array")
    if len(value) < n:
        raise _err(mf, f"metadata key {key!r} has {len(value)} entries for {n} tokens")
    return value


def _opt_bool(mf: ModelFile, key: str) -> bool | None:
    value = mf.get(key)
    if value is None:
        return None
    if not isinstance(value, (bool, int)):
        raise _err(mf, f"metadata key {key!r} must be a boolean")
    return bool(value)


@dataclass
class _KindDefaults:
    """What a vocabulary kind (and, for gpt2, its pre-tokenizer) implies where the file is
    silent."""

    pre: PreTokenizer | None
    merges: list[str]
    add_space_prefix: bool
    clean_spaces: bool
    add_bos: bool
    add_eos: bool
    bos: int | None
    eos: int | None
    unk: int | None


@dataclass
class _Pieces:
    tokens: list[str]
    scores: list[float]
    attrs: list[int]  # patched in place by the steps below, as llama.cpp does
    token_to_id: dict[str, int]


def read_vocab(mf: ModelFile) -> VocabData:
    """Read and patch the vocabulary of ``mf`` the way llama.cpp's loader does, in its order:
    the kind's defaults, the pieces, the special ids (from the file, then by name), the
    end-of-generation set, the special-token cache, then per-model attributes."""
    model = mf.get("tokenizer.ggml.model")
    if model is None:
        raise _err(mf, "required metadata key 'tokenizer.ggml.model' is missing "
                       "(the file has no tokenizer)")
    if model not in SUPPORTED_MODELS:
        raise _err(mf, f"tokenizer.ggml.model = {model!r} is not supported; this engine reads "
                       f"{' and '.join(repr(m) for m in SUPPORTED_MODELS)} vocabularies")
    pre_name = mf.get("tokenizer.ggml.pre")
    if pre_name is not None and not isinstance(pre_name, str):
        raise _err(mf, "metadata key 'tokenizer.ggml.pre' must be a string")
    kind = _kind_defaults(mf, model, pre_name)
    p = _pieces(mf)
    ids = _special_ids(mf, len(p.tokens), kind)
    add_bos = _flag(mf, "add_bos_token", kind.add_bos)
    add_eos = _flag(mf, "add_eos_token", kind.add_eos)
    if add_bos and ids["bos"] is None:
        raise _err(mf, "tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id "
                       "is not set")
    if add_eos and ids["eos"] is None:
        raise _err(mf, "tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id "
                       "is not set")
    _find_by_name(ids, p)
    for i, text in enumerate(p.tokens):
        if p.attrs[i] & ATTR_CONTROL and "unused" in text:
            p.attrs[i] |= ATTR_UNUSED
    eog = _end_of_generation(ids, p)
    # the special-token cache, longest first, as llama.cpp's tokenizer_st_partition walks it
    special_mask = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
    cache = [i for i in range(len(p.tokens)) if p.attrs[i] & special_mask]
    cache.sort(key=lambda i: -len(p.tokens[i].encode("utf-8")))
    _attributes_by_model_name(mf, cache, p)
    return VocabData(
        path=str(mf.path), model=model, pre_name=pre_name, pre=kind.pre, tokens=p.tokens,
        token_to_id=p.token_to_id, scores=p.scores, attrs=p.attrs, merges=kind.merges,
        bos_id=ids["bos"], eos_id=ids["eos"], eot_id=ids["eot"], eom_id=ids["eom"],
        unk_id=ids["unk"], pad_id=ids["pad"], add_bos=add_bos, add_eos=add_eos,
        add_space_prefix=_flag(mf, "add_space_prefix", kind.add_space_prefix),
        clean_spaces=kind.clean_spaces, eog_ids=frozenset(eog), special_cache=tuple(cache),
    )


def _flag(mf: ModelFile, key: str, default: bool) -> bool:
    value = _opt_bool(mf, f"tokenizer.ggml.{key}")
    return default if value is None else value


def _kind_defaults(mf: ModelFile, model: str, pre_name: str | None) -> _KindDefaults:
    if model != _KIND_BPE:
        return _KindDefaults(None, [], add_space_prefix=True, clean_spaces=False, add_bos=True,
                             add_eos=False, bos=1, eos=2, unk=0)
    try:
        pre = pre_tokenizer_for(pre_name or "default")
    except KeyError as exc:
        raise _err(mf, str(exc.args[0])) from None
    return _KindDefaults(pre, _str_list(mf, "tokenizer.ggml.merges"), add_space_prefix=False,
                         clean_spaces=pre.clean_spaces, add_bos=pre.add_bos, add_eos=False,
                         bos=None if pre.bos_null else 11, eos=11, unk=None)


def _pieces(mf: ModelFile) -> _Pieces:
    """Tokens, scores and attributes as the file gives them; every text a unique key."""
    tokens = list(_str_list(mf, "tokenizer.ggml.tokens"))
    n = len(tokens)
    if n == 0:
        raise _err(mf, "the vocabulary ('tokenizer.ggml.tokens') is empty")
    raw_scores = _num_list(mf, "tokenizer.ggml.scores", n)
    scores = [float(s) for s in raw_scores[:n]] if raw_scores is not None else [0.0] * n
    types = _num_list(mf, "tokenizer.ggml.token_type", n)
    attrs = ([_TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in types[:n]]
             if types is not None else [ATTR_NORMAL] * n)
    token_to_id: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if not text:  # llama.cpp renames empty pieces so that every text is a unique key
            text = tokens[i] = f"[EMPTY_{i}]"
        prev = token_to_id.setdefault(text, i)
        if prev != i:
            raise _err(mf, f"duplicate token in vocabulary: {text!r} has ids {prev} and {i}")
    return _Pieces(tokens, scores, attrs, token_to_id)


def _special_ids(mf: ModelFile, n: int, kind: _KindDefaults) -> dict[str, int | None]:
    """The special ids the file names (an absent or out-of-range one keeps llama.cpp's
    default)."""

    def special(key: str, default: int | None) -> int | None:
        value = mf.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
            return value
        return default if default is not None and 0 <= default < n else None

    return {
        "bos": special("bos_token_id", kind.bos), "eos": special("eos_token_id", kind.eos),
        "eot": special("eot_token_id", None), "eom": special("eom_token_id", None),
        "unk": special("unknown_token_id", kind.unk), "pad": special("padding_token_id", None),
        # the deprecated keys are read after the fim_* ones, so they win when both are present
        "fim_pre": special("prefix_token_id", special("fim_pre_token_id", None)),
        "fim_suf": special("suffix_token_id", special("fim_suf_token_id", None)),
        "fim_mid": special("middle_token_id", special("fim_mid_token_id", None)),
        "fim_pad": special("fim_pad_token_id", None),
        "fim_rep": special("fim_rep_token_id", None),
        "fim_sep": special("fim_sep_token_id", None),
    }


_NAME_LISTS = {"eot": _EOT_NAMES, "eom": _EOM_NAMES, "fim_pre": _FIM_PRE_NAMES,
               "fim_suf": _FIM_SUF_NAMES, "fim_mid": _FIM_MID_NAMES, "fim_pad": _FIM_PAD_NAMES,
               "fim_rep": _FIM_REP_NAMES, "fim_sep": _FIM_SEP_NAMES}


def _find_by_name(ids: dict[str, int | None], p: _Pieces) -> None:
    """Ids the file leaves out, found by the token's text (and made CONTROL tokens)."""
    for key, names in _NAME_LISTS.items():
        if ids[key] is not None:
            continue
        for name in names:
            i = p.token_to_id.get(name)
            if i is not None:
                p.attrs[i] |= ATTR_CONTROL
                ids[key] = i
                break


def _end_of_generation(ids: dict[str, int | None], p: _Pieces) -> set[int]:
    eog: set[int] = {i for i in (ids["fim_pad"], ids["fim_rep"], ids["fim_sep"]) if i is not None}
    for name in _EOG_NAMES:
        tid = p.token_to_id.get(name)
        if tid is not None:
            eog.add(tid)
            p.attrs[tid] |= ATTR_CONTROL
    for name in _ALWAYS_RENDERED:
        tid = p.token_to_id.get(name)
        if tid is not None:
            p.attrs[tid] = ATTR_USER_DEFINED
    eog.update(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None)
    eog_texts = {p.tokens[i]: i for i in eog}
    has_call = "<|call|>" in eog_texts or "<|calls|>" in eog_texts
    if "<|end|>" in eog_texts and has_call and ("<|return|>" in eog_texts
                                                 or "<|flush|>" in eog_texts):
        end_id = eog_texts["<|end|>"]  # o200k_harmony / solar-open: <|end|> ends a message only
        eog.discard(end_id)
        p.attrs[end_id] = ATTR_USER_DEFINED
    if "<|tool_response>" in eog_texts and "</s>" in eog_texts:
        s_id = eog_texts["</s>"]  # gemma4 / paddleocr
        eog.discard(s_id)
        p.attrs[s_id] = ATTR_NORMAL
    return eog


def _attributes_by_model_name(mf: ModelFile, cache: list[int], p: _Pieces) -> None:
    """lstrip / rstrip that llama.cpp sets by the model's name."""
    name = mf.get("general.name")
    lowered = name.lower() if isinstance(name, str) else ""
    if "phi-3" in lowered or "phi3" in lowered:
        for i in cache:
            p.attrs[i] |= ATTR_RSTRIP
        for text, on in (("</s>", True), ("<unk>", False), ("<s>", False),
                         ("<|endoftext|>", False)):
            tid = p.token_to_id.get(text)
            if tid is not None:
                p.attrs[tid] = p.attrs[tid] | ATTR_RSTRIP if on else p.attrs[tid] & ~ATTR_RSTRIP
    elif "modern-bert" in lowered and "[MASK]" in p.token_to_id:
        p.attrs[p.token_to_id["[MASK]"]] |= ATTR_LSTRIP
