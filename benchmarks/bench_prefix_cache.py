"""Time to first token of a long chat prompt, cold and with a warm prefix, next to llama.cpp.

Home Assistant resends the same long system prompt (instructions and the entity list, ~1500
tokens) with every turn and only the user's message changes, so what a voice user waits for is
the prefill of that prompt. The server keeps the previous request's KV cache and prefills only
the new suffix; this shows how much that saves, end to end, through a real ``prima-node serve``
and the official ``openai`` client, with llama.cpp (llama-cpp-python, which reuses the longest
common prefix of its previous input the same way) on the same file, tokens and thread count.

    .venv/bin/python benchmarks/bench_prefix_cache.py [--model M.gguf] [--threads 2]
        [--prompt-tokens 1500] [--repeats 3] [--no-llama] [--json]

Cold: the server is told ``cache_prompt: false`` (the whole prompt is evaluated); llama.cpp is
``reset()``. Warm: the same system prompt with a different user message, right after the cold
request. Cold and warm runs of both engines alternate, so machine noise hits both alike; the
best and the median of ``--repeats`` are reported, and the ratios are what matter.

Time to first token (TTFT) is measured by the client: from sending the request to the first
streamed chunk that carries text (the role-only chunk the server sends at once is not a token).
With random-weight models the first token may decode to no text (part of a UTF-8 character, an
end-of-generation token): the first chunk with text, a tool call or a finish reason counts then,
which can add one decode step; ``first_token_ms`` from the server's timings is reported too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prima_node.model_file import ModelFile
from prima_node.text.chat_template import ChatTemplate, load_chat_template
from prima_node.text.tokenizer import Tokenizer

BENCH_MODEL = Path.home() / ".cache" / "prima" / "bench" / "llama-1b-Q8_0.gguf"

INSTRUCTIONS = """\
You are a voice assistant for Home Assistant.
Answer questions about the world truthfully.
Answer in plain text. Keep it simple and to the point.
When controlling Home Assistant always call the intent tools. Use HassTurnOn to lock and \
HassTurnOff to unlock a lock. When controlling a device, prefer passing just name and domain. \
When controlling an area, prefer passing just area name and domain.
When a user asks to turn on all devices of a specific type, ask user to specify an area, \
unless there is only one device of that type.
This device is not able to start timers.
You are in area Living room (floor Ground floor) and all generic commands like 'turn on the \
lights' should target this area.
The current time is 18:42:07. Today's date is 2025-11-21.
Static Context: An overview of the areas and the devices in this smart home:
"""

AREAS = ["kitchen", "living_room", "bedroom", "office", "hallway", "garage", "bathroom",
         "garden", "dining_room", "basement", "attic", "porch", "kids_room", "guest_room",
         "laundry", "terrace"]

# (domain, object name, states): one line per area and kind, states cycling through the list
KINDS: list[tuple[str, str, list[str]]] = [
    ("light", "ceiling", ["on brightness 80%", "off", "on brightness 35%"]),
    ("light", "lamp", ["off", "on brightness 100% color_temp 2700K"]),
    ("sensor", "temperature", ["21.4 °C", "19.8 °C", "23.1 °C"]),
    ("sensor", "humidity", ["48 %", "55 %", "61 %"]),
    ("binary_sensor", "motion", ["off", "on"]),
    ("cover", "blinds", ["open position 100%", "closed", "open position 40%"]),
    ("switch", "socket", ["on power 12.5 W", "off"]),
    ("climate", "thermostat", ["heat target 21 °C current 20.5 °C", "off"]),
    ("media_player", "speaker", ["idle volume 30%", "playing volume 45%", "off"]),
    ("binary_sensor", "window", ["off", "on"]),
    ("lock", "door", ["locked", "unlocked"]),
    ("fan", "fan", ["off", "on speed 50%"]),
]

USER_MESSAGES = [
    "Turn on the kitchen ceiling light.",
    "What is the temperature in the office?",
    "Close the blinds in the bedroom please.",
    "Is the garage door locked?",
    "Set the living room thermostat to 22 degrees.",
    "Turn off all the lights in the basement.",
    "How humid is it in the bathroom right now?",
    "Play some music on the dining room speaker.",
    "Is there any motion in the hallway?",
    "Dim the porch lamp to thirty percent.",
    "Open the terrace blinds halfway.",
    "Is the attic window open?",
]

WARMUP = ("You are a voice assistant for Home Assistant.", "Hello!")

JSON_FIELDS = {
    "model": "path of the GGUF file",
    "threads": "compute threads of both engines",
    "prompt_tokens": "tokens of the rendered cold prompt (system prompt + user message)",
    "prompt_tokens_range": "shortest and longest prompt of the run (user messages differ)",
    "token_count_mismatches": "requests whose usage.prompt_tokens differ from this script's "
                              "count (rendering or tokenisation differs: should be empty)",
    "shared_prefix_tokens": "per repeat, tokens the cold and the warm prompts have in common",
    "cache_misses": "warm runs that took fewer tokens from the cache than were shared",
    "repeats": "timed cold/warm pairs per engine",
    "prima": "this project's server: per run and summary figures (ms)",
    "llama": "llama.cpp (llama-cpp-python) in this process; null without it",
    "ratio_cold": "prima cold TTFT / llama.cpp cold TTFT (best runs; lower is better)",
    "ratio_warm": "prima warm TTFT / llama.cpp warm TTFT (best runs; lower is better)",
}


# -- the prompt ---------------------------------------------------------------------------------


def _entity_lines() -> list[str]:
    """Deterministic entity lines, varied enough that they do not compress into a few tokens."""
    lines = []
    for i, (kind, area) in enumerate(itertools.product(KINDS, AREAS)):
        domain, obj, states = kind
        entity = f"{domain}.{area}_{obj}"
        name = f"{area.replace('_', ' ').capitalize()} {obj.replace('_', ' ')}"
        lines.append(f"{entity} '{name}' {states[i % len(states)]}")
    # interleave domains, as an exposed-entity list sorted by area would be
    lines.sort(key=lambda s: (s.split(".", 1)[1].split("_")[0], s))
    return lines


def _system_prompt(lines: list[str], n: int) -> str:
    return INSTRUCTIONS + "\n".join(lines[:n]) + "\n"


def _messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass
class Prompt:
    system: str
    ids: dict[str, list[int]]  # user message -> rendered prompt ids


def build_prompt(template: ChatTemplate, tok: Tokenizer, target: int,
                 users: list[str]) -> Prompt:
    """The system prompt with as many entity lines as keep the first message's prompt <= target
    tokens (the closest from below), and every user message's rendered ids with it."""

    def ids(system: str, user: str) -> list[int]:
        text = template.render(_messages(system, user))
        return tok.encode(text, add_special=False, parse_special=True)

    lines = _entity_lines()
    lo, hi = 0, len(lines)
    if len(ids(_system_prompt(lines, hi), users[0])) <= target:
        lo = hi  # the whole list fits: the prompt stays shorter than asked
    while lo < hi:  # the largest n with len(ids) <= target
        mid = (lo + hi + 1) // 2
        if len(ids(_system_prompt(lines, mid), users[0])) <= target:
            lo = mid
        else:
            hi = mid - 1
    system = _system_prompt(lines, lo)
    return Prompt(system, {u: ids(system, u) for u in users})


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- prima: a real server -----------------------------------------------------------------------


