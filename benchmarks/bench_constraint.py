"""Per-token cost of sampling, with and without a JSON-schema constraint.

Sampling runs once per generated token, so it must stay small next to a decode step. This prints
µs/token of the sampler alone at 32k and 128k vocabularies for the usual settings, then, on a
real 32k vocabulary (a ``1b`` preset synthetic model, written once to the given directory), the
cost of constrained sampling (mask computation + accept, plus the budget look-ahead when a token
budget is given) next to unconstrained sampling and, if asked, a decode step of that model.

Logits are random (normal, std 2, like the synthetic models'), so a constrained document spends
most of its tokens inside strings, where nearly every token is allowed: the costliest masks.

    python benchmarks/bench_constraint.py [--dir /tmp/bench] [--tokens 300] [--decode]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from prima_node.text.constraint import JsonConstraint
from prima_node.text.sampler import Sampler, SamplingParams
from prima_node.text.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {  # an AI Task result: every basic type, bounded so it finishes
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 48},
        "temperature": {"type": "number", "minimum": -30, "maximum": 50},
        "people": {"type": "integer", "minimum": 0, "maximum": 20},
        "occupied": {"type": "boolean"},
        "mood": {"enum": ["calm", "busy", "party"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["title", "temperature", "people", "occupied", "mood", "tags"],
    "additionalProperties": False,
}

SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "default (k40 p.95 min-p.05 T.8)": SamplingParams(seed=1),
    "top-p .95 only (no top-k)": SamplingParams(seed=1, top_k=0, min_p=0.0),
    "default + penalties": SamplingParams(seed=1, repeat_penalty=1.1, presence_penalty=0.5,
                                          frequency_penalty=0.2),
    "full softmax (T=1, no cuts)": SamplingParams(seed=1, temperature=1.0, top_k=0, top_p=1.0,
                                                  min_p=0.0),
}


def _logits(n_vocab: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n_vocab) * 2.0).astype(np.float32) for _ in range(steps)]


def bench_sampler(n_vocab: int, steps: int) -> dict[str, float]:
    """Median µs per ``sample`` call for each setting."""
    xs = _logits(n_vocab, steps)
    out = {}
    for name, params in SETTINGS.items():
        s = Sampler(params, n_vocab)
        s.feed_prompt(list(range(100)))
        times = []
        for x in xs:
            t0 = time.perf_counter()
            s.sample(x)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e6
    return out


class _Wide:
    """A 128k vocabulary for timing the one-off compile: the real one plus joined pieces."""

    def __init__(self, tok: Tokenizer, n: int) -> None:
        self._tok = tok
        self.n_vocab = n
        self.eog_ids = tok.eog_ids
        rng = np.random.default_rng(0)
        base = [tok.token_bytes(i) for i in range(tok.n_vocab) if not tok.is_special(i)]
        extra = rng.integers(0, len(base), size=(n - tok.n_vocab, 2))
        self._extra = [base[a] + base[b] for a, b in extra]

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        if token_id < self._tok.n_vocab:
            return self._tok.token_bytes(token_id, special=special)
        return self._extra[token_id - self._tok.n_vocab]

    def is_special(self, token_id: int) -> bool:
        return token_id < self._tok.n_vocab and self._tok.is_special(token_id)

    def encode(self, text: str, *, add_special: bool = True,
               parse_special: bool = False) -> list[int]:
        return self._tok.encode(text, add_special=add_special, parse_special=parse_special)


def run_constrained(tok: Tokenizer, schema: dict[str, Any], xs: list[np.ndarray],
                    budget: int | None) -> tuple[list[float], list[float], int, bool]:
    """Sample a document; per-token time of sample() and of the constraint's own part."""
    c = JsonConstraint.compile(tok, schema, max_tokens=budget)
    s = Sampler(SamplingParams(seed=3, temperature=1.0), tok.n_vocab, c)
    total, own = [], []
    n = 0
    for x in xs:
        t0 = time.perf_counter()
        c.allowed()  # the mask (and the budget look-ahead); sample() reuses it
        t1 = time.perf_counter()
        t = s.sample(x)
        t2 = time.perf_counter()
        total.append(t2 - t0)
        own.append(t1 - t0)
        if t in tok.eog_ids:
            break
        n += 1
    return total, own, n, c.is_complete


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/bench_constraint", help="where to write the model")
    ap.add_argument("--tokens", type=int, default=300, help="tokens per measurement")
    ap.add_argument("--decode", action="store_true", help="also time the model's decode step")
    args = ap.parse_args()

    print("sampler alone, median µs/token (random logits)")
    rows = {n: bench_sampler(n, args.tokens) for n in (32_000, 128_256)}
    print(f"  {'setting':34s} {'32k':>9s} {'128k':>9s}")
    for name in SETTINGS:
        print(f"  {name:34s} {rows[32_000][name]:9.0f} {rows[128_256][name]:9.0f}")

    path = Path(args.dir) / "llama-1b-Q4_0-bpe.gguf"
    if not path.exists():
        from prima_node.synth.writer import write_model

        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...")
        write_model(path, arch="llama", preset="1b", quant="Q4_0", seed=0, vocab="bpe")
    tok = Tokenizer.open(path)
    t0 = time.perf_counter()
    JsonConstraint.compile(tok, SCHEMA)
    t_vocab = time.perf_counter() - t0
    t0 = time.perf_counter()
    JsonConstraint.compile(tok, {**SCHEMA, "description": "uncached"})
    t_schema = time.perf_counter() - t0
    t0 = time.perf_counter()
    JsonConstraint.compile(tok, SCHEMA)
    t_cached = time.perf_counter() - t0
    print(f"\n{tok.n_vocab}-token vocabulary: first compile (vocabulary + schema) "
          f"{t_vocab * 1e3:.0f} ms, a new schema {t_schema * 1e3:.2f} ms, "
          f"a cached schema {t_cached * 1e3:.3f} ms")

    t0 = time.perf_counter()
    JsonConstraint.compile(_Wide(tok, 128_256), SCHEMA)
    print(f"a 128k vocabulary (the 32k one plus joined pieces): first compile "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms")

    xs = _logits(tok.n_vocab, args.tokens, seed=5)
    free = Sampler(SamplingParams(seed=3, temperature=1.0), tok.n_vocab)
    plain = []
    for x in xs:
        t0 = time.perf_counter()
        free.sample(x)
        plain.append(time.perf_counter() - t0)
    med_plain, mean_plain = statistics.median(plain) * 1e6, statistics.mean(plain) * 1e6
    print(f"\nsampling (T=1, top-k 40, top-p .95, min-p .05), µs/token, median / mean; "
          f"unconstrained {med_plain:.0f} / {mean_plain:.0f}")
    print(f"  {'constrained document':34s} {'tokens':>6s} {'done':>5s} {'sample total':>13s} "
          f"{'constraint':>11s} {'x plain':>8s}")
    unbounded = json.loads(json.dumps(SCHEMA).replace('"maxLength"', '"x-maxLength"'))
    for label, schema, budget in (("bounded schema", SCHEMA, None),
                                  ("bounded schema, budget 150", SCHEMA, 150),
                                  ("unbounded strings, budget 150", unbounded, 150)):
        total, own, n, done = run_constrained(tok, schema, xs, budget)
        med, mean = statistics.median(total) * 1e6, statistics.mean(total) * 1e6
        omed, omean = statistics.median(own) * 1e6, statistics.mean(own) * 1e6
        print(f"  {label:34s} {n:6d} {done!s:>5s} {med:6.0f} / {mean:4.0f} "
              f"{omed:4.0f} / {omean:4.0f} {mean / mean_plain:8.1f}")

    if args.decode:
        from prima_node.engine.model import Model

        with Model.open(path, n_ctx=256) as m:
            ids = tok.encode("The kitchen light is")
            m.forward(ids)
            steps = []
            t = ids[-1]
            for _ in range(8):
                t0 = time.perf_counter()
                logits = m.forward([t])
                steps.append(time.perf_counter() - t0)
                t = int(np.argmax(logits))
        dec = statistics.median(steps) * 1e6
        total, _, _, _ = run_constrained(tok, SCHEMA, xs, None)
        print(f"\ndecode step of the model: {dec / 1e3:.1f} ms; per token, constrained "
              f"sampling is {statistics.mean(total) * 1e6 / dec * 100:.3f}% of it (mean), "
              f"unconstrained {mean_plain / dec * 100:.3f}%")


if __name__ == "__main__":
    main()
