"""Weights stay file-backed: running a model costs the process no anonymous memory of its size.

The engine reads weights through a read-only memory map, so they live in the page cache and
show up in the process's RssFile, never in RssAnon (heap, stacks, anonymous maps). This test
opens a model of more than 200 MB in a fresh interpreter (so that pytest, llama.cpp or earlier
tests cannot pollute the figures), runs a prompt and a few decode steps, and bounds how much
RssAnon grew.

The baseline is the interpreter's own anonymous memory with numpy and prima_node imported and
before the model is opened: whatever the interpreter, numpy and the package hold anyway is not
the model's. Everything after it counts: the GGUF metadata (gguf's reader keeps Python objects
per vocabulary entry, the largest single term here), ggml itself once loaded, the KV cache,
activations (ggml's compute and work buffers, numpy's arrays). The bound is

    KV cache       2 (K, V) x n_layer x n_ctx x n_head_kv x head_dim x 2 bytes (f16)
  + activations    the planner's scratch figure for a prefill chunk (ModelProfile.scratch_bytes,
                   checked against the real figure in tests/test_model_profile.py)
  + 10% of the model file
  + 64 MiB         (allocator arenas, thread stacks, ggml's library, interpreter noise)

which for this model is well under the file's size: a copy of the weights on the heap (let
alone a dequantised float32 copy, 4x larger) fails it. RssFile, on the other hand, must grow by
about the bytes the decode steps read, which shows the measurement sees the weights where they
should be. The model is opened without repacking: a repacked copy of the matrices is anonymous
memory by design (Model.repacked_bytes counts it), which only a device that holds its whole
model chooses.

A first, unmeasured run of the same script fills the page cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from conftest import ModelFactory

N_CTX = 512
PROMPT = 64
DECODE = 16
MiB = 1 << 20

SCRIPT = r"""
import json
import sys

import numpy as np

from prima_node import Model
from prima_node.bench import weight_bytes_per_token
from prima_node.engine.model import DEFAULT_BATCH
from prima_node.planner.model_profile import ModelProfile


def status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


path, n_ctx, n_prompt, n_decode = sys.argv[1], *map(int, sys.argv[2:5])
base = status()
peak = dict(base)


def sample():
    now = status()
    for key, value in now.items():
        peak[key] = max(peak[key], value)
    return now


with Model.open(path, threads=2, n_ctx=n_ctx, repack=False) as model:
    opened = sample()
    cfg = model.config
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, cfg.n_vocab, n_prompt)]
    logits = model.forward(prompt, session="rss")
    sample()
    for _ in range(n_decode):
        logits = model.forward([int(np.argmax(logits))], session="rss")
        sample()
    report = {
        "baseline": base, "opened": opened, "peak": peak,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv,
        "head_dim": cfg.head_dim, "n_embd": cfg.n_embd, "n_ff": cfg.n_ff,
        "n_vocab": cfg.n_vocab, "n_ctx": model.n_ctx,
        "kv_itemsize": 2,
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "scratch": ModelProfile.load(path).scratch_bytes(min(n_prompt, DEFAULT_BATCH), n_ctx),
        "repacked": model.repacked_bytes,
    }
print(json.dumps(report))
"""


def _run(path: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, path, str(N_CTX), str(PROMPT), str(DECODE)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_weights_stay_file_backed(make_model: ModelFactory) -> None:
    path = make_model("llama", "1b", "Q8_0", layers=3)
    size = path.stat().st_size
    assert size >= 200e6, f"the model is only {size / 1e6:.0f} MB"

    _run(str(path))  # warm the page cache; not measured
    r = _run(str(path))

    assert r["repacked"] == 0
    kv = 2 * r["n_layer"] * r["n_ctx"] * r["n_head_kv"] * r["head_dim"] * r["kv_itemsize"]
    activations = r["scratch"]
    bound = kv + activations + size // 10 + 64 * MiB
    grown = r["peak"]["RssAnon"] - r["baseline"]["RssAnon"]
    during = r["peak"]["RssAnon"] - r["opened"]["RssAnon"]
    file_grown = r["peak"]["RssFile"] - r["baseline"]["RssFile"]
    summary = {
        "model_mb": size / MiB, "baseline_anon_mb": r["baseline"]["RssAnon"] / MiB,
        "after_open_anon_mb": r["opened"]["RssAnon"] / MiB,
        "peak_anon_mb": r["peak"]["RssAnon"] / MiB, "anon_growth_mb": grown / MiB,
        "bound_mb": bound / MiB, "kv_mb": kv / MiB, "activations_mb": activations / MiB,
        "file_growth_mb": file_grown / MiB,
        "weight_mb_per_token": r["weight_bytes_per_token"] / MiB,
    }
    print(json.dumps({k: round(v, 1) for k, v in summary.items()}))

    assert grown < bound, f"RssAnon grew by {grown / MiB:.0f} MiB, bound {bound / MiB:.0f}: " \
        f"{summary}"
    # generation itself (after the open) allocates nothing that scales with the weights
    assert during < kv + activations + 64 * MiB, summary
    # the bound is meaningful: a heap copy of the weights would not fit in it
    assert bound < size, summary
    # the weights were read, and from the page cache: file-backed residency grew by them
    assert file_grown > 0.9 * r["weight_bytes_per_token"], summary
