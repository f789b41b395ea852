"""JSON-schema constrained decoding on real synthetic models (random weights, real tokenizers).

A model with random weights has no idea of JSON, which makes it a hard test: whatever it would
say, the constrained output must parse and validate. Inside an unbounded string it practically
never picks the closing quote, so two situations are tested: schemas with the bounds a careful
client gives (maxLength, maxItems, ranges), which must finish on their own; and unbounded
schemas (and json_object mode) with a token budget, which must be closed in time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from conftest import ModelFactory

from prima_node.engine.model import Model
from prima_node.errors import SchemaError
from prima_node.text.constraint import CLOSING_MARGIN, JsonConstraint, _compiled_for
from prima_node.text.sampler import Sampler, SamplingParams
from prima_node.text.tokenizer import Tokenizer

MODELS = [("llama", "bpe"), ("qwen2", "bpe"), ("llama", "spm")]

# Home Assistant AI Task results and intent-tool arguments, as clients send them.
LIGHT_ARGS = {  # HassLightSet-like tool arguments: optional properties, enums, a range
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "area": {"type": "string", "maxLength": 24},
        "domain": {"type": "array", "items": {"enum": ["light", "switch", "fan"]},
                   "maxItems": 3},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["brightness"],
    "additionalProperties": False,
}
TASK_RESULT = {  # an AI Task "generate data" structure: every basic type, all required
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 32},
        "temperature": {"type": "number", "minimum": -30, "maximum": 50},
        "people": {"type": "integer", "minimum": 0, "maximum": 20},
        "occupied": {"type": "boolean"},
        "mood": {"enum": ["calm", "busy", "party"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["title", "temperature", "people", "occupied", "mood", "tags"],
    "additionalProperties": False,
}
NESTED = {  # nested objects and an array of objects
    "type": "object",
    "properties": {
        "room": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "devices": {
                    "type": "array", "maxItems": 2,
                    "items": {"type": "object",
                              "properties": {"id": {"type": "string", "pattern": "^[a-z_]{1,12}$"},
                                             "on": {"type": "boolean"}},
                              "required": ["id", "on"], "additionalProperties": False},
                },
            },
            "required": ["name", "devices"], "additionalProperties": False,
        },
        "summary": {"type": ["string", "null"], "maxLength": 40},
    },
    "required": ["room", "summary"],
    "additionalProperties": False,
}
BOUNDED = {"light_args": LIGHT_ARGS, "task_result": TASK_RESULT, "nested": NESTED}

UNBOUNDED = {  # what clients often send: no bounds at all
    "json_object": None,
    "description": {"type": "object", "properties": {"text": {"type": "string"},
                                                     "items": {"type": "array",
                                                               "items": {"type": "string"}}},
                    "required": ["text", "items"]},
}


@pytest.fixture(scope="module")
def setups(make_model: ModelFactory) -> dict[tuple[str, str], tuple[Tokenizer, Model]]:
    out = {}
    for arch, vocab in MODELS:
        path: Path = make_model(arch=arch, preset="tiny", quant="F16", vocab=vocab)
        out[(arch, vocab)] = (Tokenizer.open(path), Model.open(path, threads=1, n_ctx=512))
    return out


def generate(tok: Tokenizer, model: Model, constraint: JsonConstraint, seed: int,
             limit: int) -> tuple[list[int], bool]:
    """Sample up to ``limit`` tokens; the generated ids and whether an EOG token ended it."""
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), model.n_vocab, constraint)
    model.clear()
    prompt = tok.encode("Describe the living room as JSON.")
    sampler.feed_prompt(prompt)
    logits = model.forward(prompt)
    out: list[int] = []
    while len(out) < limit:
        t = sampler.sample(logits)
        if t in tok.eog_ids:
            return out, True
        out.append(t)
        logits = model.forward([t])
    return out, False


def check(text: str, schema: dict[str, Any] | None) -> None:
    doc = json.loads(text)
    if schema is None:
        assert isinstance(doc, dict)
    else:
        jsonschema.validate(doc, schema)


@pytest.mark.parametrize("model_key", MODELS, ids=lambda m: "-".join(m))
@pytest.mark.parametrize("name", list(BOUNDED))
def test_bounded_schemas_finish_and_validate(setups: dict[Any, Any], model_key: tuple[str, str],
                                             name: str) -> None:
    tok, model = setups[model_key]
    schema = BOUNDED[name]
    for seed in range(3):
        c = JsonConstraint.compile(tok, schema)
        ids, ended = generate(tok, model, c, seed, limit=400)
        text = tok.decode(ids)
        assert ended and c.is_complete and not c.closing, (seed, text)
        check(text, schema)


@pytest.mark.parametrize("model_key", MODELS, ids=lambda m: "-".join(m))
@pytest.mark.parametrize("name", list(UNBOUNDED))
@pytest.mark.parametrize("budget", [40, 120])
def test_unbounded_schemas_are_closed_within_the_budget(
        setups: dict[Any, Any], model_key: tuple[str, str], name: str, budget: int) -> None:
    tok, model = setups[model_key]
    schema = UNBOUNDED[name]
    for seed in range(2):
        c = JsonConstraint.compile(tok, schema, max_tokens=budget)
        ids, _ = generate(tok, model, c, seed, limit=budget)
        text = tok.decode(ids)
        assert c.is_complete, (seed, text)
        check(text, schema)
        assert len(ids) <= budget


def test_budget_closing_happens_only_near_the_end(setups: dict[Any, Any]) -> None:
    """A random model in an unbounded string never closes it: the ending is forced, late."""
    tok, model = setups[("llama", "bpe")]
    c = JsonConstraint.compile(tok, UNBOUNDED["description"], max_tokens=200)
    ids, _ = generate(tok, model, c, 0, limit=200)
    assert c.closing and c.is_complete
    assert 200 - 2 * CLOSING_MARGIN <= len(ids) <= 200
    check(tok.decode(ids), UNBOUNDED["description"])


# ---------------------------------------------------------------------------------- the mask


def spell(tok: Tokenizer, text: str) -> list[int]:
    """Tokens whose pieces spell exactly ``text``, as a model generating it would emit them.

    SentencePiece adds a space in front of the text; there the text is encoded after a newline
    and the tokens of that newline (and space) are dropped.
    """
    def pieces(ids: list[int]) -> bytes:
        return b"".join(tok.token_bytes(i) for i in ids)

    ids = tok.encode(text, add_special=False)
    if pieces(ids) != text.encode():
        ids = tok.encode("\n" + text, add_special=False)
        while ids and not text.encode().startswith(pieces(ids[:1])):
            ids = ids[1:]
    assert pieces(ids) == text.encode()
    return ids


def walk(tok: Tokenizer, c: JsonConstraint, text: str) -> list[bool]:
    """Teacher-force ``text``: for each token, was it allowed? (stops at the first refusal)"""
    seen = []
    for t in spell(tok, text):
        ok = bool(c.allowed()[t])
        seen.append(ok)
        if not ok:
            break
        c.accept(t)
    return seen


def walk_bytes(tok: Tokenizer, c: JsonConstraint, text: str) -> bool:
    """Produce ``text`` from allowed tokens only (longest first), whatever their split."""
    data = text.encode()
    pieces: dict[bytes, list[int]] = {}
    for i in range(tok.n_vocab):
        if not tok.is_special(i):
            pieces.setdefault(tok.token_bytes(i), []).append(i)
    while data:
        allowed = c.allowed()
        options = [(k, t) for k in range(len(data), 0, -1) for t in pieces.get(data[:k], [])
                   if allowed[t]]
        if not options:
            return False
        k, t = options[0]
        c.accept(t)
        data = data[k:]
    return True


DOC = {"title": "Living room", "temperature": 21.5, "people": 3, "occupied": True,
       "mood": "calm", "tags": ["cosy", "warm"]}
LAYOUTS = [json.dumps(DOC), json.dumps(DOC, indent=2), json.dumps(DOC, separators=(",", ":"))]


@pytest.mark.parametrize("model_key", MODELS, ids=lambda m: "-".join(m))
def test_a_valid_document_can_be_written(setups: dict[Any, Any],
                                         model_key: tuple[str, str]) -> None:
    tok, _ = setups[model_key]
    jsonschema.validate(DOC, TASK_RESULT)
    for text in LAYOUTS:
        c = JsonConstraint.compile(tok, TASK_RESULT)
        assert walk_bytes(tok, c, text), text
        assert c.is_complete
        assert set(np.flatnonzero(c.allowed()).tolist()) == set(tok.eog_ids)
        c.accept(min(tok.eog_ids))
        assert c.is_complete


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_tokenizers_own_tokens_are_allowed(setups: dict[Any, Any], arch: str) -> None:
    """Byte-level BPE spells any fragment canonically, so its natural tokens must all pass.

    (SentencePiece prefixes a space to a fragment; there llguidance's canonical tokens for
    forced text, such as a key, may split differently from the whole document's encoding.)
    """
    tok, _ = setups[(arch, "bpe")]
    for text in LAYOUTS:
        c = JsonConstraint.compile(tok, TASK_RESULT)
        assert all(walk(tok, c, text)), text
        assert c.is_complete


@pytest.mark.parametrize("bad", [
    '{"title": "x", "temperature": 99',  # above the maximum
    '{"title": "x", "temperature": 1, "people": 2, "occupied": "yes"',  # wrong type
    '{"title": "x", "temperature": 1, "people": 2, "occupied": true, "mood": "sad"',  # not enum
    '{"title": "", ',  # below minLength
    '{"colour": 1',  # not a property
    '[1, 2]',  # not an object
])
def test_invalid_documents_are_refused_where_they_go_wrong(setups: dict[Any, Any],
                                                           bad: str) -> None:
    tok, _ = setups[("llama", "bpe")]
    c = JsonConstraint.compile(tok, TASK_RESULT)
    seen = walk(tok, c, bad)
    assert seen[-1] is False
    refused = spell(tok, bad)[len(seen) - 1]
    with pytest.raises(SchemaError, match="not allowed"):
        c.accept(refused)
    assert not c.is_complete


def test_whitespace_is_bounded(setups: dict[Any, Any]) -> None:
    tok, _ = setups[("llama", "bpe")]
    for text, ok in [('{"a": 1}', True), ('{\n  "a": 1\n}', True), ('{\n\n\n"a": 1}', False),
                     ('{"a":' + " " * 2 + "1}", False), ("{\n" + " " * 21 + '"a": 1}', False)]:
        c = JsonConstraint.compile(tok, None)
        assert all(walk(tok, c, text)) is ok, text
        assert c.is_complete is ok


def test_json_object_mode_takes_any_object_only(setups: dict[Any, Any]) -> None:
    tok, _ = setups[("qwen2", "bpe")]
    c = JsonConstraint.compile(tok, None)
    assert all(walk(tok, c, '{"x": [1, {"y": null}], "z": "w"}')) and c.is_complete
    c = JsonConstraint.compile(tok, None)
    assert walk(tok, c, '"just a string"')[-1] is False


def test_special_tokens_are_never_allowed_inside_json(setups: dict[Any, Any]) -> None:
    tok, _ = setups[("qwen2", "bpe")]  # has user-defined <tool_call> as well as controls
    c = JsonConstraint.compile(tok, {"type": "object", "properties": {"s": {"type": "string"}}})
    walk(tok, c, '{"s": "abc')
    allowed = c.allowed()
    specials = [i for i in range(tok.n_vocab) if tok.is_special(i)]
    assert not allowed[specials].any()
    assert allowed.sum() > tok.n_vocab // 2  # inside a string nearly everything goes


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("schema,message", [
    ({"type": "foo"}, "foo"),
    ({"type": "string", "pattern": "(?<=a)b"}, "pattern|look"),
    ({"$ref": "#/definitions/missing"}, "missing"),
    # compiles, and fails only when the first token's mask is computed
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "admits no document"),
])
def test_invalid_schemas_raise_schema_error_with_llguidance_message(
        setups: dict[Any, Any], schema: dict[str, Any], message: str) -> None:
    tok, _ = setups[("llama", "bpe")]
    with pytest.raises(SchemaError, match=message):
        JsonConstraint.compile(tok, schema)


def test_a_schema_must_be_an_object(setups: dict[Any, Any]) -> None:
    tok, _ = setups[("llama", "bpe")]
    with pytest.raises(SchemaError, match="must be an object"):
        JsonConstraint.compile(tok, ["not", "a", "schema"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tokens"):
        JsonConstraint.compile(tok, None, max_tokens=0)


def test_the_vocabulary_is_compiled_once_per_tokenizer(setups: dict[Any, Any]) -> None:
    tok, _ = setups[("llama", "spm")]
    first = _compiled_for(tok)
    JsonConstraint.compile(tok, TASK_RESULT)
    JsonConstraint.compile(tok, None)
    assert _compiled_for(tok) is first
    other = Tokenizer.open(tok.path)
    assert _compiled_for(other) is not first


def test_compiled_schemas_are_independent(setups: dict[Any, Any]) -> None:
    """Two requests with the same schema (served from the cache) do not share state."""
    tok, _ = setups[("llama", "bpe")]
    a = JsonConstraint.compile(tok, LIGHT_ARGS)
    b = JsonConstraint.compile(tok, LIGHT_ARGS)
    assert all(walk(tok, a, '{"brightness": 5}')) and a.is_complete
    assert not b.is_complete and all(walk(tok, b, '{"name": "x", "brightness": 7}'))



def test_logits_wider_than_the_vocabulary_never_pick_the_padding(setups: dict[Any, Any]) -> None:
    """Some models pad their output rows past the tokenizer; the padding is never allowed."""
    tok, _ = setups[("llama", "bpe")]
    c = JsonConstraint.compile(tok, None)
    s = Sampler(SamplingParams(temperature=0.0), tok.n_vocab + 64, c)
    x = np.zeros(tok.n_vocab + 64, dtype=np.float32)
    x[tok.n_vocab:] = 100.0
    brace = tok.encode("{", add_special=False)
    assert s.sample(x) == brace[0]
