"""OpenAI request bodies read into plain, checked requests.

Every field is checked here, before a request waits in the queue, and a refusal names the field
(``param``) the way OpenAI's API does, so a client learns what to fix from the first answer.
Unknown fields are refused rather than ignored: a misspelt ``max_token`` silently ignored would
give an answer that is not what was asked for. Fields OpenAI defines that change nothing here
(``user``, ``metadata``, ...) are accepted; fields whose meaning cannot be honoured (``n`` > 1,
``logprobs``) are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..text.sampler import SamplingParams

#: Accepted and without effect on the answer (bookkeeping fields of OpenAI's API).
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                      "parallel_tool_calls", "prompt_cache_retention"})

_SAMPLING_FIELDS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty", "logit_bias", "seed"})

_COMMON = frozenset({"model", "stream", "stream_options", "stop", "max_tokens", "n",
                     "logprobs", "prompt_cache_key", "cache_prompt"}) | _SAMPLING_FIELDS | _IGNORED

_CHAT_FIELDS = _COMMON | {"messages", "tools", "tool_choice", "response_format",
                          "max_completion_tokens", "top_logprobs", "chat_template_kwargs"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}

_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1000  # characters; a stop string is a marker, not a document
MAX_REPEAT_LAST_N = 1 << 20


class RequestError(Exception):
    """A request the API refuses, in OpenAI's error terms."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class CommonRequest:
    """What chat and text completions share."""

    model: str | None
    stream: bool
    include_usage: bool
    sampling: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    cache_key: str | None  # prompt_cache_key: keep this client's requests on one cache slot
    cache_prompt: bool  # False: evaluate the whole prompt (llama.cpp's cache_prompt)


@dataclass(frozen=True)
class ChatRequest(CommonRequest):
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"  # auto | none | required | a function's name (see forced_tool)
    forced_tool: str | None = None
    json_schema: dict[str, Any] | None = None
    json_mode: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompletionRequest(CommonRequest):
    prompt: str | list[int] = ""


def parse_chat_request(body: Any) -> ChatRequest:
    body = _object(body, None, "the request body")
    _unicode(body, "")
    _known(body, _CHAT_FIELDS, "/v1/chat/completions")
    common = _common(body, max_tokens_fields=("max_completion_tokens", "max_tokens"))
    if body.get("top_logprobs") not in (None, 0):
        raise RequestError("top_logprobs is not supported (log-probabilities are not returned)",
                           param="top_logprobs")
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    tool_choice, forced = _tool_choice(body.get("tool_choice"), tools)
    schema, json_mode = _response_format(body.get("response_format"))
    if (schema is not None or json_mode) and tool_choice in ("required", "function"):
        raise RequestError("response_format cannot be combined with a forced tool call "
                           "(tool_choice 'required' or a named function)", param="tool_choice")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        kwargs = _object(kwargs, "chat_template_kwargs", "chat_template_kwargs")
        reserved = {"messages", "tools", "add_generation_prompt"} & set(kwargs)
        if reserved:
            raise RequestError(f"chat_template_kwargs cannot set {sorted(reserved)[0]!r}; it "
                               "comes from the request itself", param="chat_template_kwargs")
    return ChatRequest(**common, messages=messages, tools=tools, tool_choice=tool_choice,
                       forced_tool=forced, json_schema=schema, json_mode=json_mode,
                       template_kwargs=dict(kwargs or {}))


def parse_completion_request(body: Any) -> CompletionRequest:
    body = _object(body, None, "the request body")
    _unicode(body, "")
    _known(body, _COMPLETION_FIELDS, "/v1/completions")
    # OpenAI's default for this endpoint is 16 tokens; an explicit null means "until the end"
    common = _common(body, max_tokens_fields=("max_tokens",),
                     default_max_tokens=None if body.get("max_tokens", 16) is None else 16)
    if body.get("echo") is not None and body["echo"] is not False:  # (0.0 == False in Python)
        raise RequestError("echo is not supported: only false", param="echo")
    if body.get("suffix") not in (None, ""):
        raise RequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.get("best_of") is not None and (not _is_int(body["best_of"]) or body["best_of"] != 1):
        raise RequestError("best_of must be 1 (one sequence is generated per request)",
                           param="best_of")
    return CompletionRequest(**common, prompt=_prompt(body.get("prompt")))