class Server:
    """``prima-node serve`` in a subprocess on 127.0.0.1, a free port."""

    def __init__(self, model: Path, threads: int, ctx: int, state_dir: str) -> None:
        cmd = [sys.executable, "-m", "prima_node.cli", "serve", "--model", str(model),
               "--port", "0", "--ctx", str(ctx), "--threads", str(threads),
               "--state-dir", state_dir]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._port: int | None = None
        self._got_port = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m and self._port is None:
                self._port = int(m.group(1))
                self._got_port.set()
        self._got_port.set()  # the process ended: stop waiting

    def wait_ready(self, timeout: float) -> str:
        """The base URL once /health answers 200 (loading and compiling can take a minute)."""
        deadline = time.monotonic() + timeout
        self._got_port.wait(timeout)
        if self._port is None:
            raise RuntimeError("the server did not start:\n" + "\n".join(self.log[-20:]))
        base = f"http://127.0.0.1:{self._port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n"
                                   + "\n".join(self.log[-20:]))
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return base
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    raise
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n"
                           + "\n".join(self.log[-20:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)


@dataclass
class PrimaRun:
    ttft_ms: float  # client side: request sent -> first chunk with text
    text_in_first: bool  # False: the first non-role chunk had no text (see the module doc)
    prompt_ms: float  # server side: prefill time
    first_token_ms: float  # server side: prefill + first sample
    cache_n: int  # prompt tokens taken from the cache
    prompt_n: int  # prompt tokens evaluated
    prompt_tokens: int  # usage.prompt_tokens


def _extra(obj: Any, name: str) -> Any:
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get(name, getattr(obj, name, None))


def prima_request(client: Any, model: str, system: str, user: str, cold: bool) -> PrimaRun:
    body: dict[str, Any] = {"cache_prompt": False} if cold else {}
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=_messages(system, user), stream=True, max_tokens=4,
        temperature=0, stream_options={"include_usage": True}, extra_body=body)
    ttft: float | None = None
    text_first = False
    timings: dict[str, Any] | None = None
    usage = None
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            choice = chunk.choices[0]
            delta = choice.delta
            if ttft is None and (delta.content or delta.tool_calls or choice.finish_reason):
                ttft = now - t0
                text_first = bool(delta.content)
        t = _extra(chunk, "timings")
        if t:
            timings = t
        if chunk.usage is not None:
            usage = chunk.usage
    if ttft is None or timings is None or usage is None:
        raise RuntimeError("the stream ended without a token, timings or usage")
    return PrimaRun(ttft_ms=round(ttft * 1e3, 3), text_in_first=text_first,
                    prompt_ms=float(timings["prompt_ms"]),
                    first_token_ms=float(timings.get("first_token_ms", float("nan"))),
                    cache_n=int(timings["cache_n"]), prompt_n=int(timings["prompt_n"]),
                    prompt_tokens=int(usage.prompt_tokens))


