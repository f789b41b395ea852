"""Tokenizer speed next to llama.cpp's, on the same GGUF file and the same text.

    .venv/bin/python benchmarks/bench_tokenizer.py --model model.gguf [--tokens 10000]

Prints, in one run: construction time (ours: metadata to ready tokenizer; llama.cpp: its
vocab-only model load), encode time for ~``--tokens`` tokens of English prose (the first call,
with cold caches, and the median of ``--repeat`` calls), decode time (whole sequence and token
by token through the streaming decoder), the ratio to llama.cpp, and whether the ids agree.
llama.cpp is optional: without llama-cpp-python only our figures are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prima_node.synth.vocab import build_corpus
from prima_node.text.tokenizer import Tokenizer


def _prose(tok: Tokenizer, n_tokens: int) -> str:
    """Deterministic English-like prose (the synthetic training corpus' plain documents)."""
    docs = [d for d in build_corpus() if d.isascii() and "\n" not in d and "{" not in d
            and "<" not in d]
    parts: list[str] = []
    count = 0
    for d in docs:
        parts.append(d)
        count += len(tok.encode(d, add_special=False))
        if count >= n_tokens:
            break
    return " ".join(parts)


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(first call, median of ``repeat`` further calls) in seconds, and the first result."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), result


def _ms(s: float) -> str:
    return f"{s * 1e3:8.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="GGUF file (only the vocabulary "
                    "is read)")
    ap.add_argument("--tokens", type=int, default=10_000, help="size of the prose sample")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions")
    args = ap.parse_args()

    loads = []
    toks = []
    for _ in range(3):
        t0 = time.perf_counter()
        toks.append(Tokenizer.open(args.model))
        loads.append(time.perf_counter() - t0)
    text = _prose(toks[0], args.tokens)
    tok = toks[1]  # never used yet: its first encode runs with cold caches

    print(f"model: {args.model}  ({tok!r})")
    print(f"text:  {len(text)} characters of prose")
    print(f"construction (ours, median of 3):  {_ms(statistics.median(loads))}")

    first, med, ids = _timed(lambda: tok.encode(text, add_special=False), args.repeat)
    print(f"encode ours:      first {_ms(first)}   median {_ms(med)}   ({len(ids)} tokens)")
    dec_first, dec_med, out = _timed(lambda: tok.decode(ids), args.repeat)

    def streamed() -> str:
        s = tok.stream()
        return "".join([s.feed(i) for i in ids]) + s.flush()

    st_first, st_med, _ = _timed(streamed, args.repeat)
    print(f"decode ours:      first {_ms(dec_first)}   median {_ms(dec_med)}   "
          f"(round trip {'ok' if out == text else 'DIFFERS'})")
    print(f"stream ours:      first {_ms(st_first)}   median {_ms(st_med)}   "
          f"({st_med / max(1, len(ids)) * 1e6:.2f} us/token)")

    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: no comparison")
        return
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(args.model), vocab_only=True, verbose=False)
    ll_load = time.perf_counter() - t0
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    data = text.encode("utf-8")
    ll_first, ll_med, ll_ids = _timed(lambda: llm.tokenize(data, add_bos=False, special=False),
                                      args.repeat)

    def ll_decode() -> bytes:
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        size = 64 * len(ids) + 64
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, False)
        return buf.raw[:n]

    lld_first, lld_med, _ = _timed(ll_decode, args.repeat)
    print(f"construction (llama.cpp vocab-only load): {_ms(ll_load)}")
    print(f"encode llama.cpp: first {_ms(ll_first)}   median {_ms(ll_med)}   "
          f"(ids {'identical' if list(ll_ids) == ids else 'DIFFER'})")
    print(f"decode llama.cpp: first {_ms(lld_first)}   median {_ms(lld_med)}")
    print(f"ratio ours / llama.cpp: encode {med / ll_med:.2f}x, decode {dec_med / lld_med:.2f}x")


if __name__ == "__main__":
    main()