# -- shared fields --------------------------------------------------------------------------------


def _common(body: Mapping[str, Any], *, max_tokens_fields: tuple[str, ...],
            default_max_tokens: int | None = None) -> dict[str, Any]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        options = _object(options, "stream_options", "stream_options")
        _known(options, {"include_usage", "include_obfuscation"}, "stream_options")
        if not stream:
            raise RequestError("stream_options is only allowed with stream: true",
                               param="stream_options")
        include_usage = _bool(options, "include_usage", False, prefix="stream_options.")
    if body.get("n") is not None and (not _is_int(body["n"]) or body["n"] != 1):
        raise RequestError("n must be 1: one answer is generated per request", param="n")
    if body.get("logprobs") not in (None, False, 0):
        raise RequestError("logprobs is not supported (log-probabilities are not returned)",
                           param="logprobs")
    max_tokens = default_max_tokens
    for name in max_tokens_fields:  # max_completion_tokens wins over the deprecated max_tokens
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise RequestError(f"{name} must be an integer >= 1, got {value!r}", param=name)
            max_tokens = value
            break
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None and not isinstance(cache_key, str):
        raise RequestError("prompt_cache_key must be a string", param="prompt_cache_key")
    return {"model": model, "stream": stream, "include_usage": include_usage,
            "sampling": _sampling(body), "max_tokens": max_tokens, "stop": _stop(body.get("stop")),
            "cache_key": cache_key, "cache_prompt": _bool(body, "cache_prompt", True)}


def _sampling(body: Mapping[str, Any]) -> SamplingParams:
    """Sampling fields over llama.cpp's defaults (its server's, which OpenAI clients expect)."""
    d = SamplingParams()
    ranges = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
              "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
    values: dict[str, Any] = {}
    for name, (lo, hi) in ranges.items():
        v = body.get(name)
        if v is None:
            continue
        if not _is_number(v) or not lo <= v <= hi:
            raise RequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}",
                               param=name)
        values[name] = float(v)
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k):
            raise RequestError(f"top_k must be an integer (0 disables), got {top_k!r}",
                               param="top_k")
        values["top_k"] = top_k
    rp = body.get("repeat_penalty")
    if rp is not None:
        if not _is_number(rp) or rp <= 0 or not math.isfinite(rp):
            raise RequestError(f"repeat_penalty must be a number > 0 (1: off), got {rp!r}",
                               param="repeat_penalty")
        values["repeat_penalty"] = float(rp)
    last_n = body.get("repeat_last_n")
    if last_n is not None:
        if not _is_int(last_n) or not -1 <= last_n <= MAX_REPEAT_LAST_N:
            raise RequestError(f"repeat_last_n must be an integer in [-1, {MAX_REPEAT_LAST_N}] "
                               f"(-1: all tokens, 0: off), got {last_n!r}",
                               param="repeat_last_n")
        values["repeat_last_n"] = last_n
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise RequestError(f"seed must be an integer, got {seed!r}", param="seed")
        values["seed"] = seed
    bias = body.get("logit_bias")
    if bias is not None:
        bias = _object(bias, "logit_bias", "logit_bias")
        parsed: dict[int, float] = {}
        for key, value in bias.items():
            try:
                tid = int(key)
            except ValueError:
                raise RequestError(f"logit_bias keys are token ids, got {key!r}",
                                   param="logit_bias") from None
            if not _is_number(value) or not -100 <= value <= 100:
                raise RequestError(f"logit_bias values must be numbers in [-100, 100], got "
                                   f"{value!r} for token {key}", param="logit_bias")
            parsed[tid] = float(value)
        values["logit_bias"] = parsed
    return dataclasses.replace(d, **values)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or not all(isinstance(s, str) for s in items)
            or len(items) > MAX_STOP_STRINGS):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} "
                           "strings", param="stop")
    if any(s == "" for s in items):
        raise RequestError("stop strings must not be empty", param="stop")
    if any(len(s) > MAX_STOP_LENGTH for s in items):
        raise RequestError(f"stop strings are at most {MAX_STOP_LENGTH} characters long",
                           param="stop")
    return tuple(items)