# -- llama.cpp ----------------------------------------------------------------------------------


@dataclass
class LlamaRun:
    ttft_ms: float  # prompt in -> first sampled token
    evaluated: int  # prompt tokens llama.cpp actually evaluated
    cache_n: int  # prompt tokens it took from its cache


class LlamaRef:
    """llama-cpp-python on the same file; ``generate`` reuses the common prefix of its last
    input (and truncates its KV cache to it), which is what the warm run relies on."""

    def __init__(self, path: Path, threads: int, ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False)
        self._evaluated = 0
        orig = self.llm.eval

        def counting_eval(tokens: Any) -> None:  # how many tokens it really evaluated
            self._evaluated += len(tokens)
            orig(tokens)

        self.llm.eval = counting_eval  # type: ignore[method-assign]

    def run(self, ids: list[int], cold: bool) -> LlamaRun:
        if cold:
            self.llm.reset()
        self._evaluated = 0
        t0 = time.perf_counter()
        gen = self.llm.generate(ids, temp=0.0, top_k=1)
        next(gen)
        ttft = time.perf_counter() - t0
        gen.close()  # the sampled token is not evaluated: the cache holds exactly the prompt
        return LlamaRun(ttft_ms=round(ttft * 1e3, 3), evaluated=self._evaluated,
                        cache_n=len(ids) - self._evaluated)

    def close(self) -> None:
        self.llm.close()


# -- the benchmark ------------------------------------------------------------------------------


@dataclass
class Summary:
    best_ms: float
    median_ms: float


def _summary(values: list[float]) -> Summary:
    return Summary(min(values), statistics.median(values))


@dataclass
class EngineResult:
    cold: list[Any] = field(default_factory=list)
    warm: list[Any] = field(default_factory=list)

    def ttft(self, which: str) -> Summary:
        return _summary([r.ttft_ms for r in getattr(self, which)])


def _default_model() -> Path:
    if BENCH_MODEL.exists():
        return BENCH_MODEL
    from prima_node.default_model import default_model  # SmolLM2, which setup installs

    return default_model()


