"""JSON-schema constrained decoding with llguidance.

OpenAI's ``response_format`` (``json_schema`` and ``json_object``) and Home Assistant's AI Task
structured results both need output that parses and validates, whatever the model would rather
say. llguidance (which llama.cpp can use as well) compiles the schema to a grammar and, for each
step, computes which tokens of the vocabulary keep the output a prefix of some valid document; the
sampler sets every other logit to ``-inf``.

llguidance needs the vocabulary as byte strings plus a tokenize function. Building that (a trie
over the whole vocabulary) costs real time for a 128k vocabulary, so it is done once per
tokenizer object and cached; a request only compiles its schema (well under a millisecond for
typical schemas, and cached by schema as well).

A document must also end inside the token budget: a small model that loops inside a string would
otherwise be cut at ``max_tokens`` with unparseable output, which Home Assistant can only report
as a failure. Given ``max_tokens``, the constraint looks ahead for a short valid ending of the
document (a search over single bytes with llguidance itself, so it honours the schema: required
keys, enums, minimum lengths, formats) and, once the tokens left are only just enough for it,
allows nothing but that ending. The content is then shortened, not broken. (A budget below the
schema's smallest document, or one token opening a large object right before the end, can
still run out: then the output is cut as it would have been without this.) A forced tool call
is such a document too: JSON between the marker tokens of the model's call syntax, which the
search tries where no byte goes on.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import llguidance
import numpy as np

from ..errors import SchemaError

__all__ = ["JSON_WHITESPACE", "JsonConstraint", "TokenVocab"]

# The whitespace a generated document may contain between JSON tokens: nothing, one space, or one
# or two newlines and up to 20 characters of indentation -- what llama.cpp's own JSON-schema
# grammars allow (json-schema-to-grammar's SPACE_RULE). llguidance's default allows unbounded
# whitespace, and a model that falls into emitting newlines then never finishes the document.
JSON_WHITESPACE = r"(?: |\n{1,2}[ \t]{0,20})"

# llguidance marks a special (control) token by a leading 0xFF byte, which never occurs in UTF-8.
_SPECIAL_PREFIX = b"\xff"

_SCHEMA_CACHE_SIZE = 64

# Closing a document in time (see the module docstring).
#: Tokens of slack kept beyond the shortest ending before it is forced: one sampled token can
#: lengthen the ending (opening an object with required keys), and the ending must still fit.
CLOSING_MARGIN = 16
# The order in which the search tries bytes at a structural position: closers first (a comma
# before digits, or a number would grow forever), then the shortest values, then the rest of
# printable ASCII, then everything else. The first ending found is taken.
_BYTE_PREFERENCE = bytes(dict.fromkeys(
    b'}]",:0123456789-.ntfe+E[{' + bytes(range(0x20, 0x7F)) + bytes(range(0x7F, 0x100))
    + bytes(range(0x20))))
# Inside a string: the closing quote, then the separators that formats need (an email's "@"
# and ".", a date's "-", a time's ":", a URI's "/"), then letters and digits, the rest last.
_STRING_PREFERENCE = bytes(dict.fromkeys(
    b'"@.-_:/' + b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    + _BYTE_PREFERENCE))
_PLAN_MAX_BYTES = 4096
_PLAN_MAX_CHECKS = 20_000
# Longest token looked up when forcing an ending (longer ones are merely not used for it).
_MAX_PIECE = 32
# A special token in llguidance's Lark dialect: <[id]>
_LARK_SPECIAL = re.compile(r"<\[(\d+)\]>")
# the "byte" of a special token among the search's (byte, token) candidates
_NO_BYTE = -1


class TokenVocab(Protocol):
    """What the constraint needs from a tokenizer (``prima_node.text.tokenizer.Tokenizer``)."""

    @property
    def n_vocab(self) -> int: ...

    @property
    def eog_ids(self) -> frozenset[int]: ...

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...

    def encode(self, text: str, *, add_special: bool = True,
               parse_special: bool = False) -> list[int]: ...


class _TokenizeOnly:
    """The object shape ``llguidance.TokenizerWrapper`` reads (tokens, EOS, a tokenize call).

    llguidance tokenizes text itself only for forced continuations, and needs tokens that spell
    exactly the text: a SentencePiece vocabulary prefixes a space, so when the tokenizer's
    answer does not spell the text, the longest pieces that do are used instead. The call
    takes ``str`` only (refusing bytes makes llguidance pass complete characters).
    """

    def __init__(self, vocab: TokenVocab, tokens: list[bytes], eos: int,
                 pieces: dict[bytes, int]) -> None:
        self._vocab = vocab
        self._pieces = pieces
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = [i for i, t in enumerate(tokens)
                                  if t[:1] == _SPECIAL_PREFIX and len(t) > 1]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            raise TypeError("tokenize takes str")
        ids = list(self._vocab.encode(text, add_special=False, parse_special=False))
        data = text.encode("utf-8")
        spelled = b"".join(self.tokens[i] for i in ids)
        if spelled == data:
            return ids
        if ids and spelled == b" " + data:  # SentencePiece's space prefix: respell the first
            first = self.tokens[ids[0]][1:]
            return (longest_pieces(first, self._pieces) if first else []) + ids[1:]
        return longest_pieces(data, self._pieces)


def longest_pieces(data: bytes, pieces: dict[bytes, int]) -> list[int]:
    """Spell ``data`` with the longest ordinary token at each position (every byte has one)."""
    out = []
    pos = 0
    while pos < len(data):
        for k in range(min(_MAX_PIECE, len(data) - pos), 0, -1):
            tok = pieces.get(data[pos:pos + k])
            if tok is not None:
                out.append(tok)
                pos += k
                break
        else:
            raise SchemaError(f"no token spells byte {data[pos]:#04x}")
    return out


class _CompiledVocab:
    """The llguidance tokenizer of one vocabulary, plus compiled schemas for it (an LRU)."""

    def __init__(self, vocab: TokenVocab) -> None:
        n = int(vocab.n_vocab)
        eog = sorted(int(t) for t in vocab.eog_ids)
        if not eog:
            eos = getattr(vocab, "eos_id", None)
            if eos is None:
                raise SchemaError("the tokenizer has no end-of-generation token, so a constrained "
                                  "document could never end")
            eog = [int(eos)]
        tokens: list[bytes] = []
        for i in range(n):
            if vocab.is_special(i):
                text = vocab.token_bytes(i, special=True) or f"<special_{i}>".encode()
                tokens.append(_SPECIAL_PREFIX + text)
            else:
                tokens.append(vocab.token_bytes(i))
        self.n_vocab = n
        self.tokens = tokens
        self.eog = np.zeros(n, dtype=bool)
        self.eog[eog] = True
        # Tokens that decode to nothing (unused slots, control tokens without text) would add no
        # bytes, so a grammar could "allow" them forever; they are never offered.
        self.never = np.array([len(t) == 0 for t in tokens], dtype=bool)
        # Every ordinary token by its bytes, for spelling text exactly (a token for every single
        # byte exists in byte-level BPE and, as <0xNN>, in SentencePiece vocabularies).
        # Of two tokens with the same bytes the later one is kept: SentencePiece vocabularies
        # put their byte-fallback tokens first, and a model emits the ordinary piece.
        self.piece_ids: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if t and t[:1] != _SPECIAL_PREFIX and len(t) <= _MAX_PIECE:
                self.piece_ids[t] = i
        self.byte_token = {b: self.piece_ids[bytes([b])] for b in range(256)
                           if bytes([b]) in self.piece_ids}
        self.byte_order = [(b, self.byte_token[b]) for b in _BYTE_PREFERENCE
                           if b in self.byte_token]
        self.string_order = [(b, self.byte_token[b]) for b in _STRING_PREFERENCE
                             if b in self.byte_token]
        wrapper = llguidance.TokenizerWrapper(_TokenizeOnly(vocab, tokens, eog[0],
                                                            self.piece_ids))
        self.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=n, eos_token=eog)
        self._matchers: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, schema: dict[str, Any]) -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``schema``; SchemaError if it does not compile."""
        try:
            key = json.dumps(schema, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"the JSON schema is not valid JSON: {exc}") from None

        def grammar() -> str:
            try:
                return str(llguidance.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_pattern": JSON_WHITESPACE}))
            except ValueError as exc:
                raise SchemaError(f"invalid JSON schema: {exc}") from None

        return self._matcher("json:" + key, grammar, "JSON schema")

    def lark_matcher(self, lark: str) -> llguidance.LLMatcher:
        """A fresh matcher for a grammar in llguidance's Lark dialect (JSON inside via %json)."""
        return self._matcher("lark:" + lark, lambda: str(
            llguidance.LLMatcher.grammar_from_lark(lark)), "grammar")

    def _matcher(self, key: str, build: Callable[[], str], what: str) -> llguidance.LLMatcher:
        with self._lock:
            template = self._matchers.get(key)
            if template is not None:
                self._matchers.move_to_end(key)
                return template.deep_copy()
        grammar = build()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer)
        if is_error:
            raise SchemaError(f"invalid {what}: {messages[0] if messages else 'rejected'}")
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise SchemaError(f"invalid {what}: {template.get_error()}")
        with self._lock:  # templates are only ever copied, and under this lock
            self._matchers[key] = template
            while len(self._matchers) > _SCHEMA_CACHE_SIZE:
                self._matchers.popitem(last=False)
            return template.deep_copy()


