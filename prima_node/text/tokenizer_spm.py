"""SentencePiece BPE (``tokenizer.ggml.model = "llama"``) expressed as ranked BPE merges.

llama.cpp's ``llm_tokenizer_spm_session`` splits the (space-escaped) text into characters and
repeatedly joins the adjacent pair whose concatenation is a token with the highest score,
leftmost first on equal scores; a final symbol that is not a token is written as byte tokens
``<0xNN>``. That is a rank-ordered BPE once the merges are derived from the scores: for every
token, every split into two "symbols" (a token, or a single character, which is all a symbol
can ever be) is a merge, ranked by the token's score, highest first. The ``tokenizers`` BPE
model then does the merging in Rust.

``tokenizers`` insists that both halves of a merge are in its vocabulary, while llama.cpp also
joins characters that are not tokens themselves (``"▁" + "é" -> "▁é"`` with no ``"é"`` token).
Such characters are added to the Rust vocabulary under ids past the end of the real one
("phantom" ids); a phantom left over after merging is replaced by its UTF-8 bytes as byte
tokens, which is what llama.cpp emits for it.

Known difference: when two *different* tokens have exactly the same score and compete for
overlapping characters, llama.cpp prefers the leftmost pair, this ranking the lower token id.
Converted SentencePiece vocabularies give every piece its own score, so it does not arise.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models

__all__ = ["SpmModel", "build_spm"]


class SpmModel:
    """The Rust tokenizer plus the phantom-id table needed to finish its output."""

    def __init__(self, tok: Tokenizer, n_vocab: int, phantom_bytes: dict[int, list[int]]):
        self.tok = tok
        self.n_vocab = n_vocab
        self.phantom_bytes = phantom_bytes  # phantom id -> byte token ids of its character

    def finish(self, ids: list[int]) -> list[int]:
        """Replace phantom ids (characters that never merged into a token) by byte tokens."""
        if not ids or max(ids) < self.n_vocab:
            return ids
        out: list[int] = []
        for i in ids:
            if i < self.n_vocab:
                out.append(i)
            else:
                out.extend(self.phantom_bytes[i])
        return out


def _byte_token_ids(vocab: dict[str, int]) -> list[int | None]:
    """llama.cpp's byte_to_token: ``<0xNN>``, else the one-character token for ASCII bytes."""
    out: list[int | None] = []
    for b in range(256):
        i = vocab.get(f"<0x{b:02X}>")
        if i is None and b < 0x80:
            i = vocab.get(chr(b))
        out.append(i)
    return out


def build_spm(tokens: Sequence[str], vocab: dict[str, int], scores: Sequence[float]
              ) -> SpmModel:
    """The merge engine for a SentencePiece vocabulary (see the module docstring);
    ``vocab`` maps each token text to its id."""
    n = len(tokens)
    byte_ids = _byte_token_ids(vocab)
    # Candidate merges: (negated score, token id, split point). Sorting these gives the rank.
    cands: list[tuple[float, int, int]] = []
    for i, text in enumerate(tokens):
        if len(text) < 2:
            continue
        for k in range(1, len(text)):
            a = text[:k]
            b = text[k:]
            if (len(a) == 1 or a in vocab) and (len(b) == 1 or b in vocab):
                cands.append((-scores[i], i, k))
    cands.sort()
    phantom: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    for _, i, k in cands:
        text = tokens[i]
        a, b = text[:k], text[k:]
        for s in (a, b):
            if s not in vocab and s not in phantom:
                phantom[s] = n + len(phantom)
        pairs.append((a, b))
    full = dict(vocab)
    full.update(phantom)
    phantom_bytes: dict[int, list[int]] = {}
    for ch, pid in phantom.items():
        ids = [byte_ids[b] for b in ch.encode("utf-8")]
        phantom_bytes[pid] = [i for i in ids if i is not None]
    # Characters that are in no token at all fall back to <0xNN> tokens inside the Rust model.
    # (A vocabulary without byte tokens makes llama.cpp fail on such text; here they map to
    # <unk> when there is one.)
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    unk = "<unk>" if "<unk>" in vocab else None
    model = models.BPE(vocab=full, merges=pairs, byte_fallback=has_bytes,
                       unk_token=None if has_bytes else unk, fuse_unk=False)
    return SpmModel(Tokenizer(model), n, phantom_bytes)
