"""The engine against llama.cpp on the issue's targets, in one table.

For each model (the real SmolLM2-135M-Instruct Q4_1, and the 1b preset, Llama-3.2-1B shapes, in
Q8_0 and Q4_K_M) and thread count (2 and 1), ``runs`` runs of ``prima-node bench``: in each,
the two engines take turns for ``rounds`` rounds in one process (llama.cpp at its default
settings, which repack K-quant weights), and the ratios are the median of the rounds' ratios.
Targets: decode <= 1.05x llama.cpp's ms/token, prefill >= 0.95x its tokens/s.

    .venv/bin/python benchmarks/bench_engine.py [--runs 3] [--rounds 6] [--threads 2 1]

The 1b files are written once to ~/.cache/prima/bench (a minute or two each).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prima_node.bench import BenchResult, run_bench
from prima_node.default_model import default_model

CACHE = Path.home() / ".cache" / "prima" / "bench"


def _preset(quant: str) -> Path:
    from prima_node.synth.writer import write_model

    path = CACHE / f"llama-1b-{quant}.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"writing {path}", file=sys.stderr, flush=True)
        write_model(path, "llama", "1b", quant)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--json", action="store_true", help="also print every result as JSON")
    args = ap.parse_args()
    models = {"SmolLM2-135M Q4_1": default_model(), "1b Q8_0": _preset("Q8_0"),
              "1b Q4_K_M": _preset("Q4_K_M")}
    rows: list[tuple[str, BenchResult]] = []
    for threads in args.threads:
        for name, path in models.items():
            for run in range(args.runs):
                print(f"{name}, {threads} thread(s), run {run + 1}/{args.runs}", file=sys.stderr,
                      flush=True)
                rows.append((name, run_bench(path, threads, repeats=args.rounds)))
    print(f"{'model':20}{'thr':>4}{'decode ms prima/llama':>24}{'ratio':>7}"
          f"{'prefill tok/s prima/llama':>28}{'ratio':>7}{'% of mem BW':>13}")
    for name, r in rows:
        assert r.llama_decode_ms is not None and r.llama_prefill_tok_s is not None
        print(f"{name:20}{r.threads:>4}{r.engine_decode_ms:>12.2f} / {r.llama_decode_ms:<9.2f}"
              f"{r.decode_ratio:>7.3f}{r.engine_prefill_tok_s:>14.1f} / "
              f"{r.llama_prefill_tok_s:<11.1f}{r.prefill_ratio:>7.3f}"
              f"{100 * r.bandwidth_fraction:>12.0f}%")
    if args.json:
        print(json.dumps([{"name": n, **json.loads(r.to_json())} for n, r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
