"""Byte-level BPE (``tokenizer.ggml.model = "gpt2"``): pre-tokenizers and the merge engine.

The merging itself is done by the ``tokenizers`` library (Rust): its BPE model applies merges in
rank order, leftmost first, exactly like llama.cpp's ``llm_tokenizer_bpe_session``, and its
``ignore_merges`` option is llama.cpp's "emit a whole pre-token that is already a token" rule.

The pre-tokenizer is chosen by ``tokenizer.ggml.pre`` as in llama.cpp's ``llm_tokenizer_bpe``:
a list of regexes applied one after another, each splitting every piece of the previous step
into its matches and the text between them (``Split(..., behavior="isolated")``). The regexes
are llama.cpp's adapted forms: case-insensitive contractions are spelled ``'[sS]`` rather than
``(?i:'s)`` because Unicode case folding would also let ``'`` + U+017F (long s) match, which
llama.cpp's own matcher does not. No Unicode normalisation is applied (llama.cpp applies none).

An unknown ``tokenizer.ggml.pre`` is an error, as in llama.cpp (its loader throws "unknown
pre-tokenizer type"); a missing one means "default", with the same warning llama.cpp prints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

__all__ = ["PreTokenizer", "build_bpe", "pre_tokenizer_for", "supported_pre_tokenizers"]

log = logging.getLogger(__name__)

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# Code points that the regex engine inside `tokenizers` (Oniguruma, Unicode 16.0) puts in a
# general category but llama.cpp's tables (src/unicode-data.cpp, Unicode 15.1) do not know:
# the letters, digits, punctuation and marks first encoded in Unicode 16.0 (Garay, Todhri,
# Tulu-Tigalari, Kirat Rai, ...). llama.cpp treats them as unassigned ("other"), so they are
# taken out of the classes below; otherwise a word in those scripts would be split differently.
# Found by sweeping every code point through both tokenizers (see tests/test_tokenizer.py);
# if either library moves to another Unicode version, that sweep shows the new difference.
_LLAMA_CPP_UNKNOWN: dict[str, tuple[tuple[int, int], ...]] = {
    "L": ((0x01C89, 0x01C8A), (0x0A7CB, 0x0A7CD), (0x0A7DA, 0x0A7DC), (0x105C0, 0x105F3),
          (0x10D4A, 0x10D65), (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x11380, 0x11389),
          (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7),
          (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11BC0, 0x11BE0), (0x13460, 0x143FA),
          (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF), (0x1E5D0, 0x1E5ED),
          (0x1E5F0, 0x1E5F0)),
    "N": ((0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x16130, 0x16139),
          (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1E5F1, 0x1E5FA)),
    "P": ((0x01B4E, 0x01B4F), (0x01B7F, 0x01B7F), (0x10D6E, 0x10D6E), (0x113D4, 0x113D5),
          (0x113D7, 0x113D8), (0x11BE1, 0x11BE1), (0x16D6D, 0x16D6F), (0x1E5FF, 0x1E5FF)),
    "M": ((0x00897, 0x00897), (0x10D69, 0x10D6D), (0x10EFC, 0x10EFC), (0x113B8, 0x113C0),
          (0x113C2, 0x113C2), (0x113C5, 0x113C5), (0x113C7, 0x113CA), (0x113CC, 0x113D0),
          (0x113D2, 0x113D2), (0x113E1, 0x113E2), (0x11F5A, 0x11F5A), (0x1611E, 0x1612F),
          (0x1E5EE, 0x1E5EF)),
}


def _classes(remove: dict[str, tuple[tuple[int, int], ...]]) -> dict[str, str]:
    """Nested character classes for \\p{L} \\p{N} \\p{P} \\p{M} less the ``remove`` ranges.

    Each is a complete bracket expression (``[\\p{L}&&[^...]]``), usable alone or inside
    another class: Oniguruma takes the union of nested classes.
    """
    out = {}
    for cat in ("L", "N", "P", "M"):
        ranges = "".join(rf"\x{{{a:X}}}" if a == b else rf"\x{{{a:X}}}-\x{{{b:X}}}"
                         for a, b in remove.get(cat, ()))
        out[cat] = rf"[\p{{{cat}}}&&[^{ranges}]]" if ranges else rf"[\p{{{cat}}}]"
    return out


def _regexes(remove: dict[str, tuple[tuple[int, int], ...]]) -> dict[str, str]:
    c = _classes(remove)
    L, N, P, M = c["L"], c["N"], c["P"], c["M"]
    upper = rf"((?=[{L}])([^a-z]))"  # llama.cpp's stand-in for [\p{Lu}\p{Lt}...]
    lower = rf"((?=[{L}])([^A-Z]))"
    tail = r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    return {
        "gpt2": rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+",
        "llama3": (_CONTRACTIONS + rf"|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}"
                   rf"| ?[^\s{L}{N}]+[\r\n]*" + tail),
        "qwen2": (_CONTRACTIONS + rf"|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^\s{L}{N}]+[\r\n]*" + tail),
        "qwen35": (_CONTRACTIONS + rf"|[^\r\n{L}{N}]?[{L}{M}]+|[{N}]| ?[^\s{L}{M}{N}]+[\r\n]*"
                   + tail),
        "seed-coder": (_CONTRACTIONS + rf"|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1}}"
                       rf"| ?[^\s{L}{N}\r\n]+" + tail),
        "ufakzeka": rf"[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^\s{L}{N}]+[\r\n]*" + tail,
        "tekken": (rf"[^\r\n{L}{N}]?{upper}*{lower}+|[^\r\n{L}{N}]?{upper}+{lower}*"
                   rf"|[{N}]| ?[^\s{L}{N}]+[\r\n/]*" + tail),
        "gpt4o": (rf"[^\r\n{L}{N}]?{upper}*{lower}+{_CONTRACTIONS}?"
                  rf"|[^\r\n{L}{N}]?{upper}+{lower}*{_CONTRACTIONS}?"
                  rf"|[{N}]{{1,3}}| ?[^\s{L}{N}]+[\r\n/]*" + tail),
        "punct": rf"[{P}\$\+<=>\^~\|]+",
        "punct_falcon": rf"[{P}\$\+<=>\^~\|`]+",
        "digits": rf"[{N}]+",
        "digit": rf"[{N}]",
        "three": "[0-9][0-9][0-9]",
    }


_RX = _regexes(_LLAMA_CPP_UNKNOWN)


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's settings for one ``tokenizer.ggml.pre`` value."""

    regexes: tuple[str, ...]
    clean_spaces: bool = True  # detokenizer clean-up (" ," -> ",") as llama_detokenize does
    ignore_merges: bool = False  # a pre-token that is a whole token is emitted as it is
    add_bos: bool = False  # default when the file has no tokenizer.ggml.add_bos_token
    bos_null: bool = False  # no default BOS id


