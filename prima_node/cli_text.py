"""``prima-node generate`` and ``prima-node chat``: the text layer from a terminal.

Both stream the answer as it is generated and then report the figures people compare engines by
(prefill tokens/s, decode ms/token), so the CLI doubles as a quick end-to-end check of a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .generate import Finished, GenerationOptions, Generator

DEFAULT_PROMPT = "Write one sentence about the rooms of a house."


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, installed by "
                                    "scripts/setup)")
    p.add_argument("--threads", type=int, default=None, help="default: every CPU allowed")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    add_gpu_args(p)


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    from .engine.gpu import parse_gpu_layers

    def layers(text: str) -> int | str:
        try:
            return parse_gpu_layers(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    p.add_argument("--gpu-layers", type=layers, default=0, metavar="N|all|auto",
                   help="the first N layers on the GPU (all: every layer and the output; "
                   "auto: as many as fit in its free memory); needs a GPU build "
                   "(docs/install.md)")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="which GPU, by ggml's name (CUDA0, MTL0, Vulkan0; default: the first; "
                   "none: the CPU only, whatever the build has)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (llama.cpp's defaults; --temperature 0 is greedy)")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40, help="0 disables")
    g.add_argument("--top-p", type=float, default=0.95, help="1 disables")
    g.add_argument("--min-p", type=float, default=0.05, help="0 disables")
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable; -inf bans it)")
    g.add_argument("--seed", type=int, default=None, help="same seed + settings = same output")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--json-schema", metavar="FILE",
                   help="constrain the answer to JSON valid against this schema")
    g.add_argument("--json-mode", action="store_true", help="constrain the answer to a JSON object")


def _logit_bias(items: list[str]) -> dict[int, float]:
    bias: dict[int, float] = {}
    for item in items:
        tid, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            bias[int(tid)] = float(value)
        except ValueError:
            raise ValueError(
                f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 42=-inf") from None
    return bias


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def options_from_args(args: argparse.Namespace) -> GenerationOptions:
    from .generate import GenerationOptions
    from .text.sampler import SamplingParams

    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        logit_bias=_logit_bias(args.logit_bias), seed=args.seed)
    schema = _read_json(args.json_schema, "JSON schema") if args.json_schema else None
    if schema is not None and not isinstance(schema, dict):
        raise ValueError(f"the JSON schema in {args.json_schema} must be an object")
    return GenerationOptions(sampling=sampling, max_tokens=args.max_tokens,
                             stop=tuple(args.stop), json_schema=schema,
                             json_mode=args.json_mode)


def open_generator(args: argparse.Namespace, demo: Callable[[], Path]) -> Generator:
    from .generate import Generator

    path = Path(args.model) if args.model else demo()
    gen = Generator.open(path, threads=args.threads, n_ctx=args.ctx, gpu=args.gpu,
                         gpu_layers=args.gpu_layers)
    gen.executor.warm_up()
    return gen


def _print_stats(fin: Finished, out: TextIO) -> None:
    t = fin.timings
    cached = f", {t.cached_tokens} from cache" if t.cached_tokens else ""
    print(f"[prompt {t.prompt_tokens} tokens{cached}: {t.prefill_tokens_per_s:.1f} tokens/s | "
          f"answer {t.completion_tokens} tokens: {t.decode_ms_per_token:.1f} ms/token | "
          f"first token after {1e3 * t.first_token_s:.0f} ms | finish: {fin.finish_reason} | "
          f"seed {fin.seed}]", file=out, flush=True)


def _stream(gen: Generator, ids: list[int], opts: GenerationOptions, out: TextIO | None,
            text: list[str] | None = None
            ) -> tuple[str, list[dict[str, Any]], Finished | None]:
    """Run one generation, echoing deltas to ``out``; the text, the calls and the end event.

    Text is also appended to ``text`` as it comes, so an interrupted answer keeps what was said.
    """
    from .generate import Finished, ReasoningDelta, TextDelta, ToolCall

    text = [] if text is None else text
    calls: list[dict[str, Any]] = []
    fin: Finished | None = None
    events = gen.generate(ids, opts)
    try:
        for ev in events:
            if isinstance(ev, TextDelta):
                text.append(ev.text)
                if out is not None:
                    out.write(ev.text)
                    out.flush()
            elif isinstance(ev, ReasoningDelta):  # the model's thinking: on stderr, so that
                if out is not None:                # what it says stays apart on stdout
                    sys.stderr.write(ev.text)
                    sys.stderr.flush()
            elif isinstance(ev, ToolCall):
                calls.append({"id": ev.id, "type": "function",
                              "function": {"name": ev.name, "arguments": ev.arguments}})
                if out is not None:
                    out.write(f"\n[tool call {ev.name}({ev.arguments})]\n")
            elif isinstance(ev, Finished):
                fin = ev
    finally:
        events.close()  # type: ignore[attr-defined]
    return "".join(text), calls, fin


def _messages_from(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Messages and tools from --messages (a list, or {"messages": [...], "tools": [...]})."""
    tools: list[dict[str, Any]] = []
    if args.messages:
        doc = _read_json(args.messages, "messages file")
        if isinstance(doc, dict):
            messages, tools = doc.get("messages"), doc.get("tools") or []
        else:
            messages = doc
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{args.messages}: expected a list of messages or an object with "
                             "'messages' (and optionally 'tools')")
    else:
        messages = [{"role": "user", "content": args.prompt or DEFAULT_PROMPT}]
    if args.tools:
        tools = _read_json(args.tools, "tools file")
        if not isinstance(tools, list):
            raise ValueError(f"{args.tools}: expected a list of tools in OpenAI's shape")
    if args.system:
        messages = [{"role": "system", "content": args.system},
                    *[m for m in messages if m.get("role") != "system"]]
    return messages, tools


