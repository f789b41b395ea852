"""The generation loop on real synthetic models: KV reuse, prefix cache, stops, limits, seeds."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from conftest import ModelFactory

from prima_node.errors import ContextOverflowError, SessionBusyError
from prima_node.generate import Finished, GenerationOptions, Generator, TextDelta, ToolCall
from prima_node.text.constraint import CLOSING_MARGIN
from prima_node.text.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def gen(make_model: ModelFactory) -> Iterator[Generator]:
    with Generator.open(make_model("llama", "tiny", "Q8_0"), threads=1, n_ctx=256) as g:
        yield g


def run(g: Generator, ids: list[int], opts: GenerationOptions, session: str = "default"
        ) -> tuple[str, Finished]:
    text: list[str] = []
    fin = None
    for ev in g.generate(ids, opts, session=session):
        if isinstance(ev, TextDelta):
            text.append(ev.text)
        elif isinstance(ev, Finished):
            fin = ev
    assert fin is not None, "every generation ends with a Finished event"
    return "".join(text), fin


def greedy_step_by_step(g: Generator, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from the model driven by hand: the prompt, then one token at a time on a
    session of its own. (Recomputing everything per step is no exact reference: ggml, like
    llama.cpp, rounds a batched prefill otherwise than one-token steps, by up to 1.5 % of the
    largest logit on this random model, enough to flip near-ties; tests/test_conformance.py
    shows the cached decode steps equal llama.cpp's exactly.)"""
    model = g.executor
    model.clear("by-hand")
    logits = model.forward(ids, session="by-hand")
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        if tok in g.tokenizer.eog_ids:
            break
        out.append(tok)
        logits = model.forward([tok], session="by-hand")
    model.drop("by-hand")
    return out


def test_greedy_decode_with_the_kv_cache_matches_the_model_stepped_by_hand(
        gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Is the kitchen light on?"}])
    text, fin = run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=12), "a")
    assert list(fin.tokens) == greedy_step_by_step(gen, ids, 12)
    assert text == gen.tokenizer.decode(list(fin.tokens))
    t = fin.timings
    assert (t.prompt_tokens, t.cached_tokens, t.completion_tokens) == (len(ids), 0, len(fin.tokens))
    assert fin.finish_reason == ("length" if len(fin.tokens) == 12 else "stop")


def test_a_longer_conversation_only_prefills_its_new_suffix(gen: Generator) -> None:
    gen.clear("b")
    first = [{"role": "system", "content": "You control a smart home. Be brief."},
             {"role": "user", "content": "Turn on the porch light."}]
    ids1 = gen.chat_prompt(first)
    _, fin1 = run(gen, ids1, GenerationOptions(sampling=GREEDY, max_tokens=4), "b")
    answer = gen.tokenizer.decode(list(fin1.tokens))
    second = [*first, {"role": "assistant", "content": answer},
              {"role": "user", "content": "And the garage?"}]
    ids2 = gen.chat_prompt(second)
    held = ids1 + list(fin1.tokens[:fin1.timings.decode_steps])  # what was evaluated
    limit = min(len(held), len(ids2) - 1)
    common = next((i for i in range(limit) if held[i] != ids2[i]), limit)
    assert common > len(ids1) // 2  # the test means something: most of the prompt is shared
    _, warm = run(gen, ids2, GenerationOptions(sampling=GREEDY, max_tokens=6), "b")
    assert warm.timings.cached_tokens == common
    gen.clear("c")
    _, cold = run(gen, ids2, GenerationOptions(sampling=GREEDY, max_tokens=6), "c")
    assert cold.timings.cached_tokens == 0
    assert warm.tokens == cold.tokens  # reusing the cache changes nothing but the time


def test_the_same_prompt_again_reevaluates_only_its_last_token(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "What time is it?"}])
    opts = GenerationOptions(sampling=GREEDY, max_tokens=3)
    _, a = run(gen, ids, opts, "d")
    _, b = run(gen, ids, opts, "d")
    assert b.timings.cached_tokens == len(ids) - 1
    assert a.tokens == b.tokens


def test_same_seed_same_answer_and_other_seeds_differ(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Tell me a story."}])

    def sample(seed: int) -> tuple[int, ...]:
        p = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        _, fin = run(gen, ids, GenerationOptions(sampling=p, max_tokens=16), "e")
        assert fin.seed == seed
        return fin.tokens

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) == 3


