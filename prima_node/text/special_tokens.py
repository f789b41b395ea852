"""Special tokens split out of text before the merge engine sees it, as llama.cpp's
``tokenizer_st_partition`` (src/llama-vocab.cpp) does.

Control and unknown tokens are split out only with ``parse_special``; user-defined tokens
(e.g. Qwen's ``<tool_call>``) always. Every special token present in the text, longest first,
is split out of the fragments the longer ones left, left to right; LSTRIP / RSTRIP tokens eat
the ASCII whitespace next to them. A trie of the special texts finds which of them occur, so
a long prompt is not scanned once per special token of a 200k-token vocabulary.
"""

from __future__ import annotations

from typing import Any

from .tokenizer_vocab import ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_UNKNOWN, VocabData

__all__ = ["ASCII_SPACE", "SpecialSplitter"]

ASCII_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's lstrip / rstrip remove
_SPECIAL_ATTRS = ATTR_UNKNOWN | ATTR_CONTROL  # split out only with parse_special
_TRIE_END = ""  # key marking "a special token ends here" in the trie (never a character)


class SpecialSplitter:
    """A vocabulary's special tokens in llama.cpp's partition order (longest text first);
    the user-defined subset is what is split out without ``parse_special``."""

    def __init__(self, data: VocabData) -> None:
        self._tokens = data.tokens
        self._attrs = data.attrs
        self._special_all = data.special_cache
        self._special_user = tuple(i for i in data.special_cache
                                   if not data.attrs[i] & _SPECIAL_ATTRS)
        self._special_rank = {t: r for r, t in enumerate(data.special_cache)}
        self._tries: dict[bool, dict[str, Any]] = {}

    def _trie(self, parse_special: bool) -> dict[str, Any]:
        trie = self._tries.get(parse_special)
        if trie is None:
            trie = {}
            for tid in self._special_all if parse_special else self._special_user:
                node = trie
                for ch in self._tokens[tid]:
                    node = node.setdefault(ch, {})
                node[_TRIE_END] = tid
            self._tries[parse_special] = trie
        return trie

    def _present_specials(self, text: str, parse_special: bool) -> list[int]:
        """The special tokens that occur anywhere in ``text``, in llama.cpp's order."""
        trie = self._trie(parse_special)
        found: set[int] = set()
        n = len(text)
        for first, sub in trie.items():
            pos = text.find(first)
            while pos >= 0:
                node = sub
                j = pos + 1
                while True:
                    tid = node.get(_TRIE_END)
                    if tid is not None:
                        found.add(tid)
                    if j >= n:
                        break
                    node = node.get(text[j])
                    if node is None:
                        break
                    j += 1
                pos = text.find(first, pos + 1)
        return sorted(found, key=self._special_rank.__getitem__)

    def partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Text fragments and special token ids, in the text's order."""
        if not text:
            return []
        frags: list[str | int] = [text]
        for tid in self._present_specials(text, parse_special):
            piece = self._tokens[tid]
            lstrip = bool(self._attrs[tid] & ATTR_LSTRIP)
            rstrip = bool(self._attrs[tid] & ATTR_RSTRIP)
            split: list[str | int] = []
            for f in frags:
                if not isinstance(f, str) or piece not in f:
                    split.append(f)
                    continue
                start = 0
                while True:
                    m = f.find(piece, start)
                    if m < 0:
                        break
                    left = f[start:m]
                    if lstrip:
                        left = left.rstrip(ASCII_SPACE)
                    if left:
                        split.append(left)
                    split.append(tid)
                    start = m + len(piece)
                    if rstrip:
                        while start < len(f) and f[start] in ASCII_SPACE:
                            start += 1
                if start < len(f):
                    split.append(f[start:])
            frags = split
        return frags