_cache_lock = threading.Lock()
# id(vocab) -> (weak or strong reference to the vocab, compiled). The reference confirms that the
# id still names the same object; a weakref finaliser drops the entry with its vocabulary.
_compiled: dict[int, tuple[Any, _CompiledVocab]] = {}


def _compiled_for(vocab: TokenVocab) -> _CompiledVocab:
    """The compiled form of ``vocab``, built on first use (one build at a time, never twice)."""
    key = id(vocab)
    with _cache_lock:
        entry = _compiled.get(key)
        if entry is not None:
            holder, compiled = entry
            target = holder() if isinstance(holder, weakref.ref) else holder
            if target is vocab:
                return compiled
        compiled = _CompiledVocab(vocab)
        holder_new: Any
        try:
            holder_new = weakref.ref(vocab)
            weakref.finalize(vocab, _forget, key, holder_new)
        except TypeError:  # not weak-referenceable: keep it alive with its compiled form
            holder_new = vocab
        _compiled[key] = (holder_new, compiled)
        return compiled


def _forget(key: int, holder: weakref.ref[Any]) -> None:
    with _cache_lock:
        entry = _compiled.get(key)
        if entry is not None and entry[0] is holder:
            del _compiled[key]


class _Lex(NamedTuple):
    """JSON's lexical state after some bytes: inside a string or not, and what the string holds.

    The grammar is JSON whatever the schema, so this small tracker tells the ending search
    whether the next quote closes a string, and which characters a string already used.
    """

    in_string: bool = False
    escape: int = 0  # bytes still belonging to an escape sequence: 1 after a backslash
    used: frozenset[int] = frozenset()

    def step(self, b: int) -> _Lex:
        if not self.in_string:
            return _Lex(in_string=True) if b == 0x22 else self
        if self.escape:
            # a "u" right after the backslash brings four hex digits with it
            more = 4 if self.escape == 1 and b == 0x75 else self.escape - 1
            return self._replace(escape=more)
        if b == 0x5C:
            return self._replace(escape=1)
        if b == 0x22:
            return _Lex()
        return self._replace(used=self.used | {b})