_DEFAULT = PreTokenizer((_RX["punct"], _RX["gpt2"], _RX["digits"], _RX["three"]))
_STARCODER = (_RX["digit"], _RX["gpt2"])


def _table() -> dict[str, PreTokenizer]:
    t: dict[str, PreTokenizer] = {"default": _DEFAULT}
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                 "midm-2.0", "lfm2", "jina-v5-nano"):
        t[name] = PreTokenizer((_RX["llama3"],), ignore_merges=True, add_bos=True)
    for name in ("dbrx", "smaug-bpe"):
        t[name] = PreTokenizer((_RX["llama3"],))
    for name in ("glm4", "chatglm-bpe"):
        t[name] = PreTokenizer((_RX["llama3"],), bos_null=True)
    t["falcon"] = PreTokenizer((_RX["punct_falcon"], _RX["gpt2"], _RX["three"]))
    for name in ("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4", "mpt", "olmo",
                 "jais"):
        t[name] = PreTokenizer((_RX["gpt2"],))
    for name in ("trillion", "granite-docling"):
        t[name] = PreTokenizer((_RX["gpt2"],), clean_spaces=False)
    for name in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"):
        t[name] = PreTokenizer(_STARCODER)
    for name in ("command-r", "smollm"):
        t[name] = PreTokenizer(_STARCODER, clean_spaces=False)
    for name in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open",
                 "grok-2"):
        t[name] = PreTokenizer((_RX["qwen2"],), clean_spaces=False)
    for name in ("megrez", "stablelm2"):
        t[name] = PreTokenizer((_RX["qwen2"],))
    t["qwen35"] = PreTokenizer((_RX["qwen35"],), clean_spaces=False)
    t["seed-coder"] = PreTokenizer((_RX["seed-coder"],), clean_spaces=False)
    t["ufakzeka"] = PreTokenizer((_RX["ufakzeka"],), clean_spaces=False)
    t["tekken"] = PreTokenizer((_RX["tekken"],), clean_spaces=False, ignore_merges=True,
                               add_bos=True)
    for name in ("gpt-4o", "llama4", "kanana2", "talkie"):
        t[name] = PreTokenizer((_RX["gpt4o"],), clean_spaces=False)
    return t