def run(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    model: Path = args.model.expanduser() if args.model else _default_model()
    ctx = max(4096, args.prompt_tokens + 256)  # room for the longest message and the answer
    mf = ModelFile.open(model)
    try:
        template = load_chat_template(mf)
    finally:
        mf.close()
    tok = Tokenizer.open(model)
    # the first sizes the prompt; then one cold and one warm message per repeat, never reused
    k = len(USER_MESSAGES)
    users = [USER_MESSAGES[i % k] + (f" ({i // k})" if i >= k else "")
             for i in range(1 + 2 * args.repeats)]
    prompt = build_prompt(template, tok, args.prompt_tokens, users)
    n_prompt = len(prompt.ids[users[0]])
    sizes = [len(v) for v in prompt.ids.values()]
    shared = [_common_prefix(prompt.ids[users[1 + 2 * r]], prompt.ids[users[2 + 2 * r]])
              for r in range(args.repeats)]
    log(f"model {model}: prompt {n_prompt} tokens ({prompt.system.count(chr(10))} system "
        f"lines), {min(shared)}+ shared between two turns")

    llama: LlamaRef | None = None
    llama_missing = "skipped (--no-llama)"
    if not args.no_llama:
        try:
            llama = LlamaRef(model, args.threads, ctx)
        except ImportError:
            llama_missing = "llama-cpp-python (llama_cpp) is not installed"

    import openai

    ours, theirs = EngineResult(), EngineResult()
    mismatches: list[str] = []

    warmup_ids = tok.encode(template.render(_messages(*WARMUP)), add_special=False,
                            parse_special=True)

    def count_check(run: PrimaRun, user: str | tuple[str, str]) -> PrimaRun:
        want = len(warmup_ids) if isinstance(user, tuple) else len(prompt.ids[user])
        if run.prompt_tokens != want:
            mismatches.append(f"{user!r}: server {run.prompt_tokens}, here {want}")
        return run

    with tempfile.TemporaryDirectory(prefix="prima-bench-") as state:
        server = Server(model, args.threads, ctx, state)
        try:
            log("starting prima-node serve")
            t0 = time.perf_counter()
            base = server.wait_ready(timeout=600)
            log(f"server ready after {time.perf_counter() - t0:.1f} s at {base}")
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=600,
                                   max_retries=0)
            name = client.models.list().data[0].id
            # a short prompt reads every weight once (page cache, lazy set-up) without the
            # cost of another long prefill
            log("warm-up: one short request to each engine")
            count_check(prima_request(client, name, WARMUP[0], WARMUP[1], cold=True), WARMUP)
            if llama is not None:
                llama.run(warmup_ids, cold=True)
            for r in range(args.repeats):
                cold_user, warm_user = users[1 + 2 * r], users[2 + 2 * r]
                order = ["prima", "llama"] if r % 2 == 0 else ["llama", "prima"]
                for engine in order:
                    c: PrimaRun | LlamaRun
                    w: PrimaRun | LlamaRun
                    if engine == "prima":
                        c = count_check(prima_request(client, name, prompt.system, cold_user,
                                                      cold=True), cold_user)
                        w = count_check(prima_request(client, name, prompt.system, warm_user,
                                                      cold=False), warm_user)
                        ours.cold.append(c)
                        ours.warm.append(w)
                    elif llama is not None:
                        c = llama.run(prompt.ids[cold_user], cold=True)
                        w = llama.run(prompt.ids[warm_user], cold=False)
                        theirs.cold.append(c)
                        theirs.warm.append(w)
                    else:
                        continue
                    log(f"run {r + 1}/{args.repeats} {engine}: TTFT cold {c.ttft_ms / 1e3:.2f} "
                        f"s, warm {w.ttft_ms / 1e3:.2f} s ({w.cache_n} cached)")
        finally:
            server.stop()
            if llama is not None:
                llama.close()

    def engine_json(res: EngineResult) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for which in ("cold", "warm"):
            out[which] = {"ttft": asdict(res.ttft(which)),
                          "runs": [asdict(x) for x in getattr(res, which)]}
        cold, warm = res.ttft("cold"), res.ttft("warm")
        out["speedup_best"] = round(cold.best_ms / warm.best_ms, 3)
        out["speedup_median"] = round(cold.median_ms / warm.median_ms, 3)
        return out

    misses = [f"{engine} run {i + 1}: {got} cached of {want} shared"
              for engine, res in (("prima", ours), ("llama.cpp", theirs))
              for i, (run_, want) in enumerate(zip(res.warm, shared, strict=False))
              if (got := run_.cache_n) < want - 1]  # -1: an engine may replay one token
    prima = engine_json(ours)
    for which in ("cold", "warm"):
        runs = getattr(ours, which)
        prima[which]["prompt_ms"] = asdict(_summary([x.prompt_ms for x in runs]))
        prima[which]["cache_n"] = min(x.cache_n for x in runs)
    ref = engine_json(theirs) if llama is not None else None
    if ref is not None:
        for which in ("cold", "warm"):
            ref[which]["cache_n"] = min(x.cache_n for x in getattr(theirs, which))
    return {
        "model": str(model),
        "threads": args.threads,
        "prompt_tokens": n_prompt,
        "prompt_tokens_range": [min(sizes), max(sizes)],
        "token_count_mismatches": mismatches,
        "shared_prefix_tokens": shared,
        "cache_misses": misses,
        "repeats": args.repeats,
        "prima": prima,
        "llama": ref,
        "llama_missing": None if ref is not None else llama_missing,
        "ratio_cold": None if ref is None else
        round(ours.ttft("cold").best_ms / theirs.ttft("cold").best_ms, 3),
        "ratio_warm": None if ref is None else
        round(ours.ttft("warm").best_ms / theirs.ttft("warm").best_ms, 3),
    }