def test_a_stop_string_across_tokens_ends_the_answer_before_it(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "List the rooms."}])
    full, fin = run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=24), "f")
    pieces = [gen.tokenizer.decode([t]) for t in fin.tokens]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(1, len(pieces)) if pieces[i - 1] and pieces[i])
    stop = pieces[k - 1][-1:] + pieces[k][:1]
    cut = full.index(stop)
    text, fin2 = run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=24,
                                                 stop=(stop,)), "f")
    assert text == full[:cut]
    assert fin2.finish_reason == "stop"


def test_max_tokens_and_end_of_generation(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Hi"}])
    _, fin = run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=1), "g")
    assert (fin.finish_reason, fin.timings.completion_tokens) == ("length", 1)
    eos = gen.tokenizer.eos_id
    assert eos is not None
    force_eos = SamplingParams(temperature=0.0, logit_bias={eos: 1e4})
    text, fin = run(gen, ids, GenerationOptions(sampling=force_eos, max_tokens=8), "g")
    assert (text, fin.finish_reason, fin.tokens) == ("", "stop", ())


def test_an_answer_never_runs_past_the_context(gen: Generator) -> None:
    n_ctx = gen.executor.n_ctx
    ids = gen.text_prompt("one two three")
    ids = (ids * n_ctx)[: n_ctx - 3]
    _, fin = run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=50), "h")
    if fin.finish_reason != "stop":
        assert (fin.finish_reason, fin.timings.completion_tokens) == ("length", 3)
    assert fin.timings.completion_tokens <= 3


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Hello"}])
    run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=2), "i")
    held = gen.cached_tokens("i")
    too_long = ids * (gen.executor.n_ctx // len(ids) + 1)
    expected = rf"{len(too_long)} tokens.*{gen.executor.n_ctx}"
    with pytest.raises(ContextOverflowError, match=expected):
        gen.generate(too_long, GenerationOptions(), session="i")
    assert gen.cached_tokens("i") == held  # the session is as it was


def test_bad_requests_are_refused_with_the_field_named(gen: Generator) -> None:
    ids = gen.text_prompt("hello")
    with pytest.raises(ValueError, match="max_tokens"):
        gen.generate(ids, GenerationOptions(max_tokens=0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([gen.tokenizer.n_vocab + 5], GenerationOptions())
    with pytest.raises(ValueError, match="empty"):
        gen.generate([], GenerationOptions())
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(ids, GenerationOptions(sampling=SamplingParams(top_p=1.5)))


def test_closing_the_stream_stops_generation_and_keeps_the_cache_honest(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Count to one hundred."}])
    events = gen.generate(ids, GenerationOptions(sampling=GREEDY, max_tokens=50), session="j")
    n = 0
    for ev in events:
        n += isinstance(ev, TextDelta)
        if n == 3:
            break
    events.close()  # type: ignore[attr-defined]
    held = gen.cached_tokens("j")
    assert len(ids) <= held < len(ids) + 50
    assert gen.executor.n_cached("j") == held
    _, fin = run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=5), "j")
    assert fin.timings.cached_tokens == len(ids) - 1


SCHEMA = {
    "type": "object",
    "properties": {
        "room": {"type": "string", "maxLength": 20},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
        "on": {"type": "boolean"},
    },
    "required": ["room", "brightness", "on"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("arch,vocab", [("llama", "bpe"), ("qwen2", "bpe"), ("llama", "spm")])
def test_json_schema_output_validates(make_model: ModelFactory, arch: str, vocab: str) -> None:
    path: Path = make_model(arch, "tiny", "Q8_0", vocab=vocab)
    with Generator.open(path, threads=1, n_ctx=512) as g:
        ids = g.chat_prompt([{"role": "user", "content": "Set the kitchen light."}])
        for seed in (1, 2):
            p = SamplingParams(temperature=0.8, seed=seed)
            text, fin = run(g, ids, GenerationOptions(sampling=p, max_tokens=200,
                                                      json_schema=SCHEMA))
            assert fin.finish_reason == "stop", text
            jsonschema.validate(json.loads(text), SCHEMA)


def test_a_session_runs_one_generation_at_a_time(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Hello"}])
    first = gen.generate(ids, GenerationOptions(sampling=GREEDY, max_tokens=20), session="k")
    next(first)
    with pytest.raises(SessionBusyError, match="'k'"):
        gen.generate(ids, GenerationOptions(), session="k")
    run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=2), "other")  # others are free
    first.close()  # type: ignore[attr-defined]
    _, fin = run(gen, ids, GenerationOptions(sampling=GREEDY, max_tokens=2), "k")  # free again
    assert fin.timings.cached_tokens == len(ids) - 1


def test_another_thread_can_cancel_a_generation(gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Describe the garden."}])
    stop = threading.Event()
    seen = 0
    fin = None
    for ev in gen.generate(ids, GenerationOptions(sampling=GREEDY, max_tokens=100),
                           session="l", cancel=stop.is_set):
        if isinstance(ev, TextDelta):
            seen += 1
            if seen == 2:
                threading.Thread(target=stop.set).start()
        elif isinstance(ev, Finished):
            fin = ev
    assert fin is not None and fin.finish_reason == "cancelled"
    assert fin.timings.completion_tokens < 100
    assert gen.executor.n_cached("l") == gen.cached_tokens("l") >= len(ids)
    # cancelled before it started: nothing is evaluated, the request still ends properly
    events = list(gen.generate(ids, GenerationOptions(sampling=GREEDY), session="m",
                               cancel=stop.is_set))
    assert len(events) == 1 and isinstance(events[0], Finished)
    assert (events[0].finish_reason, events[0].tokens) == ("cancelled", ())
    assert gen.executor.n_cached("m") == 0


def test_a_generation_cancelled_during_its_prefill_samples_nothing(
        gen: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits of a prompt cut short must not choose a token (it could even end a JSON answer
    or match a stop string and turn the cancellation into a normal finish)."""
    chunk = 32
    monkeypatch.setattr(gen.executor, "prefill_chunk", chunk)
    ids = gen.text_prompt("The garden and the kitchen " * 10)
    assert len(ids) > 2 * chunk
    polls = 0

    def after_one_chunk() -> bool:
        nonlocal polls
        polls += 1
        return polls > 1

    events = list(gen.generate(ids, GenerationOptions(sampling=GREEDY), session="p",
                               cancel=after_one_chunk))
    assert len(events) == 1 and isinstance(events[0], Finished)
    fin = events[0]
    assert (fin.finish_reason, fin.tokens, fin.timings.completion_tokens) == ("cancelled", (), 0)
    assert fin.timings.prefill_tokens == chunk == gen.cached_tokens("p")


def test_a_finished_json_document_ends_the_answer_even_without_an_end_token(
        gen: Generator) -> None:
    ids = gen.chat_prompt([{"role": "user", "content": "Report the light."}])
    no_end = {t: float("-inf") for t in gen.tokenizer.eog_ids}
    opts = GenerationOptions(sampling=SamplingParams(temperature=0.7, seed=4, logit_bias=no_end),
                             max_tokens=120, json_schema=SCHEMA)
    text, fin = run(gen, ids, opts, "n")
    assert fin.finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_only_the_tool_syntax_control_tokens_reach_the_answer(gen: Generator) -> None:
    tok = gen.tokenizer
    tag, header = tok.token_id("<|python_tag|>"), tok.token_id("<|start_header_id|>")
    assert tag is not None and header is not None and tok.is_control(header)
    ids = gen.chat_prompt([{"role": "user", "content": "Run it."}])

    def forced(token: int, fmt: str | None) -> list[object]:
        p = SamplingParams(temperature=0.0, logit_bias={token: 1e4})
        events = list(gen.generate(ids, GenerationOptions(sampling=p, max_tokens=1,
                                                          tool_format=fmt), session="o"))
        return events[:-1]

    assert forced(header, "llama3") == []  # other control tokens stay hidden
    assert forced(tag, None) == []  # no tools: the marker is just a hidden control token
    # with tools, the parser sees the marker; with nothing after it, it comes back as text
    assert forced(tag, "llama3") == [TextDelta("<|python_tag|>")]
    assert not any(isinstance(e, ToolCall) for e in forced(tag, "llama3"))


def test_a_raw_continuation_keeps_the_leading_space(make_model: ModelFactory) -> None:
    with Generator.open(make_model("llama", "tiny", "Q8_0", vocab="spm"), threads=1,
                        n_ctx=128) as g:
        the = g.tokenizer.encode("the", add_special=False)[0]
        assert g.tokenizer.token_text(the).startswith("\u2581")
        ids = g.text_prompt("Open")
        p = SamplingParams(temperature=0.0, logit_bias={the: 1e4})
        cont, _ = run(g, ids, GenerationOptions(sampling=p, max_tokens=1, continuation=True))
        reply, _ = run(g, ids, GenerationOptions(sampling=p, max_tokens=1))
        assert (cont, reply) == (" the", "the")


LIGHT_TOOLS = [
    {"type": "function", "function": {
        "name": "HassTurnOn", "description": "Turns on a device",
        "parameters": {"type": "object",
                       "properties": {"name": {"type": "string", "maxLength": 12},
                                      "area": {"enum": ["kitchen", "hall"]}},
                       "required": ["name", "area"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "HassTurnOff", "description": "Turns off a device",
        "parameters": {"type": "object", "properties": {"name": {"type": "string",
                                                                  "maxLength": 12}},
                       "required": ["name"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("arch,fmt", [("qwen2", "hermes"), ("llama", "llama3"),
                                      ("llama", "mistral")])
def test_a_forced_tool_call_streams_as_one_structured_call(make_model: ModelFactory, arch: str,
                                                           fmt: str) -> None:
    from prima_node.text.tool_grammar import tool_call_grammar

    with Generator.open(make_model(arch, "tiny", "Q8_0"), threads=1, n_ctx=1024) as g:
        if fmt != "mistral":  # the synthetic files carry the family's real template
            assert g.template.tool_format == fmt
        ids = g.chat_prompt([{"role": "user", "content": "Kitchen light on"}],
                            tools=LIGHT_TOOLS)
        grammar = tool_call_grammar(fmt, LIGHT_TOOLS, g.tokenizer, name="HassTurnOn")
        opts = GenerationOptions(sampling=SamplingParams(temperature=0.9, seed=5),
                                 max_tokens=200, grammar=grammar, tool_format=fmt)
        events = list(g.generate(ids, opts))
    one_valid_call(events, LIGHT_TOOLS[0])


def one_valid_call(events: list[TextDelta | ToolCall | Finished], tool: dict[str, Any]
                   ) -> Finished:
    """The generation's end, once it is checked to be exactly one call of ``tool``, no text
    beside it, with arguments valid against the tool's schema."""
    calls = [e for e in events if isinstance(e, ToolCall)]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.finish_reason == "tool_calls", (text, events)
    assert len(calls) == 1 and calls[0].name == tool["function"]["name"], calls
    assert text.strip() == "", text
    jsonschema.validate(json.loads(calls[0].arguments), tool["function"]["parameters"])
    return fin


NOTE_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "add_note", "description": "Adds a note to the shopping list",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"},
                                                    "items": {"type": "array",
                                                              "items": {"type": "string"}}},
                   "required": ["text"], "additionalProperties": False}}}


@pytest.mark.parametrize("arch,fmt", [("qwen2", "hermes"), ("llama", "llama3"),
                                      ("llama", "mistral")])
def test_a_forced_call_is_closed_validly_within_a_small_budget(make_model: ModelFactory,
                                                               arch: str, fmt: str) -> None:
    """Random weights never close an unbounded string by themselves: without looking ahead at
    the budget, the call is cut off as text at max_tokens. With it, every forced call is one
    valid call within the budget, its text shortened rather than broken."""
    from prima_node.text.tool_grammar import tool_call_grammar

    with Generator.open(make_model(arch, "tiny", "Q8_0"), threads=1, n_ctx=512) as g:
        ids = g.chat_prompt([{"role": "user", "content": "Note: milk and bread"}],
                            tools=[NOTE_TOOL])
        grammar = tool_call_grammar(fmt, [NOTE_TOOL], g.tokenizer)
        closed = 0
        for seed, budget in [(0, 64), (1, 64), (2, 64), (3, 40), (4, 100)]:
            opts = GenerationOptions(sampling=SamplingParams(temperature=1.0, seed=seed),
                                     max_tokens=budget, grammar=grammar, tool_format=fmt)
            fin = one_valid_call(list(g.generate(ids, opts)), NOTE_TOOL)
            assert len(fin.tokens) <= budget
            closed += len(fin.tokens) >= budget - 2 * CLOSING_MARGIN
        assert closed, "random weights should have run into the budget at least once"


def test_forced_call_grammars_refuse_what_cannot_be_called(gen: Generator) -> None:
    from prima_node.text.tool_grammar import tool_call_grammar

    with pytest.raises(ValueError, match="no forced-call grammar"):
        tool_call_grammar("xml", LIGHT_TOOLS, gen.tokenizer)
    with pytest.raises(ValueError, match="named 'HassUnlock'"):
        tool_call_grammar("hermes", LIGHT_TOOLS, gen.tokenizer, name="HassUnlock")
    with pytest.raises(ValueError, match="needs a function with a name"):
        tool_call_grammar("hermes", [{"type": "function"}], gen.tokenizer)
    ids = gen.text_prompt("x")
    with pytest.raises(ValueError, match="cannot both apply"):
        gen.generate(ids, GenerationOptions(grammar="start: \"a\"", json_mode=True))
