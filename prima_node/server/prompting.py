"""API requests turned into what the generation loop takes: prompt ids and options.

Runs on the model thread (rendering a template and tokenising a long prompt take milliseconds;
compiling a JSON schema or a tool grammar can take more). Every refusal of the text layer
becomes a ``RequestError`` naming the field it concerns, and it happens before any token is
evaluated or any byte of the answer is sent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ChatTemplateError, ContextOverflowError, SchemaError
from ..generate import Event, GenerationOptions, Generator
from ..text.tool_grammar import tool_call_grammar
from .protocol import ChatRequest, CommonRequest, CompletionRequest, RequestError
from .runtime import Runtime

_LOG = logging.getLogger("prima.server")

_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                    "presence_penalty", "frequency_penalty", "logit_bias", "seed")


@dataclass
class Prepared:
    """A request ready to run: its events (nothing evaluated yet) and what the logs show."""

    events: Iterator[Event]
    slot: str
    prompt_tokens: int


def _options(req: CommonRequest) -> GenerationOptions:
    return GenerationOptions(sampling=req.sampling, max_tokens=req.max_tokens, stop=req.stop)


_told_about_tools = threading.Event()  # warned once; later requests log it at INFO

#: What a model whose template has no tool-call syntax is told when a request offers tools:
#: otherwise it answers "I turned on the light" while nothing happens
NO_TOOLS_NOTE = ("You cannot call tools or control any device in this conversation. If you "
                 "are asked to act, say plainly that you cannot do it; never claim that you did.")


def without_tools(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with ``NO_TOOLS_NOTE`` at the end of its system message (one is added
    at the start when there is none)."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [*content, {"type": "text", "text": "\n\n" + NO_TOOLS_NOTE}]
        else:
            first["content"] = f"{content or ''}\n\n{NO_TOOLS_NOTE}".lstrip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": NO_TOOLS_NOTE}, *messages]


def chat_prompt(gen: Generator, req: ChatRequest) -> tuple[list[int], GenerationOptions]:
    """The rendered conversation's ids and the options (tool syntax, grammar, schema)."""
    opts = _options(req)
    tools = req.tools if req.tool_choice != "none" else []
    fmt = gen.template.tool_format
    if tools and fmt is None:
        if req.tool_choice in ("required", "function"):
            raise RequestError(
                f"this model's chat template ({gen.template.name}) has no tool-call syntax, so "
                "a tool call cannot be forced", param="tool_choice", code="tools_unsupported")
        _LOG.log(logging.WARNING if not _told_about_tools.is_set() else logging.INFO,
                 "this model's chat template (%s) has no tool-call syntax: the request's %d "
                 "tool(s) were left out of the prompt, and the model was told that it cannot "
                 "act", gen.template.name, len(tools))
        _told_about_tools.set()
        messages, tools = without_tools(req.messages), []
    else:
        messages = req.messages
    try:
        ids = gen.chat_prompt(messages, tools=tools or None, **req.template_kwargs)
    except ChatTemplateError as exc:
        raise RequestError(f"the model's chat template refused the conversation: {exc}",
                           param="messages", code="chat_template_error") from None
    except ValueError as exc:  # a message the template cannot be given (e.g. bad arguments)
        raise RequestError(str(exc), param="messages") from None
    if fmt == "harmony":
        # its answers are in channels with or without tools: reasoning apart from the answer
        opts = dataclasses.replace(opts, tool_format=fmt, tools_offered=bool(tools))
    if tools and fmt is not None:
        opts = dataclasses.replace(opts, tool_format=fmt)
        if req.tool_choice in ("required", "function"):
            try:
                grammar = tool_call_grammar(fmt, tools, gen.tokenizer, name=req.forced_tool)
            except (SchemaError, ValueError) as exc:
                raise RequestError(f"a tool's parameters cannot be enforced: {exc}",
                                   param="tools") from None
            opts = dataclasses.replace(opts, grammar=grammar)
    if req.json_schema is not None or req.json_mode:
        opts = dataclasses.replace(opts, json_schema=req.json_schema, json_mode=req.json_mode)
    return ids, opts


def completion_prompt(gen: Generator, req: CompletionRequest
                      ) -> tuple[list[int], GenerationOptions]:
    opts = dataclasses.replace(_options(req), continuation=True)
    if isinstance(req.prompt, str):
        return gen.text_prompt(req.prompt), opts
    bad = [t for t in req.prompt if not 0 <= t < gen.tokenizer.n_vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} in the prompt is outside the vocabulary "
                           f"(0..{gen.tokenizer.n_vocab - 1})", param="prompt")
    return list(req.prompt), opts


def start(runtime: Runtime, gen: Generator, req: ChatRequest | CompletionRequest,
          cancelled: threading.Event) -> Prepared:
    """Build the prompt, pick its cache slot and open the generation (on the model thread)."""
    if isinstance(req, ChatRequest):
        ids, opts, where = (*chat_prompt(gen, req), "messages")
    else:
        ids, opts, where = (*completion_prompt(gen, req), "prompt")
    if not ids:
        raise RequestError("the prompt is empty after tokenisation", param=where)
    n_ctx = gen.executor.n_ctx
    if len(ids) >= n_ctx:
        raise RequestError(
            f"this model's context holds {n_ctx} tokens, but the prompt is {len(ids)} tokens "
            f"(and the answer needs at least one more): shorten the {where} or start the node "
            f"with a larger --ctx", param=where, code="context_length_exceeded")
    slot = runtime.choose_slot(gen, ids, cache_key=req.cache_key, reuse=req.cache_prompt)
    try:
        events = gen.generate(ids, opts, session=slot, cancel=cancelled.is_set)
        if not req.cache_prompt:
            gen.clear(slot)  # only once the request is accepted: a refusal keeps the slot
    except ContextOverflowError as exc:
        raise RequestError(str(exc), param=where, code="context_length_exceeded") from None
    except SchemaError as exc:
        param = "tools" if opts.grammar is not None else "response_format"
        raise RequestError(f"the schema cannot be enforced: {exc}", param=param) from None
    except ValueError as exc:
        first = str(exc).split(" ", 1)[0]
        raise RequestError(str(exc), param=first if first in _SAMPLING_FIELDS else None) from None
    return Prepared(events=events, slot=slot, prompt_tokens=len(ids))
