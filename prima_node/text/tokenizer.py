"""Text <-> token ids, built from a GGUF file's metadata alone, with llama.cpp's exact ids.

The engine must feed a model the ids llama.cpp would feed it: a model is trained on one
tokenisation, and a prompt cached or compared across engines only matches id for id. So this
module reproduces llama.cpp's ``llama_tokenize`` / ``llama_token_to_piece`` /
``llama_detokenize`` (src/llama-vocab.cpp) rather than Hugging Face's tokenizers, whose results
differ in corner cases (special-token matching order, SentencePiece space handling, clean-up):

* ``tokenizer_vocab`` patches token attributes and resolves special ids as llama.cpp's loader
  does (name heuristics, end-of-generation set);
* special tokens are split out of the text first, longest token first over the whole text, as
  ``tokenizer_st_partition`` does (``special_tokens``: control and unknown tokens only with
  ``parse_special``; user-defined tokens always);
* the text between them goes through the vocabulary's merge engine, built on the ``tokenizers``
  library: byte-level BPE with llama.cpp's pre-tokenizer regexes (``tokenizer_bpe``), or
  SentencePiece-by-score recast as ranked merges (``tokenizer_spm``).

Supported: ``tokenizer.ggml.model`` "gpt2" (with the ``tokenizer.ggml.pre`` values listed by
``supported_pre_tokenizers()``) and "llama". Anything else is a ModelLoadError naming the file.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .special_tokens import ASCII_SPACE, SpecialSplitter
from .tokenizer_bpe import CHAR_TO_BYTE_TABLE, build_bpe, supported_pre_tokenizers
from .tokenizer_spm import SpmModel, build_spm
from .tokenizer_vocab import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_UNUSED,
    ATTR_USER_DEFINED,
    VocabData,
    read_vocab,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer as _HfTokenizer

    from ..model_file import ModelFile

__all__ = ["Detokenizer", "Tokenizer", "supported_pre_tokenizers"]

_SPM_SPACE = "\u2581"  # "▁"
_NOT_LATIN1 = "\U0010ffff"
# GPT-2 byte characters -> their byte; every other character below 256 must fail the latin-1
# encode so that it takes the slow path (llama.cpp writes it as "[UNK_BYTE_0x..]").
_BYTE_TABLE: dict[int, int | str] = {c: _NOT_LATIN1 for c in range(256)}
_BYTE_TABLE.update(CHAR_TO_BYTE_TABLE)
_CHAR_TO_BYTE = {chr(c): b for c, b in CHAR_TO_BYTE_TABLE.items()}

_SPECIAL_ATTRS = ATTR_UNKNOWN | ATTR_CONTROL  # hidden by token_to_piece unless special=True


class Tokenizer:
    """A GGUF vocabulary: encode, decode, special tokens and the end-of-generation set.

    Construct with ``Tokenizer.open(path)`` or ``Tokenizer.from_model_file(mf)``. The object
    does not change after construction (its piece caches fill on first use, and concurrent
    fills write the same values), so it can be shared between threads.
    """

    n_vocab: int
    kind: str
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]

    def __init__(self, data: VocabData) -> None:
        self.path = data.path
        self.kind = data.model
        self.pre = data.pre_name
        self.n_vocab = len(data.tokens)
        self.bos_id, self.eos_id, self.eot_id = data.bos_id, data.eos_id, data.eot_id
        self.eom_id, self.unk_id, self.pad_id = data.eom_id, data.unk_id, data.pad_id
        self.add_bos, self.add_eos = data.add_bos, data.add_eos
        self.add_space_prefix = data.add_space_prefix
        self.clean_spaces = data.clean_spaces
        self.eog_ids = data.eog_ids
        self._tokens = data.tokens
        self._attrs = data.attrs
        self._token_to_id = data.token_to_id
        self._spm: SpmModel | None = None
        self._bpe: _HfTokenizer | None = None
        if self.kind == "llama":
            self._spm = build_spm(data.tokens, data.token_to_id, data.scores)
        else:
            assert data.pre is not None
            self._bpe = build_bpe(data.token_to_id, data.merges, data.pre, data.path)
        self._specials = SpecialSplitter(data)
        # token_to_piece results, filled on first use: [special=False, special=True]
        self._pieces: tuple[list[bytes | None], list[bytes | None]] = (
            [None] * self.n_vocab, [None] * self.n_vocab)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_model_file(cls, mf: ModelFile) -> Tokenizer:
        """Build from an open ModelFile; ModelLoadError if its vocabulary is unusable."""
        return cls(read_vocab(mf))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Open a GGUF file, read its vocabulary and close it again."""
        from ..model_file import ModelFile

        mf = ModelFile.open(path)
        try:
            return cls.from_model_file(mf)
        finally:
            mf.close()

    def __repr__(self) -> str:
        pre = f", pre={self.pre!r}" if self.kind == "gpt2" else ""
        return f"Tokenizer({self.path!r}, kind={self.kind!r}{pre}, n_vocab={self.n_vocab})"

    # -- token facts --------------------------------------------------------------------------

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} is out of range: this vocabulary has "
                             f"{self.n_vocab} tokens (ids 0..{self.n_vocab - 1})")
        return token_id

    def token_text(self, token_id: int) -> str:
        """The token's piece as stored in the file (``"▁the"``, ``"Ġthe"``, ``"<|eot_id|>"``)."""
        return self._tokens[self._check_id(token_id)]

    def token_id(self, text: str) -> int | None:
        """Id of the token whose stored piece is exactly ``text``, or None."""
        return self._token_to_id.get(text)

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's attribute bits for the token (``llama_vocab_get_attr``)."""
        return self._attrs[self._check_id(token_id)]

    def is_control(self, token_id: int) -> bool:
        return bool(self.token_attr(token_id) & ATTR_CONTROL)

    def is_special(self, token_id: int) -> bool:
        """Control, user-defined, unknown or unused: anything but a normal or byte token."""
        attr = self.token_attr(token_id)
        special = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN | ATTR_UNUSED
        return bool(attr & special) or not attr & (ATTR_NORMAL | ATTR_BYTE)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, *, add_special: bool = True,
               parse_special: bool = False) -> list[int]:
        """Token ids for ``text``, as ``llama_tokenize(text, add_special, parse_special)``.

        ``add_special`` adds BOS / EOS where the file asks for them (``add_bos_token`` /
        ``add_eos_token``). ``parse_special`` lets control tokens written in the text (e.g.
        ``"<|eot_id|>"``) become those tokens; without it they are tokenised as plain text.
        User-defined tokens (e.g. Qwen's ``<tool_call>``) are recognised either way, as in
        llama.cpp. Text with lone surrogates cannot be UTF-8 and raises UnicodeEncodeError.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        frags = self._specials.partition(text, parse_special)
        out: list[int] = []
        if add_special and self.add_bos:
            assert self.bos_id is not None  # checked at load
            out.append(self.bos_id)
        if self._spm is not None:
            out += self._encode_spm(frags)
        else:
            out += self._encode_bpe(frags)
        if add_special and self.add_eos:
            assert self.eos_id is not None
            out.append(self.eos_id)
        return out

    def _encode_bpe(self, frags: list[str | int]) -> list[int]:
        assert self._bpe is not None
        raw = [f for f in frags if isinstance(f, str)]
        if not raw:
            return [f for f in frags if isinstance(f, int)]
        for piece in raw:
            piece.encode("utf-8")  # lone surrogates: fail here with Python's own message
        encs = iter(self._bpe.encode_batch_fast(raw, add_special_tokens=False))
        out: list[int] = []
        for f in frags:
            if isinstance(f, str):
                out += next(encs).ids
            else:
                out.append(f)
        return out

    def _encode_spm(self, frags: list[str | int]) -> list[int]:
        assert self._spm is not None
        texts: list[str] = []
        prev_special = True  # llama.cpp: the first fragment gets the space prefix too
        for f in frags:
            if isinstance(f, str):
                t = " " + f if self.add_space_prefix and prev_special else f
                t.encode("utf-8")
                texts.append(t.replace(" ", _SPM_SPACE))
                prev_special = False
            else:
                prev_special = True
        if not texts:
            return [f for f in frags if isinstance(f, int)]
        encs = iter(self._spm.tok.encode_batch_fast(texts, add_special_tokens=False))
        out: list[int] = []
        for f in frags:
            if isinstance(f, str):
                out += self._spm.finish(next(encs).ids)
            else:
                out.append(f)
        return out

    # -- decoding -----------------------------------------------------------------------------

    def _piece(self, token_id: int, special: bool) -> bytes:
        cache = self._pieces[special]
        piece = cache[token_id]
        if piece is None:
            piece = cache[token_id] = self._make_piece(token_id, special)
        return piece

    def _make_piece(self, token_id: int, special: bool) -> bytes:
        """llama.cpp's token_to_piece with lstrip = 0."""
        attr = self._attrs[token_id]
        text = self._tokens[token_id]
        if not special and attr & _SPECIAL_ATTRS:
            return b""
        if attr & (_SPECIAL_ATTRS | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if self.kind == "llama":
                return text.replace(_SPM_SPACE, " ").encode("utf-8")
            return _byte_level_decode(text)
        if attr & ATTR_BYTE:
            return bytes([_strtol_hex(text[3:5]) & 0xFF])
        return b""  # unused / undefined tokens have no text

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The bytes ``llama_token_to_piece(token, lstrip=0, special)`` gives.

        SentencePiece ``"▁"`` becomes a space and ``<0xNN>`` its byte; byte-level BPE pieces are
        mapped back through the GPT-2 byte table. Control and unknown tokens give ``b""``
        unless ``special`` is true. A piece may be part of a UTF-8 character.
        """
        return self._piece(self._check_id(token_id), special)

    def decode_bytes(self, ids: Iterable[int], *, special: bool = False,
                     remove_special: bool = False, clean_spaces: bool = False) -> bytes:
        """``llama_detokenize(ids, remove_special, unparse_special=special)`` as raw bytes.

        As in llama.cpp: when the vocabulary adds a space prefix (SentencePiece), one leading
        space is removed from the first token's piece (the first token, whatever it is: after
        a BOS that is kept, the space stays); ``remove_special`` drops a leading BOS and a
        trailing EOS when the vocabulary adds them. llama.cpp then runs a clean-up pass for
        some vocabularies (Llama 3's, not Qwen's: ``" ,"`` -> ``","``, ``" 's"`` -> ``"'s"``);
        it loses information, so it runs only when ``clean_spaces`` is true (and the
        vocabulary asks for it).
        """
        seq = list(ids)
        self._check_ids(seq)
        start, end = 0, len(seq)
        strip_space = self.add_space_prefix
        if remove_special and self.add_bos and end > 0 and seq[0] == self.bos_id:
            strip_space = False
            start = 1
        if remove_special and self.add_eos and end > start and seq[end - 1] == self.eos_id:
            end -= 1
        cache = self._pieces[special]
        parts = [p if (p := cache[i]) is not None else self._piece(i, special)
                 for i in seq[start:end]]
        if strip_space and parts and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        out = b"".join(parts)
        if clean_spaces and self.clean_spaces:
            out = _clean_up_spaces(out)
        return out

    def decode(self, ids: Iterable[int], *, special: bool = False,
               remove_special: bool = False, clean_spaces: bool = False) -> str:
        """Text for ``ids``: ``decode_bytes`` (see there) read as UTF-8.

        With the defaults this is ``llama_detokenize(ids, remove_special=False,
        unparse_special=special)`` without llama.cpp's optional clean-up pass, so that
        ``decode(encode(text, add_special=False)) == text`` (SentencePiece vocabularies turn
        a U+2581 already in the text into a space, in llama.cpp too), and ``stream()`` gives
        the same string token by token. Bytes that are not valid UTF-8 (a sequence cut in the
        middle of a character) become U+FFFD.
        """
        return self.decode_bytes(ids, special=special, remove_special=remove_special,
                                 clean_spaces=clean_spaces).decode("utf-8", errors="replace")

    def stream(self, *, special: bool = False, show: Iterable[int] = (),
               continuation: bool = False) -> Detokenizer:
        """An incremental decoder: ``feed(id)`` per generated token, ``flush()`` at the end.

        ``show`` lists control tokens whose text appears even without ``special`` (the markers
        a tool-call parser must see, such as ``<|python_tag|>``, and no other control text).
        The first token fed starts the text, as in ``decode``: with a SentencePiece space
        prefix its leading space is dropped, which a chat reply wants; a ``continuation`` of a
        prompt keeps it ("hello" + "▁there" is "hello there").
        """
        return Detokenizer(self, special=special, show=show, continuation=continuation)

    def _check_ids(self, seq: Sequence[int]) -> None:
        if seq and (min(seq) < 0 or max(seq) >= self.n_vocab):
            bad = next(i for i in seq if not 0 <= i < self.n_vocab)
            self._check_id(bad)


class Detokenizer:
    """Token-by-token decoding for streaming that never emits half a character.

    ``feed`` returns the text that is complete so far; bytes of a character split across
    tokens are held back until the rest arrives. The concatenation of every ``feed`` result
    and ``flush()`` equals ``Tokenizer.decode(ids, special=special)`` of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False, show: Iterable[int] = (),
                 continuation: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._show = frozenset(show)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = not continuation

    def feed(self, token_id: int) -> str:
        piece = self._tok.token_bytes(token_id, special=self._special or token_id in self._show)
        if self._first:
            self._first = False
            if self._tok.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD). The stream can
        continue afterwards; the next token is not treated as the first."""
        return self._decoder.decode(b"", final=True)


def _byte_level_decode(text: str) -> bytes:
    """A byte-level BPE piece back to bytes (llama.cpp's ``llama_decode_text``)."""
    try:
        return text.translate(_BYTE_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        pass
    out = bytearray()
    whole = text.encode("utf-8")
    for ch in text:
        b = _CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:  # llama.cpp's marker for a character outside the byte alphabet, verbatim
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode("ascii") + whole + b"]"
    return bytes(out)


def _strtol_hex(s: str) -> int:
    """C ``strtol(s, NULL, 16)`` on the two characters llama.cpp reads from a byte token."""
    s = s.lstrip(ASCII_SPACE)
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s[:2].lower() == "0x" and len(s) > 2 and s[2] in "0123456789abcdefABCDEF":
        s = s[2:]
    value = 0
    for ch in s:
        d = "0123456789abcdef".find(ch.lower())
        if d < 0:
            break
        value = value * 16 + d
    return sign * value


def _clean_up_spaces(text: bytes) -> bytes:
    """llama_detokenize's three clean-up passes, done in place on the buffer as llama.cpp
    does (later checks read characters that earlier steps already moved)."""
    if not any(p in text for p in (b" ?", b" !", b" .", b" ,", b" '")):
        return text
    buf = bytearray(text)
    total = len(buf)
    # pass 1: " ?" " !" " ." " ," lose the space
    n1, total = total, 1 if total else 0
    for i in range(1, n1):
        x = buf[i]
        if buf[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        buf[total] = x
        total += 1
    # pass 2: a lone apostrophe between spaces loses both spaces
    n2, total = total, 1 if total else 0
    i = 1
    while i < n2:
        x = buf[i]
        if x == 0x27 and i + 1 < n2 and buf[i - 1] == 0x20 and buf[i + 1] == 0x20:
            total -= 1
            i += 1
            buf[i] = 0
        buf[total] = x
        total += 1
        i += 1
    # pass 3: " 's" " 'm" " 're" " 've" lose the space
    n3, total = total, 1 if total else 0
    for i in range(1, n3):
        x = buf[i]
        if buf[i - 1] == 0x20 and x == 0x27 and i + 1 < n3:
            x1 = buf[i + 1]
            if x1 in b"sm" or (x1 not in b"td" and i + 2 < n3
                               and (x1, buf[i + 2]) in ((0x72, 0x65), (0x76, 0x65))):
                total -= 1
        buf[total] = x
        total += 1
    return bytes(buf[:total])