class JsonConstraint:
    """The state of one constrained generation: which tokens may come next.

    Not thread-safe; one per request. ``allowed()`` is computed at most once per step.
    """

    def __init__(self, compiled: _CompiledVocab, matcher: llguidance.LLMatcher,
                 max_tokens: int | None = None, specials: tuple[int, ...] = ()) -> None:
        self._compiled = compiled
        self._matcher = matcher
        n = compiled.n_vocab
        self._bits = np.zeros((n + 31) // 32, dtype=np.int32)
        self._allowed: np.ndarray | None = None
        self._max_tokens = max_tokens
        self._used = 0
        # once set, the only tokens still allowed, in order: single bytes (merged into longer
        # pieces when emitted) and special tokens
        self._ending: list[int] | None = None
        self._next_check = 0  # token count at which to look at the budget again
        self._lex = _Lex()  # where the document so far stands lexically (in a string or not)
        # special tokens the grammar names, tried by the ending search where no byte goes on
        self._specials = [(_NO_BYTE, t) for t in specials if 0 <= t < compiled.n_vocab]

    @classmethod
    def compile(cls, vocab: TokenVocab, schema: dict[str, Any] | None, *,
                max_tokens: int | None = None) -> JsonConstraint:
        """Start a document constrained to ``schema``; ``None`` means any JSON object.

        With ``max_tokens`` (the generation's token budget) the document is closed in time (see
        the module docstring). Raises SchemaError, with llguidance's message, for a schema it
        cannot compile.
        """
        if schema is None:
            schema = {"type": "object"}
        elif not isinstance(schema, dict):
            raise SchemaError(f"a JSON schema must be an object, got {type(schema).__name__}")
        _check_budget_arg(max_tokens)
        compiled = _compiled_for(vocab)
        return cls(compiled, compiled.matcher(schema), max_tokens)._probed()

    @classmethod
    def compile_lark(cls, vocab: TokenVocab, lark: str, *,
                     max_tokens: int | None = None) -> JsonConstraint:
        """Start a document of a Lark grammar (llguidance's dialect: ``%json {schema}`` embeds
        JSON, ``<[id]>`` names a special token), e.g. a forced tool call in a model's syntax.

        With ``max_tokens`` it is closed in time like a JSON document. That assumes what the
        tool-call grammars are: JSON, plus text around it without a double quote (the search
        tracks strings by their quotes). Raises SchemaError for a grammar that does not compile.
        """
        _check_budget_arg(max_tokens)
        compiled = _compiled_for(vocab)
        specials = tuple(dict.fromkeys(int(m) for m in _LARK_SPECIAL.findall(lark)))
        return cls(compiled, compiled.lark_matcher(lark), max_tokens, specials)._probed()

    def _probed(self) -> JsonConstraint:
        """Self, once the first token's mask is computed: some grammars compile and fail only
        there (a schema whose only definition refers to itself), and that must be the
        request's error, not the generation's."""
        try:
            self.allowed()
        except SchemaError as exc:
            raise SchemaError(f"the schema admits no document ({exc})") from None
        return self

    @property
    def n_vocab(self) -> int:
        return self._compiled.n_vocab

    @property
    def is_complete(self) -> bool:
        """True when the JSON document is finished: only end-of-generation may follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def closing(self) -> bool:
        """True once the token budget forced the document's ending."""
        return self._ending is not None

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary: True where the next token keeps the JSON valid.

        Once the document is complete only end-of-generation tokens are allowed. The array is
        shared until the next ``accept``; do not modify it.
        """
        if self._allowed is None:
            if self._matcher.is_error():
                raise SchemaError(f"constraint failed: {self._matcher.get_error()}")
            if self._max_tokens is not None and self._ending is None:
                self._check_budget()
            if self.is_complete or self._ending == []:
                mask = self._compiled.eog.copy()
            elif self._ending is not None:
                mask = np.zeros(self._compiled.n_vocab, dtype=bool)
                mask[self._next_ending_token()] = True
            else:
                bits = self._bits
                self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
                if self._matcher.is_error():
                    raise SchemaError(f"constraint failed: {self._matcher.get_error()}")
                mask = np.unpackbits(bits.view(np.uint8), count=self._compiled.n_vocab,
                                     bitorder="little").view(bool)
                mask[self._compiled.never] = False
            mask.flags.writeable = False
            self._allowed = mask
        return self._allowed

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id``; SchemaError if it was not allowed (a caller bug)."""
        t = int(token_id)
        if not 0 <= t < self._compiled.n_vocab:
            raise SchemaError(f"token {t} is outside the vocabulary of {self._compiled.n_vocab}")
        if not bool(self.allowed()[t]):
            raise SchemaError(f"token {t} is not allowed by the JSON schema here")
        if not self._matcher.consume_token(t):
            raise SchemaError(f"constraint failed on token {t}: {self._matcher.get_error()}")
        piece = self._compiled.tokens[t]
        special = piece[:1] == _SPECIAL_PREFIX
        if not special:
            for b in piece:
                self._lex = self._lex.step(b)
        if self._ending:
            del self._ending[:1 if special else len(piece)]
        self._used += 1
        self._allowed = None

    # -- closing the document in time ---------------------------------------------------------

    def _check_budget(self) -> None:
        """Force the ending once the tokens left barely cover it (and a margin for growth).

        The search costs up to a millisecond for a large schema, so far from the end it runs
        again only after a quarter of the spare tokens: one token rarely lengthens the ending
        by more than a few tokens.
        """
        assert self._max_tokens is not None
        if self._used < self._next_check:
            return
        left = self._max_tokens - self._used
        margin = min(CLOSING_MARGIN, self._max_tokens // 4)
        ending = self.find_ending()
        if ending is None:  # cannot plan here (e.g. no byte tokens): try again a little later
            self._next_check = self._used + 8
            return
        spare = left - self._ending_length(ending) - margin
        if spare <= 0:
            self._ending = ending
        else:
            self._next_check = self._used + max(1, spare // 4)

    def find_ending(self) -> list[int] | None:
        """Tokens that finish the document from here: a depth-first search over single bytes
        (and the grammar's special tokens where no byte goes on), closers first.

        At a structural position the search tries ``}`` and ``]`` before anything that opens a
        value; inside a string, the closing quote first, then characters the string does not
        hold yet (so a format such as an email reaches its "@" and "."). The first ending found
        is taken: short, not always shortest. None when the search gives up (no single-byte
        tokens, or a convoluted schema).
        """
        m = self._matcher.deep_copy()
        path: list[int] = []  # token ids
        lex = self._lex
        # per depth: the candidates, where to resume in them, the lexical state before the byte
        stack: list[tuple[list[tuple[int, int]], int, _Lex]] = []
        order, i = self._byte_order(lex, path), 0
        checks = 0
        while not m.is_accepting():
            advanced = False
            if len(path) < _PLAN_MAX_BYTES:
                while i < len(order) and checks < _PLAN_MAX_CHECKS:
                    b, tok = order[i]
                    i += 1
                    checks += 1
                    if m.validate_tokens([tok]) == 1 and m.consume_token(tok):
                        path.append(tok)
                        stack.append((order, i, lex))
                        lex = lex.step(b) if b != _NO_BYTE else lex
                        order, i = self._byte_order(lex, path), 0
                        advanced = True
                        break
            if not advanced:
                if not path or checks >= _PLAN_MAX_CHECKS:
                    return None
                m.rollback(1)
                path.pop()
                order, i, lex = stack.pop()
        return path

    def _byte_order(self, lex: _Lex, path: list[int]) -> list[tuple[int, int]]:
        """Candidate (byte, token) pairs, best first, for the search's next step after ``path``
        (token ids): the grammar's special tokens come last, outside strings.

        Outside strings, a byte just taken twice in a row goes last: digits or a repeatable
        pattern would otherwise be extended forever.
        """
        compiled = self._compiled
        if lex.in_string:
            used = lex.used
            quote = compiled.string_order[:1]
            rest = compiled.string_order[1:]
            return (quote + [c for c in rest if c[0] not in used]
                    + [c for c in rest if c[0] in used])
        order = compiled.byte_order
        if len(path) >= 2 and path[-1] == path[-2]:
            order = ([c for c in order if c[1] != path[-1]]
                     + [c for c in order if c[1] == path[-1]])
        return order + self._specials if self._specials else order

    def _ending_length(self, ending: list[int]) -> int:
        """How many tokens forcing ``ending`` takes: its byte runs in the longest pieces."""
        n, run = 0, bytearray()
        for tok in ending:
            piece = self._compiled.tokens[tok]
            if piece[:1] == _SPECIAL_PREFIX:
                n += 1 + (len(longest_pieces(bytes(run), self._compiled.piece_ids)) if run else 0)
                run.clear()
            else:
                run += piece
        return n + (len(longest_pieces(bytes(run), self._compiled.piece_ids)) if run else 0)

    def _next_ending_token(self) -> int:
        """The longest token that spells the start of the ending and that the grammar takes
        (a special token is taken as it is).

        Single bytes and special tokens need no check: the search that found the ending
        consumed them.
        """
        assert self._ending
        tokens = self._compiled.tokens
        head = bytearray()
        for tok in self._ending[:_MAX_PIECE]:
            piece = tokens[tok]
            if piece[:1] == _SPECIAL_PREFIX:
                break
            head += piece
        if not head:
            return self._ending[0]
        pieces = self._compiled.piece_ids
        for k in range(len(head), 1, -1):
            tok_k = pieces.get(bytes(head[:k]))
            if tok_k is not None and self._matcher.validate_tokens([tok_k]) == 1:
                return tok_k
        return self._ending[0]


def _check_budget_arg(max_tokens: int | None) -> None:
    if max_tokens is not None and (isinstance(max_tokens, bool)
                                   or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