_PRE_TOKENIZERS = _table()


def supported_pre_tokenizers() -> tuple[str, ...]:
    return tuple(sorted(_PRE_TOKENIZERS))


def pre_tokenizer_for(name: str) -> PreTokenizer:
    """Settings for ``tokenizer.ggml.pre = name``; KeyError (with a message) if unsupported."""
    pre = _PRE_TOKENIZERS.get(name)
    if pre is None:
        raise KeyError(
            f"tokenizer.ggml.pre = {name!r} is not a pre-tokenizer this engine knows (llama.cpp "
            f"refuses unknown values too); supported: {', '.join(supported_pre_tokenizers())}"
        )
    return pre


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE tokens)."""
    bs = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in bs}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


BYTE_TO_CHAR = _bytes_to_unicode()
#: str.translate table turning byte-level characters back into latin-1 code points (= bytes)
CHAR_TO_BYTE_TABLE = {ord(c): b for b, c in BYTE_TO_CHAR.items()}


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    """Merges as llama.cpp reads them: split at the first space after the first character
    (a line without one is the pair ("", "")), the first occurrence of a pair giving its rank."""
    pairs = [tuple(line.split(" ", 1)) for line in merges]
    if any(len(p) != 2 or not p[0] for p in pairs):  # rare: take the slow, exact way
        pairs = []
        for line in merges:
            cut = line.find(" ", 1)
            pairs.append((line[:cut], line[cut + 1:]) if cut >= 0 else ("", ""))
    return list(dict.fromkeys(pairs))  # type: ignore[arg-type]


def build_bpe(vocab: dict[str, int], merges: Sequence[str], pre: PreTokenizer,
              path: str) -> Tokenizer:
    """A ``tokenizers`` pipeline that turns special-token-free text into llama.cpp's ids.

    ``vocab`` maps every token text to its id. A merge whose parts or result are not tokens
    cannot be represented by ``tokenizers`` and is left out; llama.cpp would still apply it,
    producing a non-token that it then drops (no converted model has such merges, so only a
    damaged file can tell the difference).
    """
    pairs = _merge_pairs(merges)
    model = None
    # A merge whose result is not a token makes tokenizers panic rather than raise: check that
    # here; a missing part is an ordinary error.
    if all(a + b in vocab for a, b in pairs):
        try:
            model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges,
                               byte_fallback=False, fuse_unk=False)
        except Exception:
            model = None
    if model is None:
        usable = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
        log.warning("%s: %d of %d BPE merges use or produce pieces that are not tokens; "
                    "they are ignored", path, len(pairs) - len(usable), len(pairs))
        model = models.BPE(vocab=vocab, merges=usable, ignore_merges=pre.ignore_merges,
                           byte_fallback=False, fuse_unk=False)
    tok = Tokenizer(model)
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in pre.regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return tok
