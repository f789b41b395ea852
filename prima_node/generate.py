"""The generation loop: prompt in, text deltas, tool calls and timings out.

One loop serves the CLI, the API server and a cluster's head. It only needs an ``Executor``
(something that turns a chunk of token ids into next-token logits with a per-session KV cache):
the local ``Model`` is one, the ring (``cluster.ring.RingExecutor``) another. The loop alone
cuts prompts into chunks and checks them against the context; executors take one chunk.

Each session remembers which tokens its KV cache holds, so a request whose prompt starts with the
previous conversation (Home Assistant resends a long, stable system prompt every turn; a chat
resends its history) only prefills the new suffix.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ContextOverflowError, SessionBusyError
from .text.chat_template import ChatTemplate, load_chat_template
from .text.constraint import JsonConstraint
from .text.harmony import MARKERS as HARMONY_MARKERS
from .text.harmony import HarmonyParser, ReasoningDelta
from .text.sampler import Sampler, SamplingParams
from .text.stops import StopStrings
from .text.tokenizer import Detokenizer, Tokenizer
from .text.tool_calls import MARKER_TOKENS, TextDelta, ToolCall, ToolCallParser

__all__ = [
    "Executor",
    "Finished",
    "GenerationOptions",
    "Generator",
    "ReasoningDelta",
    "TextDelta",
    "Timings",
    "ToolCall",
]


class Executor(Protocol):
    """What the loop needs from whatever runs the transformer (one process or a ring).

    ``forward`` evaluates one chunk (at most ``prefill_chunk`` tokens: a cancelled request
    stops within one, so it is the executor's trade of responsiveness against its own
    batching, e.g. a ring's pipeline of micro-batches) after the session's
    cached positions; ``clear`` forgets a session's positions, ``truncate`` keeps its first n,
    ``drop`` releases its memory: the same names at every level down to the ring's nodes.
    """

    @property
    def n_ctx(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def path(self) -> Path: ...
    @property
    def prefill_chunk(self) -> int: ...
    def forward(self, token_ids: Any, session: str = "default") -> np.ndarray: ...
    def n_cached(self, session: str = "default") -> int: ...
    def truncate(self, session: str, n: int) -> None: ...
    def clear(self, session: str = "default") -> None: ...
    def drop(self, session: str) -> None: ...
    def warm_up(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class GenerationOptions:
    """Everything about one request except the prompt."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: until end of generation or the context is full
    stop: tuple[str, ...] = ()
    json_schema: Mapping[str, Any] | None = None
    json_mode: bool = False  # any JSON object (OpenAI's response_format json_object)
    grammar: str | None = None  # a Lark grammar (llguidance), e.g. text.tool_grammar's calls
    tool_format: str | None = None  # parse tool calls in this syntax (harmony: its channels,
    #                                  with or without tools)
    tools_offered: bool = True  # False: harmony's unsolicited calls are dropped, not returned
    special: bool = False  # show every control token's text
    continuation: bool = False  # the answer continues the prompt's text (keep a leading space)


@dataclass(frozen=True)
class Timings:
    """Token counts and wall times of one generation."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the session's KV cache
    prefill_s: float
    completion_tokens: int
    decode_s: float  # from the first sampled token to the end
    decode_steps: int  # forward passes after the prefill (one per generated token fed back)
    first_token_s: float  # request start to the first sampled token
    #: prompt tokens evaluated (fewer than prompt - cached when cancelled during the prefill)
    prefill_tokens: int | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens if self.prefill_tokens is None \
            else self.prefill_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "decode_steps": self.decode_steps,
            "first_token_s": round(self.first_token_s, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_ms_per_token": round(self.decode_ms_per_token, 3),
        }


@dataclass(frozen=True)
class Finished:
    """The last event of every generation."""

    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    timings: Timings
    tokens: tuple[int, ...]  # the generated ids (end-of-generation token excluded)
    seed: int


Event = TextDelta | ReasoningDelta | ToolCall | Finished


def answer_parser(tool_format: str | None, *, tools_offered: bool = True
                  ) -> ToolCallParser | HarmonyParser:
    """What splits an answer in this syntax into text, calls (and reasoning, for harmony,
    whose answers are in channels with or without tools: without, its calls are dropped)."""
    if tool_format == "harmony":
        return HarmonyParser(calls=tools_offered)
    return ToolCallParser(tool_format)


def _markers(tool_format: str | None) -> tuple[str, ...]:
    """The control tokens whose text the answer's parser must see."""
    return HARMONY_MARKERS if tool_format == "harmony" else MARKER_TOKENS.get(tool_format or "",
                                                                               ())


def _held_back(stops: StopStrings, detok: Detokenizer, parser: ToolCallParser | HarmonyParser,
               stopped: bool) -> list[TextDelta | ReasoningDelta | ToolCall]:
    """The answer's last events, from what is still held back once it ends: a partial
    character, a partial stop string, an open call."""
    tail = ""
    if not stopped:
        text, stopped = stops.feed(detok.flush())
        tail = text if stopped else text + stops.flush()
    return [*(parser.feed(tail) if tail else ()), *parser.finish()]


class Generator:
    """A model ready to talk: executor + tokenizer + chat template, and the prefix cache."""

    def __init__(self, executor: Executor, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        if tokenizer.n_vocab != executor.n_vocab:
            raise ValueError(f"the tokenizer has {tokenizer.n_vocab} tokens but the model's "
                             f"output has {executor.n_vocab}")
        self.executor = executor
        self.tokenizer = tokenizer
        self.template = template
        self._cached: dict[str, list[int]] = {}  # the ids each session's KV cache holds
        self._busy: set[str] = set()  # sessions with a generation under way
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, threads: int | None = None,
             n_ctx: int = 4096, gpu: str | None = None, gpu_layers: int | str = 0
             ) -> Generator:
        """Load a GGUF for local generation (the model, its tokenizer and its chat template);
        ``gpu_layers`` of it on ``gpu`` (see ``Model.open``)."""
        from .engine.model import Model

        model = Model.open(path, threads=threads, n_ctx=n_ctx, gpu=gpu, gpu_layers=gpu_layers)
        try:
            return cls(model, Tokenizer.from_model_file(model.file),
                       load_chat_template(model.file))
        except BaseException:
            model.close()
            raise

    @property
    def path(self) -> Path:
        return self.executor.path

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompts --------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], /, *,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template.

        The template writes BOS itself (Hugging Face convention), so the rendered text is
        tokenised without adding specials but with special-token text recognised, as llama.cpp's
        server does.
        """
        text = self.template.render([dict(m) for m in messages],
                                    tools=[dict(t) for t in tools] if tools else None,
                                    add_generation_prompt=add_generation_prompt,
                                    **template_kwargs)
        return self.tokenizer.encode(text, add_special=False, parse_special=True)

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of raw text (BOS per the file's flags; special-token text stays text)."""
        return self.tokenizer.encode(text, add_special=True, parse_special=False)

    # -- sessions ---------------------------------------------------------------------------------

    def clear(self, session: str = "default") -> None:
        """Forget a session's cached prefix (its KV memory is kept for the next request)."""
        self._cached.pop(session, None)
        self.executor.clear(session)

    def drop(self, session: str) -> None:
        """Forget a session and release its KV memory."""
        self._cached.pop(session, None)
        self.executor.drop(session)

    def cached_tokens(self, session: str = "default") -> int:
        return len(self._cached.get(session, ()))

    def reusable_prefix(self, session: str, prompt: Sequence[int]) -> int:
        """How many of ``prompt``'s tokens the session's cache could serve (a server picks the
        session with the longest one for each request)."""
        cached = self._cached.get(session, ())
        limit = min(len(cached), len(prompt) - 1)
        n = 0
        while n < limit and cached[n] == prompt[n]:
            n += 1
        return n

    def _reuse_prefix(self, session: str, prompt: Sequence[int]) -> int:
        """Cut the session's cache back to its common prefix with ``prompt``; its length.

        At least the prompt's last token is always evaluated again: its logits choose the first
        new token.
        """
        if self.executor.n_cached(session) != len(self._cached.get(session, ())):
            self._cached.pop(session, None)  # used behind our back: trust nothing
        n = self.reusable_prefix(session, prompt)
        self.executor.truncate(session, n)
        self._cached[session] = list(prompt[:n])
        return n

    def _claim(self, session: str) -> None:
        with self._lock:
            if session in self._busy:
                raise _busy(session)
            self._busy.add(session)

    # -- the loop ---------------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], options: GenerationOptions | None = None, *,
                 session: str = "default", cancel: Callable[[], bool] | None = None
                 ) -> Iterator[Event]:
        """Generate from prompt ids; yield ``TextDelta`` / ``ToolCall`` events, then ``Finished``.

        Everything that can be refused is checked here, before the iterator is returned and
        before any token is evaluated (context length, sampling fields, stop strings, the tool
        syntax, the schema, a session already in use), so a server can still answer with an
        error status and the session is left as it was.

        Stopping early: closing the iterator (same thread) stops at once; ``cancel`` (polled
        between prefill chunks and before every decode step, so another thread can stop a
        generation) ends it with ``finish_reason == "cancelled"``. Either way the session's
        cache stays consistent with what was evaluated, ready for the next request's prefix.
        """
        opts = options or GenerationOptions()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        n_ctx = self.executor.n_ctx
        if len(prompt) >= n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context holds {n_ctx} (and the "
                f"answer needs at least one more): shorten the prompt or start the model with a "
                f"larger context")
        if opts.max_tokens is not None and opts.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {opts.max_tokens}")
        bad = [t for t in prompt if not 0 <= t < self.tokenizer.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"(0..{self.tokenizer.n_vocab - 1})")
        opts.sampling.validate(self.tokenizer.n_vocab)
        budget = n_ctx - len(prompt)
        max_tokens = budget if opts.max_tokens is None else min(opts.max_tokens, budget)
        stops = StopStrings(opts.stop)
        parser = answer_parser(opts.tool_format, tools_offered=opts.tools_offered)
        constraint = None
        if opts.grammar is not None:
            if opts.json_schema is not None or opts.json_mode:
                raise ValueError("a grammar and a JSON schema / JSON mode cannot both apply")
            # the budget lets the constraint close the call in time rather than cut it off
            constraint = JsonConstraint.compile_lark(self.tokenizer, opts.grammar,
                                                     max_tokens=max_tokens)
        elif opts.json_schema is not None or opts.json_mode:
            schema = dict(opts.json_schema) if opts.json_schema is not None else None
            constraint = JsonConstraint.compile(self.tokenizer, schema, max_tokens=max_tokens)
        if session in self._busy:
            raise _busy(session)
        run = _Run(prompt, opts, max_tokens, stops, parser, constraint, cancel)
        return self._run(run, session)

    def _run(self, run: _Run, session: str) -> Iterator[Event]:
        self._claim(session)  # again: two iterators may have been made before either started
        try:
            yield from self._loop(run, session)
        finally:
            with self._lock:
                self._busy.discard(session)

    def _loop(self, run: _Run, session: str) -> Iterator[Event]:
        tok, opts, prompt = self.tokenizer, run.opts, run.prompt
        t_start = time.perf_counter()
        sampler = Sampler(opts.sampling, tok.n_vocab, run.constraint)
        sampler.feed_prompt(prompt)
        markers = _markers(opts.tool_format)
        detok = tok.stream(special=opts.special, continuation=opts.continuation,
                           show=[i for i in map(tok.token_id, markers) if i is not None])
        stops, parser, cancelled = run.stops, run.parser, run.cancel or (lambda: False)

        cached = self._reuse_prefix(session, prompt)
        history = self._cached[session]
        out: list[int] = []
        stopped = saw_call = False
        t_first = decode_s = 0.0
        steps = 0
        logits, prefilled = self._prefill(prompt[cached:], session, history, cancelled)
        reason = "length" if logits is not None else "cancelled"
        t_prefill = time.perf_counter() - t_start
        while logits is not None:
            t0 = time.perf_counter()
            if run.constraint is not None and run.constraint.is_complete:
                reason = "stop"  # the document is whole: nothing else may follow
                break
            token = sampler.sample(logits)
            if not out:
                t_first = time.perf_counter() - t_start
            if token in tok.eog_ids:
                reason = "stop"
                break
            out.append(token)
            text, stopped = stops.feed(detok.feed(token))
            events = parser.feed(text) if text else []
            busy = time.perf_counter() - t0
            for ev in events:  # streamed before the next step runs: no added latency
                saw_call |= isinstance(ev, ToolCall)
                yield ev
            if stopped:
                reason = "stop"
                break
            if len(out) >= run.max_tokens:
                break
            if cancelled():
                reason = "cancelled"
                break
            t1 = time.perf_counter()
            logits = self._forward([token], session, history)
            steps += 1
            decode_s += busy + time.perf_counter() - t1  # not the time the consumer held us
        for ev in _held_back(stops, detok, parser, stopped):
            saw_call |= isinstance(ev, ToolCall)
            yield ev
        if saw_call and reason != "cancelled":
            reason = "tool_calls"
        yield Finished(reason, Timings(
            prompt_tokens=len(prompt), cached_tokens=cached, prefill_s=t_prefill,
            completion_tokens=len(out), decode_s=decode_s, decode_steps=steps,
            first_token_s=t_first, prefill_tokens=prefilled), tuple(out), sampler.seed)

    def _prefill(self, ids: list[int], session: str, history: list[int],
                 cancelled: Callable[[], bool]) -> tuple[np.ndarray | None, int]:
        """The prompt's uncached tokens, a chunk at a time (a cancel stops within one): the
        last position's logits (None when cancelled: a prompt cut short chooses no token)
        and the tokens evaluated."""
        logits = None
        chunk = self.executor.prefill_chunk
        for a in range(0, len(ids), chunk):
            if cancelled():
                return None, a
            logits = self._forward(ids[a:a + chunk], session, history)
        return logits, len(ids)

    def _forward(self, ids: list[int], session: str, history: list[int]) -> np.ndarray:
        """Evaluate ids after the session's cache, keeping the record of what it holds honest.

        If evaluation stops part-way (Ctrl-C, an error), positions before ``history`` are intact
        (a window only advances its count after writing), so only the partial step is cut off.
        """
        try:
            logits = self.executor.forward(ids, session=session)
        except BaseException:
            if self.executor.n_cached(session) >= len(history):
                self.executor.truncate(session, len(history))
            else:
                self._cached.pop(session, None)
                self.executor.clear(session)
            raise
        history.extend(ids)
        return logits


def _busy(session: str) -> SessionBusyError:
    return SessionBusyError(f"session {session!r} is already generating; wait for it to finish "
                            "or use another session")


@dataclass(frozen=True)
class _Run:
    """One request, validated: what the loop needs besides the session."""

    prompt: list[int]
    opts: GenerationOptions
    max_tokens: int
    stops: StopStrings
    parser: ToolCallParser | HarmonyParser
    constraint: JsonConstraint | None
    cancel: Callable[[], bool] | None