def cmd_generate(args: argparse.Namespace, demo: Callable[[], Path]) -> int:
    import dataclasses

    # every option is checked before the model loads (which can take a minute the first time)
    if args.prompt is not None and args.messages:
        raise ValueError("give either --prompt or --messages, not both")
    if args.raw and (args.messages or args.system or args.tools):
        raise ValueError("--raw takes a --prompt only (no messages, system or tools)")
    messages, tools = _messages_from(args)
    if args.tool_choice != "auto" and not tools:
        raise ValueError(f"--tool-choice {args.tool_choice} needs tools (--tools or --messages)")
    opts = options_from_args(args)
    with open_generator(args, demo) as gen:
        if args.raw:
            ids = gen.text_prompt(args.prompt or DEFAULT_PROMPT)
            opts = dataclasses.replace(opts, continuation=True)
            how = "no chat template (--raw)"
        else:
            ids = gen.chat_prompt(messages, tools=tools or None)
            how = f"{gen.template.name} chat template"
            fmt = gen.template.tool_format
            if tools and fmt is None:
                print("warning: this model's chat template has no tool-call syntax: the tools "
                      "were given to the template, but calls cannot be recognised in the answer",
                      file=sys.stderr)
            if fmt == "harmony":  # answers in channels: the reasoning kept apart
                opts = dataclasses.replace(opts, tool_format=fmt, tools_offered=bool(tools))
            if tools and fmt is not None:
                opts = dataclasses.replace(opts, tool_format=fmt)
                if args.tool_choice != "auto":
                    from .text.tool_grammar import tool_call_grammar

                    name = None if args.tool_choice == "required" else args.tool_choice
                    opts = dataclasses.replace(opts, grammar=tool_call_grammar(
                        fmt, tools, gen.tokenizer, name=name))
        if not args.json:
            print(f"[{gen.path.name}: {how}; {len(ids)} prompt tokens]", file=sys.stderr,
                  flush=True)
        text, calls, fin = _stream(gen, ids, opts, None if args.json else sys.stdout)
        assert fin is not None
        if args.json:
            print(json.dumps({
                "model": str(gen.path), "text": text, "tool_calls": calls,
                "finish_reason": fin.finish_reason, "seed": fin.seed,
                "timings": fin.timings.as_dict()}, ensure_ascii=False))
        else:
            print()
            _print_stats(fin, sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace, demo: Callable[[], Path],
             stdin: TextIO | None = None) -> int:
    """Interactive chat: history kept (and its KV cache reused), Ctrl-C stops the answer."""
    from .errors import PrimaError

    stdin = stdin or sys.stdin
    tty = stdin.isatty()
    opts = options_from_args(args)
    with open_generator(args, demo) as gen:
        base: list[dict[str, Any]] = []
        if args.system:
            base.append({"role": "system", "content": args.system})
        history = list(base)
        print(f"chatting with {gen.path.name if gen.path else 'the model'} "
              f"({gen.template.name} template). Ctrl-C stops an answer, Ctrl-D quits, "
              "/reset forgets the conversation.", file=sys.stderr, flush=True)
        while True:
            try:
                if tty:
                    line = input("> ")
                else:
                    sys.stdout.write("> ")
                    sys.stdout.flush()
                    raw = stdin.readline()
                    if not raw:
                        raise EOFError
                    line = raw.rstrip("\n")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.strip() == "/reset":
                history = list(base)
                gen.clear()
                print("[conversation forgotten]", file=sys.stderr, flush=True)
                continue
            history.append({"role": "user", "content": line})
            text_parts: list[str] = []
            try:
                ids = gen.chat_prompt(history)
                _text, _calls, fin = _stream(gen, ids, opts, sys.stdout, text_parts)
                print()
                if fin is not None:
                    _print_stats(fin, sys.stderr)
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr, flush=True)
            except (PrimaError, ValueError) as exc:  # e.g. beyond the context: keep chatting
                history.pop()
                print(f"[{exc}; /reset forgets the conversation]", file=sys.stderr, flush=True)
                continue
            history.append({"role": "assistant", "content": "".join(text_parts)})
