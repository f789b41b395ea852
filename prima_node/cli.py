"""The ``prima-node`` command line.

Errors a user can act on (a bad model file, a bad option) print one line and exit with status 2;
only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .errors import PrimaError


def _progress(label: str) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr (no dependency, quiet when not a terminal)."""
    tty = sys.stderr.isatty()

    def update(done: int, total: int) -> None:
        if not tty and done != total:
            return
        width = 30
        fill = width * done // max(1, total)
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r{label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}{end}")
        sys.stderr.flush()

    return update


def cmd_make_model(args: argparse.Namespace) -> int:
    from .synth.writer import write_model

    t0 = time.perf_counter()
    out = write_model(args.out, arch=args.arch, preset=args.preset, quant=args.quant,
                      seed=args.seed, vocab=args.vocab, n_layer=args.layers,
                      progress=_progress(f"writing {Path(args.out).name}"))
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB, {args.arch} {args.preset} {args.quant}, "
          f"{args.vocab} vocabulary, random weights) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    result = run_bench(args.model, threads=args.threads, prompt_tokens=args.prompt_tokens,
                       gen_tokens=args.gen_tokens, repeats=args.repeats,
                       with_llama=not args.no_llama, log=log, gpu=args.gpu,
                       gpu_layers=args.gpu_layers)
    print(result.to_json() if args.json else format_table(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .cli_text import cmd_generate as run

    return run(args, _demo_model)


def cmd_chat(args: argparse.Namespace) -> int:
    from .cli_text import cmd_chat as run

    return run(args, _demo_model)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    model = Path(args.model) if args.model else _demo_model()
    return run_demo(model, nodes=args.nodes, prompt=args.prompt, max_tokens=args.max_tokens,
                    ctx=args.ctx, threads=args.threads)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.serve import cmd_serve as run

    return run(args, Path(args.model) if args.model else _demo_model())


def cmd_model_profile(args: argparse.Namespace) -> int:
    import json

    from .planner.model_profile import ModelProfile, from_published

    if (args.model is None) == (args.published is None):
        raise ValueError("give a GGUF file (or a profile JSON) or --published NAME")
    profile = (from_published(args.published, args.quant) if args.published
               else ModelProfile.load(args.model))
    if args.json:
        print(json.dumps(profile.to_json(), indent=1))
        return 0
    gb = 1e9
    weights = profile.to_json()["summary"]["weights_bytes"]
    print(f"{profile.name} ({profile.architecture}, {profile.quant}, {profile.source})")
    print(f"  weights {weights / gb:.2f} GB: {profile.n_layer} layers of "
          f"{profile.mean_layer_bytes / 1e6:.1f} MB on average, embedding "
          f"{profile.embedding_bytes / 1e6:.1f} MB ({profile.embedding_type}), output "
          f"{profile.output_bytes / 1e6:.1f} MB")
    layer = profile.layers[0]
    mix = ", ".join(f"{t} {b / 1e6:.1f} MB" for t, b in layer.bytes_by_type.items())
    print(f"  layer 0: {mix}; {layer.flops / 1e9:.2f} GFLOP per token")
    kv = profile.kv_bytes_per_layer(args.ctx)
    print(f"  KV cache (f16) for {args.ctx} positions: {kv / 1e6:.1f} MB per layer, "
          f"{kv * profile.n_layer / gb:.2f} GB in all")
    print(f"  per ring hop and token: {profile.activation_bytes(4)} bytes (float32 hidden state)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from . import ggml
    from .device.profile import profile_device
    from .engine.gpu import find_gpus, no_gpu_reason

    gpus = find_gpus()
    gpu = args.gpu if args.gpu is not None else gpus[0].name if gpus else None
    prof = profile_device(args.model, threads=args.threads, refresh=args.refresh,
                          cache_dir=Path(os.environ.get("PRIMA_PROFILE_CACHE") or
                                         Path.home() / ".cache" / "prima" / "profiles"),
                          progress=_progress("profiling this device"),
                          gpu=None if gpu == "none" else gpu)
    if args.json:
        print(json.dumps(prof.to_json(), indent=1))
        return 0
    gb = 1e9
    mem = prof.memory
    print(f"{prof.name}: {prof.os} {prof.machine}, {prof.cpu}, {prof.cores} cores "
          f"({prof.threads} threads used)")
    print(f"  memory: {mem['available'] / gb:.2f} GB available of {mem['total'] / gb:.2f} GB "
          f"({mem['source']}), swap {mem['swap_free'] / gb:.2f} GB free")
    print(f"  memory read: {prof.memory_read_gbps:.1f} GB/s")
    if prof.disk:
        d = prof.disk
        print(f"  disk under the model: {d['sequential_bytes_per_s'] / 1e6:.0f} MB/s sequential, "
              f"{d['random_bytes_per_s'] / 1e6:.0f} MB/s random {d['random_block']} B reads "
              "(cold)")
    for t, k in prof.kernels.items():
        print(f"  {t:6s} decode {k['decode_flops'] / gb:6.1f} GFLOP/s   prefill "
              f"{k['prefill_flops'] / gb:6.1f} GFLOP/s")
    if prof.layer_decode:
        ld = prof.layer_decode
        print(f"  a real layer of the model: {ld['measured_s'] * 1e3:.2f} ms a token, "
              f"{ld['measured_s'] / ld['kernel_s']:.2f}x what the kernels alone price (the "
              "planner scales their speeds by this)")
    for d in prof.gpu.get("devices") or []:
        print(f"  GPU {d['name']} ({d['backend']}): {d['description']}, "
              f"{d['vram_free'] / gb:.2f} GB free of {d['vram_total'] / gb:.2f} GB"
              f"{', unified with the host' if d['unified'] else ''}; a token's hidden state "
              f"to it and back {d['copy_s_per_token'] * 1e6:.0f} us")
        for t, k in d["kernels"].items():
            print(f"    {t:6s} decode {k['decode_flops'] / gb:6.1f} GFLOP/s   prefill "
                  f"{k['prefill_flops'] / gb:6.1f} GFLOP/s")
    if not prof.gpu.get("devices"):
        print("  GPU: none" + ("" if gpus else f" ({no_gpu_reason(ggml.load().backends())})"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .planner.cluster_file import load_cluster
    from .planner.halda import Options, PlanError, plan
    from .planner.model_profile import ModelProfile
    from .planner.plan_table import plan_table

    cluster = load_cluster(args.profiles)
    model = ModelProfile.load(args.model)
    if args.head is not None:
        names = [d.name for d in cluster.devices]
        if args.head not in names:
            raise ValueError(f"--head {args.head!r} is not one of the devices "
                             f"({', '.join(names)})")
        cluster.head = args.head
    opts = Options(n_ctx=args.ctx, k=args.k, head=cluster.head_index, n_kv=args.position)
    try:
        result = plan(cluster.devices, model, opts, cluster.links, cluster.default_link)
    except PlanError as exc:
        raise ValueError(f"no plan: {exc}") from None
    if args.json:
        doc = {"format": "prima-plan/1", "model": model.name, "quant": model.quant,
               "n_ctx": args.ctx, "position": opts.n_kv if opts.n_kv is not None
               else args.ctx // 2, **result.as_dict()}
        print(json.dumps(doc, indent=1))
        return 0
    print(plan_table(result, model, cluster, opts))
    return 0


def link_url(target: str) -> str:
    """HOST:PORT, http(s)://HOST:PORT or a ws(s):// URL -> the node's link probe URL."""
    from urllib.parse import urlsplit

    url = target if "://" in target else f"http://{target}"
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a node address: {target!r} (give HOST:PORT or a URL)")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/') or '/api/link'}"


def cmd_link(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from .device.link import measure_link

    url = link_url(args.node)
    if args.pings < 1:
        raise ValueError("--pings must be at least 1")
    key = args.api_key or os.environ.get("PRIMA_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    try:
        prof = asyncio.run(measure_link(url, headers=headers, pings=args.pings))
    except ConnectionError as exc:
        raise ValueError(str(exc)) from None
    if args.json:
        print(json.dumps(prof.to_json(), indent=1))
        return 0
    print(f"{url}: round trip {1e3 * prof.rtt_s:.3f} ms median ({1e3 * prof.rtt_min_s:.3f} "
          f"min over {prof.pings}), throughput {prof.bytes_per_s / 1e6:.0f} MB/s")
    for n_embd in (4096, 8192):
        print(f"  one token's float32 hidden state ({n_embd} wide) costs "
              f"{1e3 * prof.hop_s(4 * n_embd):.3f} ms per hop")
    return 0


def _demo_model() -> Path:
    """The model when none is named: the real SmolLM2-135M-Instruct that setup installs."""
    from .default_model import default_model

    return default_model()


DESCRIPTION = """\
Run language models on the devices of your home, alone or together as a cluster.

Start here:
  prima-node demo                        three nodes on this machine answer a question
  prima-node chat                        talk to the model in the terminal
  prima-node serve --head ...            serve an OpenAI-compatible API (Home Assistant)
Without --model, the commands use SmolLM2-135M-Instruct, which scripts/setup installs."""


def models_epilog() -> str:
    """Which models run: architectures and weight types (each checked against llama.cpp's
    results on the same file by tests/test_conformance.py)."""
    from .arch.spec import ARCHITECTURES
    from .quant_types import CHECKED_TYPES

    return (f"models: GGUF files of the architectures {', '.join(sorted(ARCHITECTURES))}, with\n"
            "weights of any of these types (each checked against llama.cpp: identical logits):\n"
            f"{', '.join(t.name for t in CHECKED_TYPES)}")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming it and where help is, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prima-node", description=DESCRIPTION, epilog=models_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_make_model, _add_bench, _add_generate, _add_chat, _add_profile,
                _add_model_profile, _add_plan, _add_link, _add_demo, _add_serve):
        add(sub)
    return p


def _add_make_model(sub: argparse._SubParsersAction[_Parser]) -> None:
    from .arch.spec import ARCHITECTURES
    from .synth.presets import PRESETS
    from .synth.writer import MAKE_TYPES

    mk = sub.add_parser("make-model", help="write a synthetic GGUF model (random weights)")
    mk.add_argument("out", help="output .gguf path")
    mk.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    mk.add_argument("--preset", choices=list(PRESETS), default="tiny",
                    help="tiny: a few MB; small: tens of MB; 1b: Llama-3.2-1B shapes")
    mk.add_argument("--quant", choices=list(MAKE_TYPES), default="F16",
                    help="file type, with llama.cpp's per-tensor mixture")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--vocab", choices=["bpe", "spm"], default="bpe",
                    help="bpe: byte-level BPE (Llama 3 / Qwen); spm: SentencePiece (Llama 2)")
    mk.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    mk.set_defaults(func=cmd_make_model)


def _add_bench(sub: argparse._SubParsersAction[_Parser]) -> None:
    from .bench import JSON_FIELDS
    from .cli_text import add_gpu_args

    fields = "\n".join(f"  {k}: {v}" for k, v in JSON_FIELDS.items())
    bn = sub.add_parser(
        "bench", help="decode/prefill speed vs llama.cpp and memory bandwidth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure this engine and llama.cpp at its default settings (when "
                    "llama_cpp is importable) on the same file and threads, taking turns in one "
                    "process.",
        epilog=f"--json fields:\n{fields}")
    bn.add_argument("--model", required=True)
    bn.add_argument("--threads", type=int, default=2)
    bn.add_argument("--prompt-tokens", type=int, default=128)
    bn.add_argument("--gen-tokens", type=int, default=32)
    bn.add_argument("--repeats", type=int, default=6,
                    help="rounds in which the engines take turns (ratios: their median)")
    bn.add_argument("--no-llama", action="store_true", help="skip the llama.cpp reference")
    add_gpu_args(bn)
    bn.add_argument("--json", action="store_true", help="print one JSON object")
    bn.set_defaults(func=cmd_bench)


def _add_generate(sub: argparse._SubParsersAction[_Parser]) -> None:
    from .cli_text import add_model_args, add_sampling_args

    gen = sub.add_parser(
        "generate", help="answer one prompt or conversation (single node), then show speed",
        description="Render the prompt with the model's chat template, stream the answer, then "
                    "print prefill tokens/s, decode ms/token and token counts.")
    add_model_args(gen)
    src = gen.add_argument_group("input")
    src.add_argument("--prompt", help="the user's message (default: a short demo question)")
    src.add_argument("--messages", metavar="FILE.json",
                     help="a conversation: a list of OpenAI-style messages, or "
                          "{\"messages\": [...], \"tools\": [...]}")
    src.add_argument("--system", help="system prompt (replaces any in --messages)")
    src.add_argument("--tools", metavar="FILE.json", help="tools in OpenAI's shape")
    src.add_argument("--tool-choice", default="auto", metavar="auto|required|NAME",
                     help="auto: the model decides; required / a tool's name: the answer is "
                          "constrained to one call (of that tool)")
    src.add_argument("--raw", action="store_true",
                     help="no chat template: the prompt is continued as plain text")
    add_sampling_args(gen)
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, tool_calls, finish_reason, timings)")
    gen.set_defaults(func=cmd_generate)


def _add_chat(sub: argparse._SubParsersAction[_Parser]) -> None:
    from .cli_text import add_model_args, add_sampling_args

    chat = sub.add_parser("chat", help="interactive chat in the terminal (single node)",
                          description="History is kept and its KV cache reused; Ctrl-C stops "
                                      "the current answer, Ctrl-D quits, /reset forgets.")
    add_model_args(chat)
    chat.add_argument("--system", help="system prompt")
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)


def _add_profile(sub: argparse._SubParsersAction[_Parser]) -> None:
    pf = sub.add_parser(
        "profile", help="measure this device for the planner (cached; memory read afresh)",
        description="Kernel speed per weight type the model uses, memory bandwidth, the disk "
                    "under the model on cold data, available memory by the OS's rules.")
    pf.add_argument("--model", help="GGUF file (its weight types and its disk are measured)")
    pf.add_argument("--threads", type=int, default=None, help="default: every CPU allowed")
    pf.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    pf.add_argument("--json", action="store_true", help="print the exchange format")
    pf.add_argument("--gpu", default=None, metavar="NAME",
                    help="the GPU to measure, by ggml's name (default: the first; none: skip)")
    pf.set_defaults(func=cmd_profile)


def _add_model_profile(sub: argparse._SubParsersAction[_Parser]) -> None:
    mp = sub.add_parser(
        "model-profile", help="what a model costs per layer (bytes, FLOPs, KV cache), for plans",
        description="Read a GGUF file's tensor table (no weights are read), or compute the "
                    "profile of a published model's shapes quantised the way llama.cpp does.")
    mp.add_argument("model", nargs="?", help="GGUF file or a model profile JSON")
    mp.add_argument("--published", metavar="NAME",
                    help="a published model instead of a file, by name (llama3-70b, "
                         "qwen3-30b-a3b, gpt-oss-120b, ...; an unknown name lists them all)")
    mp.add_argument("--quant", help="file type for --published (default: the one people "
                                    "run it at, Q4_K_M or MXFP4_MOE for gpt-oss)")
    mp.add_argument("--ctx", type=int, default=4096, help="context for the KV-cache figures")
    mp.add_argument("--json", action="store_true", help="print the exchange format")
    mp.set_defaults(func=cmd_model_profile)


def _add_plan(sub: argparse._SubParsersAction[_Parser]) -> None:
    pl = sub.add_parser(
        "plan", help="plan a cluster with Halda: who holds which layers, k, predicted latency",
        description="Solve the layer-to-device assignment exactly for the devices in a cluster "
                    "file (measured profiles or hand-written ones; see examples/profiles) and a "
                    "model (a GGUF file or a model profile JSON; see examples/models).")
    pl.add_argument("--profiles", required=True, metavar="CLUSTER.json",
                    help="the devices and links (format prima-cluster/1, or a list of "
                         "prima-node profile --json outputs)")
    pl.add_argument("--model", required=True, metavar="M.gguf|PROFILE.json",
                    help="the model file, or its profile from prima-node model-profile --json")
    pl.add_argument("--ctx", type=int, default=4096, help="context length the KV cache holds")
    pl.add_argument("--k", type=int, default=None,
                    help="force the number of rounds (1 to the layer count; windows may differ "
                    "by a layer)")
    pl.add_argument("--head", default=None, help="the head device's name (default: the file's)")
    pl.add_argument("--position", type=int, default=None,
                    help="positions a token attends to, for the latency (default: half of --ctx)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)


def _add_link(sub: argparse._SubParsersAction[_Parser]) -> None:
    lk = sub.add_parser(
        "link", help="measure a ring hop to a node: round trip and throughput over a websocket",
        description="Connect to another node's link probe (GET /api/link) the way ring "
                    "activations travel and measure what the planner prices a hop with.")
    lk.add_argument("node", help="HOST:PORT or the node's URL")
    lk.add_argument("--api-key", help="the node's API key (default: $PRIMA_API_KEY)")
    lk.add_argument("--pings", type=int, default=20, help="round trips to time")
    lk.add_argument("--json", action="store_true", help="print the measurement as JSON")
    lk.set_defaults(func=cmd_link)


def _add_demo(sub: argparse._SubParsersAction[_Parser]) -> None:
    demo = sub.add_parser(
        "demo", help="start a cluster of nodes on this machine, answer a chat prompt, stop",
        description="Start --nodes node processes on 127.0.0.1 (workers, then a head with a "
                    "fresh cluster secret), print the plan Halda made (who holds which layers, "
                    "rounds, predicted time per token), stream an answer to the prompt through "
                    "the head's OpenAI API, print each node's timings, and stop every node (also "
                    "on Ctrl-C).")
    demo.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, installed "
                                      "by scripts/setup)")
    demo.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    demo.add_argument("--prompt", default="What is the capital of France? Answer in one "
                      "sentence.", help="the user's message")
    demo.add_argument("--max-tokens", type=int, default=48, help="longest answer (default 48)")
    demo.add_argument("--ctx", type=int, default=2048, help="context per node (default 2048)")
    demo.add_argument("--threads", type=int, default=1,
                      help="threads per node (default 1: the nodes share this machine)")
    demo.set_defaults(func=cmd_demo)


def _add_serve(sub: argparse._SubParsersAction[_Parser]) -> None:
    from .server.serve import add_serve_args

    srv = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API, alone or as a "
                      "cluster node",
        description="Listen at once, load the model in the background (GET /health is 503 "
                    "until it is ready), then answer /v1/chat/completions, /v1/completions, "
                    "/v1/models, /api/status, /api/events and /metrics. See docs/api.md. With "
                    "--cluster-secret the node joins a cluster: a worker by default, or the "
                    "head (--head --peer HOST:PORT ...), which plans the ring and serves the API.")
    add_serve_args(srv)
    srv.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PrimaError as exc:
        print(f"prima-node: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"prima-node: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
