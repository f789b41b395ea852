"""A node's own memory: what a head and a worker process hold besides the model's pages.

Every MiB a node keeps for itself is a MiB of page cache its weights lose on a memory-poor
device, so this starts a real two-node ring on loopback (``prima-node serve``, a worker then a
head, each with its own state directory), sends one chat request with a long prompt through the
head's OpenAI API, and reads each process's memory from /proc: RssAnon (heap, stacks, ggml's
buffers, KV cache pages written so far: the node's own memory), RssFile (file pages mapped in,
mostly weights: shared with the page cache, not the node's) and VmRSS.

    .venv/bin/python benchmarks/bench_node_memory.py [--model FILE] [--ctx 4096]

Without --model it writes the 1b preset (Llama-3.2-1B shapes, Q4_K_M) to the cache directory.
prima.cpp's node process held about 34 MiB on the same kind of machine (shared perf-notes).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

from prima_node.demo import NodeProcess, _get, stream_chat, wait_ready

MiB = 1 << 20


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prompt-words", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=None,
                    help="force k rounds (k = 8 on the 1b: each node holds half the layers)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from prima_node.synth.writer import write_model

        model = Path.home() / ".cache" / "prima" / "bench" / "llama-1b-Q4_K_M.gguf"
        if not model.exists():
            model.parent.mkdir(parents=True, exist_ok=True)
            print(f"writing {model}", file=sys.stderr)
            write_model(model, "llama", "1b", "Q4_K_M")
    secret = secrets.token_hex(16)
    nodes: list[NodeProcess] = []
    with tempfile.TemporaryDirectory(prefix="prima-mem-") as state:
        common = ["serve", "--model", str(model), "--port", "0", "--ctx", str(args.ctx),
                  "--threads", "1", "--no-discovery", "--cluster-secret", secret]
        try:
            worker = NodeProcess("worker", [*common, "--state-dir", f"{state}/w"])
            nodes.append(worker)
            worker.wait_listening(180)
            wait_ready(worker)
            idle_worker = memory(worker.proc.pid)
            rounds = ["--rounds", str(args.rounds)] if args.rounds else []
            head = NodeProcess("head", [*common, "--state-dir", f"{state}/h", "--head",
                                        "--all-nodes", "--peer", f"127.0.0.1:{worker.port}",
                                        *rounds])
            nodes.insert(0, head)
            head.wait_listening(180)
            wait_ready(head)
            idle = {"head": memory(head.proc.pid), "worker": memory(worker.proc.pid)}
            prompt = " ".join(["the kitchen light and the porch light are on"] *
                              (args.prompt_words // 9))
            t0 = time.perf_counter()
            for _ in stream_chat(head.url, prompt, 16):
                pass
            took = time.perf_counter() - t0
            after = {"head": memory(head.proc.pid), "worker": memory(worker.proc.pid)}
            status = _get(f"{head.url}/api/status")[1]
        finally:
            for n in nodes:
                n.stop()
    layers = {}
    for n in (status.get("cluster") or {}).get("nodes", []):
        layers[n.get("role")] = n.get("layer_count")
    print(f"model {model.name} ({model.stat().st_size / MiB:.0f} MiB), context {args.ctx}, "
          f"prompt of ~{args.prompt_words} words answered in {took:.1f} s")
    print(f"{'node':8}{'layers':>8}{'state':>12}{'RssAnon MiB':>14}{'RssFile MiB':>14}"
          f"{'VmHWM MiB':>12}")
    print(f"{'worker':8}{'-':>8}{'idle, alone':>12}{idle_worker['RssAnon'] / MiB:>14.1f}"
          f"{idle_worker['RssFile'] / MiB:>14.1f}{idle_worker['VmHWM'] / MiB:>12.1f}")
    for role in ("head", "worker"):
        for label, doc in (("idle", idle), ("answered", after)):
            m = doc[role]
            print(f"{role:8}{layers.get(role, '?')!s:>8}{label:>12}{m['RssAnon'] / MiB:>14.1f}"
                  f"{m['RssFile'] / MiB:>14.1f}{m['VmHWM'] / MiB:>12.1f}")
    print(json.dumps({"idle": idle, "answered": after, "layers": layers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