def format_table(r: dict[str, Any]) -> str:
    p, ll = r["prima"], r["llama"]
    lo, hi = r["prompt_tokens_range"]
    shared = r["shared_prefix_tokens"]

    def span(a: int, b: int) -> str:
        return str(a) if a == b else f"{a}-{b}"

    def ms(v: float) -> str:
        return f"{v:,.0f} ms" if v >= 100 else f"{v:.1f} ms"

    def ttft(s: dict[str, float]) -> str:
        return f"{ms(s['best_ms'])} ({ms(s['median_ms'])})"

    lines = [
        f"model {r['model']}",
        f"threads {r['threads']}, prompts of {span(lo, hi)} tokens, "
        f"{span(min(shared), max(shared))} of them shared by consecutive turns; "
        f"{r['repeats']} runs each: best (median)",
        "",
        f"{'':10}{'prima TTFT':>24}{'server prefill':>24}{'cached':>8}"
        f"{'llama.cpp TTFT':>24}{'cached':>8}{'prima/llama':>13}",
    ]
    for which in ("cold", "warm"):
        row = (f"{which:10}{ttft(p[which]['ttft']):>24}{ttft(p[which]['prompt_ms']):>24}"
               f"{p[which]['cache_n']:>8}")
        if ll is not None:
            row += (f"{ttft(ll[which]['ttft']):>24}{ll[which]['cache_n']:>8}"
                    f"{r['ratio_' + which]:>12.2f}x")
        else:
            row += f"{'n/a':>24}{'':>8}{'n/a':>13}"
        lines.append(row)
    sp = f"{p['speedup_best']:.1f}x ({p['speedup_median']:.1f}x)"
    pre = [x["prompt_ms"] for x in p["cold"]["runs"]], [x["prompt_ms"] for x in p["warm"]["runs"]]
    sp_server = f"{min(pre[0]) / min(pre[1]):.1f}x"
    row = f"{'speed-up':10}{sp:>24}{sp_server:>24}{'':>8}"
    if ll is not None:
        row += f"{ll['speedup_best']:.1f}x ({ll['speedup_median']:.1f}x)".rjust(24)
    lines.append(row)
    lines.append("")
    lines.append("TTFT: request sent -> first streamed token (prima: openai client against "
                 "prima-node serve; llama.cpp: llama-cpp-python in process, no HTTP)")
    for which in ("cold", "warm"):
        over = statistics.median(x["ttft_ms"] - x["first_token_ms"] for x in p[which]["runs"])
        lines.append(f"prima {which}: HTTP, template and tokenisation add {ms(over)} "
                     "(median client TTFT - server first_token_ms)")
    for m in r["token_count_mismatches"]:
        lines.append(f"WARNING: prompt token counts differ: {m}")
    for m in r["cache_misses"]:
        lines.append(f"WARNING: the shared prefix was not reused: {m}")
    if not all(x["text_in_first"] for w in ("cold", "warm") for x in p[w]["runs"]):
        lines.append("note: some prima runs' first token carried no text; the next chunk was "
                     "timed (one decode step more)")
    if ll is None:
        lines.append(f"llama.cpp reference missing: {r['llama_missing']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help=f"GGUF file (default: {BENCH_MODEL} if it exists, else SmolLM2)")
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines")
    ap.add_argument("--prompt-tokens", type=int, default=1500,
                    help="size of the rendered prompt, system prompt + user message")
    ap.add_argument("--repeats", type=int, default=3, help="timed cold/warm pairs per engine")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp reference")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead "
                    "(fields: " + ", ".join(JSON_FIELDS) + ")")
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1 or args.prompt_tokens < 64:
        ap.error("--repeats and --threads must be at least 1, --prompt-tokens at least 64")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run(args, log)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))


if __name__ == "__main__":
    main()
