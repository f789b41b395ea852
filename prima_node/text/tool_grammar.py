"""Grammars that force a tool call in a model's own syntax.

When a client requires a call (OpenAI's ``tool_choice: "required"`` or a named function), asking
politely is not enough for a small model: the answer is constrained instead to exactly what the
tool-call parser (:mod:`prima_node.text.tool_calls`) recognises for the model's family, with the
arguments valid against the tool's JSON schema. The grammars are in llguidance's Lark dialect,
compiled by :meth:`prima_node.text.constraint.JsonConstraint.compile_lark`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .constraint import JSON_WHITESPACE

__all__ = ["tool_call_grammar"]


class _Vocab(Protocol):
    def token_id(self, text: str) -> int | None: ...
    def is_special(self, token_id: int) -> bool: ...


# (text before the call, arguments key, text after the call) per syntax
_SHAPES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "hermes": (("<tool_call>", "\n"), "arguments", ("\n", "</tool_call>")),
    "llama3": ((), "parameters", ()),
    "mistral": (("[TOOL_CALLS]", "["), "arguments", ("]",)),
}


def tool_call_grammar(tool_format: str, tools: Sequence[Mapping[str, Any]], vocab: _Vocab, *,
                      name: str | None = None) -> str:
    """A Lark grammar for one call of one of ``tools`` (OpenAI's shape) in ``tool_format``.

    ``name`` restricts it to that function. Marker texts that are special tokens in the
    vocabulary are written as those tokens (a model emits ``<tool_call>`` as one token, never
    spelled out), others as literal text.
    """
    if tool_format == "harmony":
        return _harmony_grammar(_chosen(tools, name), vocab)
    if tool_format not in _SHAPES:
        raise ValueError(f"no forced-call grammar for tool syntax {tool_format!r} "
                         f"(known: {', '.join(_SHAPES)})")
    before, args_key, after = _SHAPES[tool_format]
    calls = [{
        "type": "object",
        "properties": {"name": {"const": fn_name}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
    } for fn_name, params in _chosen(tools, name)]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    parts = [*map(lambda t: _piece(t, vocab), before), "call",
             *map(lambda t: _piece(t, vocab), after)]
    return f"start: {' '.join(parts)}\ncall: %json {json.dumps(_guided(schema))}\n"


def _chosen(tools: Sequence[Mapping[str, Any]], name: str | None
            ) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each tool the call may be of."""
    chosen = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError("every tool needs a function with a name: "
                             '{"type": "function", "function": {"name": ..., "parameters": ...}}')
        if name is not None and fn["name"] != name:
            continue
        params = dict(fn.get("parameters") or {"type": "object"})
        # arguments the tool did not declare are of no use to it, and a small model would
        # happily invent them (without end): declared properties only, unless said otherwise
        params.setdefault("additionalProperties", False)
        chosen.append((fn["name"], params))
    if not chosen:
        wanted = f"a tool named {name!r}" if name is not None else "a tool"
        raise ValueError(f"the request requires {wanted}, but none was given")
    return chosen


def _guided(schema: dict[str, Any]) -> dict[str, Any]:
    # the whitespace llama.cpp's JSON grammars allow: unbounded, a model can loop on newlines
    return {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}


def _harmony_grammar(chosen: list[tuple[str, dict[str, Any]]], vocab: _Vocab) -> str:
    """gpt-oss names the function in the message's header and writes only the arguments in
    its body: one alternative per tool, each with its own arguments' schema."""
    channel, constrain, message = (_piece(t, vocab) for t in
                                   ("<|channel|>", "<|constrain|>", "<|message|>"))
    rules = [f"start: {' | '.join(f'call{i}' for i in range(len(chosen)))}"]
    for i, (fn_name, params) in enumerate(chosen):
        header = json.dumps(f"commentary to=functions.{fn_name} ")
        rules.append(f"call{i}: {channel} {header} {constrain} \"json\" {message} args{i}")
        rules.append(f"args{i}: %json {json.dumps(_guided(params))}")
    return "\n".join(rules) + "\n"


def _piece(text: str, vocab: _Vocab) -> str:
    tid = vocab.token_id(text)
    if tid is not None and vocab.is_special(tid):
        return f"<[{tid}]>"
    return json.dumps(text)
