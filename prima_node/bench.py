"""Decode and prefill speed of the engine, side by side with llama.cpp on the same file.

Both engines run in this process on the same GGUF, thread count, prompt and token sequence and
take turns: each round runs a prefill and ``gen_tokens`` decode steps on one engine, then on the
other, the order alternating from round to round. On a shared, noisy machine a single run can
differ from the next by 30-50 %, so the figure that counts is the ratio measured within each
round, and its median over the rounds. llama.cpp runs at its own default settings (flash
attention "auto", weight repacking on, 2048/512-token batches). Decode speed is also put against
the machine's memory read bandwidth: decoding one token reads every weight once, so bytes per
token / time per token shows how close an engine runs to the hardware limit.
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
    "gen_tokens": "decoded tokens per round",
    "rounds": "rounds in which the engines took turns",
    "engine_prefill_tok_s": "this engine's prefill throughput, tokens/s (best round)",
    "engine_decode_ms": "this engine's decode time per token, ms (median step, best round)",
    "engine_decode_ms_min": "this engine's fastest decode step, ms",
    "llama_prefill_tok_s": "llama.cpp's prefill throughput, tokens/s (null without llama_cpp)",
    "llama_decode_ms": "llama.cpp's decode time per token, ms (median step, best round)",
    "llama_decode_ms_min": "llama.cpp's fastest decode step, ms",
    "decode_ratio": "median over rounds of this engine's / llama.cpp's median decode step "
                    "(lower is better; 1.0 = parity)",
    "prefill_ratio": "median over rounds of this engine's / llama.cpp's prefill tokens/s "
                     "(higher is better)",
    "decode_ratio_rounds": "each round's decode ratio",
    "prefill_ratio_rounds": "each round's prefill ratio",
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
    rounds: int
    engine_prefill_tok_s: float
    engine_decode_ms: float
    engine_decode_ms_min: float
    llama_prefill_tok_s: float | None
    llama_decode_ms: float | None
    llama_decode_ms_min: float | None
    decode_ratio: float | None
    prefill_ratio: float | None
    decode_ratio_rounds: list[float]
    prefill_ratio_rounds: list[float]
    weight_bytes_per_token: int
    effective_bandwidth_gb_s: float
    llama_effective_bandwidth_gb_s: float | None
    memory_bandwidth_gb_s: float
    bandwidth_fraction: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def weight_bytes_per_token(model: Model) -> int:
    """Bytes a decode step reads: every layer (of a mixture of experts, the experts a token
    uses: ``n_expert_used / n_expert`` of each expert tensor), the output head, one embedding
    row."""
    mf, cfg = model.file, model.config
    total = 0
    for n, t in mf.tensors.items():
        if n.startswith("blk."):
            experts = len(t.shape) == 3 and cfg.n_expert and t.shape[0] == cfg.n_expert
            total += t.n_bytes // cfg.n_expert * cfg.n_expert_used if experts else t.n_bytes
    output = "token_embd.weight" if model.config.tied_embeddings else "output.weight"
    total += mf.tensor(output).n_bytes + mf.tensor("output_norm.weight").n_bytes
    total += mf.tensor("token_embd.weight").n_bytes // model.config.n_vocab
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


def _timed(prefill: Callable[[], object], step: Callable[[int], object],
           gen: list[int]) -> _Run:
    t0 = time.perf_counter()
    prefill()
    prefill_s = time.perf_counter() - t0
    steps = []
    for tok in gen:
        t0 = time.perf_counter()
        step(tok)
        steps.append((time.perf_counter() - t0) * 1e3)
    return _Run(prefill_s, steps)


def _engine_run(model: Model, prompt: list[int], gen: list[int]) -> _Run:
    model.clear("bench")
    return _timed(lambda: model.forward(prompt, session="bench"),
                  lambda tok: model.forward([tok], session="bench"), gen)


def _llama_run(llm: Any, prompt: list[int], gen: list[int]) -> _Run:
    llm.reset()
    return _timed(lambda: llm.eval(prompt), lambda tok: llm.eval([tok]), gen)


def _open_llama(path: Path, threads: int, n_ctx: int, gpu_layers: int) -> Any:
    try:
        from .reference import LlamaCpp
    except ImportError:
        return None
    return LlamaCpp.defaults(path, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers)


def run_bench(
    model_path: str | os.PathLike[str],
    threads: int,
    prompt_tokens: int = 128,
    gen_tokens: int = 32,
    repeats: int = 6,
    with_llama: bool = True,
    log: Callable[[str], None] = lambda s: None,
    gpu: str | None = None,
    gpu_layers: int | str = 0,
) -> BenchResult:
    """Measure both engines taking turns for ``repeats`` rounds; with ``gpu_layers``, the same
    layers on the GPU in both (llama.cpp's output layer too when every layer is there)."""
    from .device.compute import memory_read_bandwidth

    path = Path(model_path)
    n_ctx = prompt_tokens + gen_tokens + 16
    log(f"warming the page cache with {path.name}")
    _warm_page_cache(path)
    model = Model.open(path, threads=threads, n_ctx=n_ctx, gpu=gpu, gpu_layers=gpu_layers)
    if model.accel is not None:
        log(f"{model.gpu_layers} of {model.config.n_layer} layers on {model.accel.info.name} "
            f"({model.accel.info.description})")
    rng = np.random.default_rng(0)
    vocab = model.config.n_vocab
    prompt = [int(t) for t in rng.integers(1, vocab, prompt_tokens)]
    gen = [int(t) for t in rng.integers(1, vocab, gen_tokens)]
    # llama.cpp offloads its output layer as the one after the last block
    llama_gpu = model.gpu_layers + (model.gpu_layers == model.config.n_layer)
    llm = _open_llama(path, threads, n_ctx, llama_gpu) if with_llama else None
    log("warm-up")
    _engine_run(model, prompt[:8], gen[:2])
    if llm is not None:
        _llama_run(llm, prompt[:8], gen[:2])
    ours: list[_Run] = []
    theirs: list[_Run] = []
    for r in range(repeats):
        log(f"round {r + 1}/{repeats}")
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for who in order:
            if who == 0:
                ours.append(_engine_run(model, prompt, gen))
            elif llm is not None:
                theirs.append(_llama_run(llm, prompt, gen))
    wbytes = weight_bytes_per_token(model)
    model.close()
    if llm is not None:
        llm.close()
    log("measuring memory read bandwidth")
    membw = memory_read_bandwidth(threads=threads)
    return _summarise(path, threads, prompt_tokens, gen_tokens, ours, theirs, wbytes, membw)


def _summarise(path: Path, threads: int, prompt_tokens: int, gen_tokens: int, ours: list[_Run],
               theirs: list[_Run], wbytes: int, membw: float) -> BenchResult:
    def best(runs: list[_Run]) -> tuple[float, float, float]:
        prefill = prompt_tokens / min(r.prefill_s for r in runs)
        decode = min(statistics.median(r.decode_ms) for r in runs)
        fastest = min(min(r.decode_ms) for r in runs)
        return prefill, decode, fastest

    e_pre, e_dec, e_min = best(ours)
    l_pre = l_dec = l_min = None
    dec_rounds: list[float] = []
    pre_rounds: list[float] = []
    if theirs:
        l_pre, l_dec, l_min = best(theirs)
        dec_rounds = [statistics.median(a.decode_ms) / statistics.median(b.decode_ms)
                      for a, b in zip(ours, theirs, strict=True)]
        pre_rounds = [b.prefill_s / a.prefill_s for a, b in zip(ours, theirs, strict=True)]
    eff = wbytes / (e_dec / 1e3) / 1e9
    return BenchResult(
        model=str(path),
        threads=threads,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        rounds=len(ours),
        engine_prefill_tok_s=e_pre,
        engine_decode_ms=e_dec,
        engine_decode_ms_min=e_min,
        llama_prefill_tok_s=l_pre,
        llama_decode_ms=l_dec,
        llama_decode_ms_min=l_min,
        decode_ratio=statistics.median(dec_rounds) if dec_rounds else None,
        prefill_ratio=statistics.median(pre_rounds) if pre_rounds else None,
        decode_ratio_rounds=[round(x, 4) for x in dec_rounds],
        prefill_ratio_rounds=[round(x, 4) for x in pre_rounds],
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
        f"model {r.model}  threads {r.threads}  prompt {r.prompt_tokens}  gen {r.gen_tokens}  "
        f"rounds {r.rounds} (engines taking turns; ratio = median of the rounds' ratios)",
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
    if r.decode_ratio_rounds:
        lines.append("decode ratio per round: "
                     + " ".join(f"{x:.2f}" for x in r.decode_ratio_rounds))
        lines.append("prefill ratio per round: "
                     + " ".join(f"{x:.2f}" for x in r.prefill_ratio_rounds))
    if r.llama_decode_ms is None:
        lines.append("llama.cpp (llama_cpp) is not installed: no reference figures")
    return "\n".join(lines)
