"""Decode and prefill speed of the engine, side by side with llama.cpp on the same file.

Both engines run in this process on the same GGUF, thread count, prompt and token sequence, one
after the other and alternating repeats, so machine noise hits both alike; the figures that
matter are the ratios. Decode speed is also put against the machine's memory read bandwidth:
decoding one token reads every weight once, so bytes per token / time per token shows how close
the engine runs to the hardware limit.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .engine.model import Model

JSON_FIELDS = {
    "model": "path of the GGUF file",
    "threads": "compute threads used by both engines",
    "prompt_tokens": "prompt length for the prefill measurement",
    "gen_tokens": "decoded tokens for the decode measurement",
    "engine_prefill_tok_s": "this engine's prefill throughput, tokens/s (best run)",
    "engine_decode_ms": "this engine's decode time per token, ms (median over tokens, best run)",
    "engine_decode_ms_min": "this engine's fastest decode step, ms",
    "llama_prefill_tok_s": "llama.cpp's prefill throughput, tokens/s (null without llama_cpp)",
    "llama_decode_ms": "llama.cpp's decode time per token, ms (median, best run)",
    "llama_decode_ms_min": "llama.cpp's fastest decode step, ms",
    "decode_ratio": "engine_decode_ms / llama_decode_ms (lower is better; 1.0 = parity)",
    "prefill_ratio": "engine_prefill_tok_s / llama_prefill_tok_s (higher is better)",
    "weight_bytes_per_token": "bytes of weights one decode step reads",
    "effective_bandwidth_gb_s": "weight_bytes_per_token / engine decode time, GB/s",
    "llama_effective_bandwidth_gb_s": "the same for llama.cpp",
    "memory_bandwidth_gb_s": "this machine's measured memory read bandwidth at these threads",
    "bandwidth_fraction": "effective_bandwidth_gb_s / memory_bandwidth_gb_s",
}


@dataclass
class BenchResult:
    model: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    engine_prefill_tok_s: float
    engine_decode_ms: float
    engine_decode_ms_min: float
    llama_prefill_tok_s: float | None
    llama_decode_ms: float | None
    llama_decode_ms_min: float | None
    decode_ratio: float | None
    prefill_ratio: float | None
    weight_bytes_per_token: int
    effective_bandwidth_gb_s: float
    llama_effective_bandwidth_gb_s: float | None
    memory_bandwidth_gb_s: float
    bandwidth_fraction: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def weight_bytes_per_token(model: Model) -> int:
    """Bytes a decode step reads: every layer, the output head, one embedding row."""
    mf = model.file
    total = sum(t.n_bytes for n, t in mf.tensors.items() if n.startswith("blk."))
    total += model.output.info.n_bytes + mf.tensor("output_norm.weight").n_bytes
    total += model.token_embd.row_bytes
    return total


def _warm_page_cache(path: Path) -> None:
    """Read the file once so both engines start from a warm page cache."""
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


@dataclass
class _Run:
    prefill_s: float
    decode_ms: list[float]


def _engine_run(model: Model, prompt: list[int], gen: list[int]) -> _Run:
    model.clear("bench")
    t0 = time.perf_counter()
    model.forward(prompt, session="bench")
    prefill = time.perf_counter() - t0
    steps = []
    for tok in gen:
        t0 = time.perf_counter()
        model.forward([tok], session="bench")
        steps.append((time.perf_counter() - t0) * 1e3)
    return _Run(prefill, steps)


def _llama_run(llm: Any, prompt: list[int], gen: list[int]) -> _Run:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    steps = []
    for tok in gen:
        t0 = time.perf_counter()
        llm.eval([tok])
        steps.append((time.perf_counter() - t0) * 1e3)
    return _Run(prefill, steps)


def _open_llama(path: Path, threads: int, n_ctx: int) -> Any:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def run_bench(
    model_path: str | os.PathLike[str],
    threads: int,
    prompt_tokens: int = 128,
    gen_tokens: int = 32,
    repeats: int = 2,
    with_llama: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> BenchResult:
    """Measure both engines; the best of ``repeats`` alternating runs counts for each."""
    from .kernels.bandwidth import memory_read_bandwidth

    path = Path(model_path)
    n_ctx = prompt_tokens + gen_tokens + 16
    log(f"warming the page cache with {path.name}")
    _warm_page_cache(path)
    model = Model.open(path, threads=threads, n_ctx=n_ctx)
    rng = np.random.default_rng(0)
    vocab = model.config.n_vocab
    prompt = [int(t) for t in rng.integers(1, vocab, prompt_tokens)]
    gen = [int(t) for t in rng.integers(1, vocab, gen_tokens)]
    llm = _open_llama(path, threads, n_ctx) if with_llama else None
    log("warm-up (kernel compilation or cache load)")
    _engine_run(model, prompt[:8], gen[:2])
    if llm is not None:
        _llama_run(llm, prompt[:8], gen[:2])
    ours: list[_Run] = []
    theirs: list[_Run] = []
    for r in range(repeats):
        log(f"run {r + 1}/{repeats}: engine")
        ours.append(_engine_run(model, prompt, gen))
        if llm is not None:
            log(f"run {r + 1}/{repeats}: llama.cpp")
            theirs.append(_llama_run(llm, prompt, gen))
    wbytes = weight_bytes_per_token(model)
    model.close()
    if llm is not None:
        llm.close()
    log("measuring memory read bandwidth")
    membw = memory_read_bandwidth(threads=threads)

    def summarise(runs: list[_Run]) -> tuple[float, float, float]:
        prefill = prompt_tokens / min(r.prefill_s for r in runs)
        decode = min(statistics.median(r.decode_ms) for r in runs)
        fastest = min(min(r.decode_ms) for r in runs)
        return prefill, decode, fastest

    e_pre, e_dec, e_min = summarise(ours)
    l_pre = l_dec = l_min = None
    if theirs:
        l_pre, l_dec, l_min = summarise(theirs)
    eff = wbytes / (e_dec / 1e3) / 1e9
    return BenchResult(
        model=str(path),
        threads=threads,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        engine_prefill_tok_s=e_pre,
        engine_decode_ms=e_dec,
        engine_decode_ms_min=e_min,
        llama_prefill_tok_s=l_pre,
        llama_decode_ms=l_dec,
        llama_decode_ms_min=l_min,
        decode_ratio=None if l_dec is None else e_dec / l_dec,
        prefill_ratio=None if l_pre is None else e_pre / l_pre,
        weight_bytes_per_token=wbytes,
        effective_bandwidth_gb_s=eff,
        llama_effective_bandwidth_gb_s=None if l_dec is None else wbytes / (l_dec / 1e3) / 1e9,
        memory_bandwidth_gb_s=membw,
        bandwidth_fraction=eff / membw,
    )


def format_table(r: BenchResult) -> str:
    """Human-readable side-by-side figures."""

    def f(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"model {r.model}  threads {r.threads}  prompt {r.prompt_tokens}  gen {r.gen_tokens}",
        f"{'':24}{'prima':>12}{'llama.cpp':>12}{'ratio':>10}",
        f"{'prefill tokens/s':24}{r.engine_prefill_tok_s:>12.1f}"
        f"{f(r.llama_prefill_tok_s, '.1f'):>12}{f(r.prefill_ratio, '.2f'):>10}",
        f"{'decode ms/token (median)':24}{r.engine_decode_ms:>12.1f}"
        f"{f(r.llama_decode_ms, '.1f'):>12}{f(r.decode_ratio, '.2f'):>10}",
        f"{'decode ms/token (min)':24}{r.engine_decode_ms_min:>12.1f}"
        f"{f(r.llama_decode_ms_min, '.1f'):>12}",
        f"{'weight GB/s':24}{r.effective_bandwidth_gb_s:>12.2f}"
        f"{f(r.llama_effective_bandwidth_gb_s, '.2f'):>12}",
        f"memory read bandwidth {r.memory_bandwidth_gb_s:.2f} GB/s: the engine reaches "
        f"{100 * r.bandwidth_fraction:.0f}% of it "
        f"({r.weight_bytes_per_token / 1e6:.0f} MB of weights per token)",
    ]
    if r.llama_decode_ms is None:
        lines.append("llama.cpp (llama_cpp) is not installed: no reference figures")
    return "\n".join(lines)
