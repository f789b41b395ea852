"""The GPU checks of ``scripts/gpu-check`` (see there): conformance, speed, a mixed ring.

Run on a machine with a GPU and a GPU build of ggml (``PRIMA_GPU=cuda scripts/setup``); prints
one line per check and a summary, exits 1 if any target is missed. ``--gpu CPU`` runs the same
with the CPU standing in for the GPU (llama.cpp then computes on the CPU too), which tests the
script, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from greedy import engine_greedy  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from prima_node import Model  # noqa: E402
from prima_node.default_model import default_model  # noqa: E402
from prima_node.engine.gpu import find_gpus  # noqa: E402
from prima_node.errors import PrimaError  # noqa: E402
from prima_node.reference import LlamaCpp  # noqa: E402
from prima_node.synth.writer import write_model  # noqa: E402

RELATIVE = 1e-3  # of the largest logit: GPU kernels round differently from run to run shapes
GEN = 32
N_CTX = 256
SECRET = "gpu-check-secret"


def conformance(path: Path, gpu: str, layers: int, n_layer: int) -> dict[str, Any]:
    """Our logits with ``layers`` on the GPU against llama.cpp offloading the same."""
    with Model.open(path, n_ctx=N_CTX) as m:
        prompt = [int(t) for t in np.random.default_rng(7).integers(1, m.n_vocab, 40)]
    ours_t, ours = engine_greedy(path, prompt, GEN, threads=os.cpu_count() or 1, n_ctx=N_CTX,
                                 repack=False, gpu=gpu, gpu_layers=layers)
    offload = layers + (layers == n_layer)  # llama.cpp's output layer comes after the last
    with LlamaCpp(path, n_ctx=N_CTX, threads=os.cpu_count() or 1, gpu_layers=offload) as ref:
        theirs_t, theirs = ref.greedy(prompt, GEN)
    steps = min(len(ours), len(theirs))
    worst = max(float(np.abs(ours[i] - theirs[i]).max() / np.abs(theirs[i]).max())
                for i in range(steps))
    ok = worst <= RELATIVE and ours_t == theirs_t
    return {"model": path.name, "gpu_layers": layers, "worst_relative": worst,
            "tokens_equal": ours_t == theirs_t, "ok": ok}


def bench(path: Path, gpu: str, quick: bool) -> dict[str, Any]:
    from prima_node.bench import run_bench

    r = run_bench(path, threads=os.cpu_count() or 1, repeats=2 if quick else 6, gpu=gpu,
                  gpu_layers="all", prompt_tokens=512, gen_tokens=64)
    decode_ok = r.decode_ratio is not None and r.decode_ratio <= 1.05
    prefill_ok = r.prefill_ratio is not None and 1 / r.prefill_ratio >= 0.95
    return {"model": path.name, "ours_decode_ms": r.engine_decode_ms,
            "llama_decode_ms": r.llama_decode_ms, "decode_ratio": r.decode_ratio,
            "ours_prefill_tok_s": r.engine_prefill_tok_s,
            "llama_prefill_tok_s": r.llama_prefill_tok_s, "prefill_ratio": r.prefill_ratio,
            "ok": decode_ok and prefill_ok}


def _answer(srv: ServerProcess, prompt: str) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": GEN, "temperature": 0}
    status, raw = srv.post("/v1/completions", body, timeout=300)
    if status != 200:
        raise RuntimeError(f"{srv.url}: {status} {raw[:300]!r}")
    return json.loads(raw)["choices"][0]["text"]  # type: ignore[no-any-return]


def ring(path: Path, gpu: str, scratch: Path) -> dict[str, Any]:
    """A worker with its windows on the GPU, a head on the CPU: the lone node's answer."""
    os.environ["PRIMA_PROFILE_CACHE"] = str(scratch / "profiles")
    prompt = "The kitchen lights are on and the heating is set to"
    alone = ServerProcess(path, scratch / "alone", ctx=N_CTX, threads=None,
                          extra=("--gpu", "none"))
    alone.start().wait_ready()
    try:
        want = _answer(alone, prompt)
    finally:
        alone.stop()
    worker = ServerProcess(path, scratch / "worker", ctx=N_CTX, threads=None,
                           extra=("--cluster-secret", SECRET, "--gpu", gpu,
                                  "--name", "gpu-node")).start()
    head = None
    try:
        worker.wait_ready()
        head = ServerProcess(path, scratch / "head", ctx=N_CTX, threads=None,
                             extra=("--cluster-secret", SECRET, "--head", "--all-nodes",
                                    "--gpu", "none", "--name", "cpu-head",
                                    "--peer", f"127.0.0.1:{worker.port}"))
        head.start().wait_ready(timeout=600)
        got = _answer(head, prompt)
        nodes = head.status()["cluster"]["nodes"]
        gpu_layers = {n["name"]: n["gpu_layers"] for n in nodes}
        on_gpu = sum(gpu_layers.values())
        return {"model": path.name, "answer_equal": got == want, "gpu_layers": gpu_layers,
                "ok": got == want and on_gpu > 0, "answer": got, "alone": want}
    finally:
        for srv in (head, worker):
            if srv is not None:
                srv.stop()