# -- chat fields ----------------------------------------------------------------------------------


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        m = _object(m, where, where)
        role = m.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}",
                               param=f"{where}.role")
        content = m.get("content")
        if content is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise RequestError(f"{where}.content is required (only an assistant message "
                                   "with tool_calls may omit it)", param=f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(f"{where}.content[{j}]: only text parts are supported "
                                       f"(got {kind!r})", param=f"{where}.content")
        elif not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or a list of text parts",
                               param=f"{where}.content")
        if role == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise RequestError(f"{where}.tool_call_id must be a string",
                               param=f"{where}.tool_call_id")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list on an assistant message",
                                   param=f"{where}.tool_calls")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"{where}.tool_calls[{j}] needs function.name",
                                       param=f"{where}.tool_calls")
        # developer is OpenAI's newer name for system
        out.append({**m, "role": "system"} if role == "developer" else dict(m))
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError("tools must be a list", param="tools")
    names = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(f"{where}: only tools of type 'function' are supported",
                               param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"{where}.function.name is required", param=f"{where}.function")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object",
                               param=f"{where}.function.parameters")
        if fn["name"] in names:
            raise RequestError(f"two tools are named {fn['name']!r}", param=where)
        names.add(fn["name"])
    return [dict(t) for t in value]


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise RequestError("tool_choice 'required' needs tools", param="tool_choice")
        return str(value), None
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise RequestError("tool_choice.function.name is required", param="tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            raise RequestError(f"tool_choice names {name!r}, which is not among the tools",
                               param="tool_choice")
        return "function", name
    raise RequestError("tool_choice must be 'auto', 'none', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def _response_format(value: Any) -> tuple[dict[str, Any] | None, bool]:
    if value is None:
        return None, False
    value = _object(value, "response_format", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None, False
    if kind == "json_object":
        return None, True
    if kind == "json_schema":
        spec = _object(value.get("json_schema"), "response_format.json_schema",
                       "response_format.json_schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError("response_format.json_schema.strict must be true or false (the "
                               "schema is enforced either way)",
                               param="response_format.json_schema.strict")
        schema = spec.get("schema")
        if schema is None:  # OpenAI allows it: any JSON object
            return None, True
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object",
                               param="response_format.json_schema.schema")
        return schema, False
    raise RequestError("response_format.type must be 'text', 'json_object' or 'json_schema'",
                       param="response_format.type")


# -- text completion fields -----------------------------------------------------------------------


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, str):
        if not value:
            raise RequestError("prompt must not be empty", param="prompt")
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        return _prompt(value[0])  # a batch of one
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return list(value)
    if isinstance(value, list) and len(value) > 1:
        raise RequestError("one prompt per request (batches of prompts are not supported)",
                           param="prompt")
    raise RequestError("prompt must be a non-empty string or a list of token ids",
                       param="prompt")


# -- helpers --------------------------------------------------------------------------------------


def _unicode(body: Any, where: str) -> None:
    """Every string of the body must be text a model can read: JSON's escapes can spell a lone
    surrogate ("\\udc80"), which no UTF-8 tokenizer (nor llama.cpp) can encode. Walked with
    a stack of its own: a body nested as deep as the JSON parser allows must not overflow."""
    stack: list[tuple[Any, str]] = [(body, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = value[exc.start:exc.end].encode("unicode_escape").decode()
                raise RequestError(f"{at or 'the body'} is not valid Unicode: it holds a lone "
                                   f"surrogate ({bad}) at character {exc.start}; send UTF-8 "
                                   "text", param=at or None) from None
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, at))
                stack.append((v, f"{at}.{k}" if at else str(k)))
        elif isinstance(value, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(value))


def _object(value: Any, param: str | None, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object", param=param)
    return value


def _known(body: Mapping[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r} for {where} (see /openapi.json for "
                           "the accepted fields)", param=unknown[0], code="unknown_field")


def _bool(body: Mapping[str, Any], name: str, default: bool, prefix: str = "") -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{prefix}{name} must be true or false", param=prefix + name)
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