def _trained_model() -> Path | None:
    """SmolLM2 (a real trained model) where it is installed; a GPU machine reached through the
    kit (scripts/gpu-kit) has no room for its 94 MiB, and the checks run on the synthetic
    models alone, as printed."""
    try:
        return default_model()
    except PrimaError as exc:
        print(f"gpu-check: the trained model is left out: {exc}", flush=True)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gpu", default=None, help="ggml's name of the GPU (default: the first)")
    ap.add_argument("--quick", action="store_true", help="fewer models and rounds")
    ap.add_argument("--json", default=None, help="write the results here too")
    a = ap.parse_args()
    gpus = find_gpus()
    gpu = a.gpu or (gpus[0].name if gpus else None)
    if gpu is None:
        print("gpu-check: this build of ggml has no GPU backend (PRIMA_GPU=cuda scripts/setup)",
              file=sys.stderr)
        return 2
    print(f"gpu-check on {gpu}: " + ", ".join(f"{g.name} {g.description}" for g in gpus),
          flush=True)
    results: dict[str, list[dict[str, Any]]] = {"conformance": [], "bench": [], "ring": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        scratch = Path(tmp)
        models = [write_model(scratch / f"{arch}-{preset}-{q}.gguf", arch=arch, preset=preset,
                              quant=q, seed=0)
                  for arch, preset, q in ([("llama", "small", "Q8_0")] if a.quick else
                                          [("llama", "small", "Q8_0"), ("qwen2", "small", "F16"),
                                           ("qwen3", "small", "Q4_K_M"),
                                           ("llama", "tiny", "Q4_K_M")])]
        trained = _trained_model()
        models += [trained] if trained else []
        for path in models:
            with Model.open(path, n_ctx=N_CTX) as m:
                n_layer = m.config.n_layer
            for layers in (n_layer, n_layer // 2):
                r = conformance(path, gpu, layers, n_layer)
                results["conformance"].append(r)
                print(f"conformance {path.name} gpu_layers={layers}: worst "
                      f"{r['worst_relative']:.1e} of the largest logit, tokens "
                      f"{'equal' if r['tokens_equal'] else 'DIFFER'}: "
                      f"{'ok' if r['ok'] else 'MISSED'}", flush=True)
        big = write_model(scratch / "llama-1b-Q4_K_M.gguf", arch="llama", preset="1b",
                          quant="Q4_K_M", seed=0)
        for path in ([big] if a.quick or trained is None else [big, trained]):
            t0 = time.perf_counter()
            r = bench(path, gpu, a.quick)
            results["bench"].append(r)
            print(f"bench {path.name} all layers on the GPU: decode {r['ours_decode_ms']:.2f} "
                  f"vs llama.cpp {r['llama_decode_ms']:.2f} ms/token (x{r['decode_ratio']:.3f}, "
                  f"target <= 1.05), prefill {r['ours_prefill_tok_s']:.0f} vs "
                  f"{r['llama_prefill_tok_s']:.0f} tokens/s (target >= 0.95x): "
                  f"{'ok' if r['ok'] else 'MISSED'} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        r = ring(models[0], gpu, scratch)
        results["ring"].append(r)
        print(f"ring {r['model']}: GPU layers {r['gpu_layers']}, answer "
              f"{'equal to' if r['answer_equal'] else 'DIFFERS from'} the lone node's: "
              f"{'ok' if r['ok'] else 'MISSED'}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    missed = [k for k, rows in results.items() for r in rows if not r["ok"]]
    print("gpu-check: " + ("every target met" if not missed else f"missed: {missed}"))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
