"""The OpenAPI 3.2 description of the head's API (``GET /openapi.json``).

Written by hand rather than generated from ``protocol``: the document is a contract that a
reviewer reads, and ``tests/test_openapi.py`` holds it to the code (the accepted fields, the
ranges, the routes and real answers of a live server), so the two cannot drift apart silently.
Schemas are JSON Schema 2020-12, as OpenAPI 3.1 and 3.2 define them (3.2 for ``itemSchema``, which
describes a server-sent event stream event by event); response objects stay open to new
fields (clients must ignore what they do not know), request bodies are closed because the server
refuses unknown fields.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

API_TITLE = "Prima Home Cluster head API"
API_VERSION = "1"

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1000
MAX_REPEAT_LAST_N = 1 << 20

_FINISH_REASONS = ["stop", "length", "tool_calls"]
_STATES = ["loading", "ready", "failed", "stopping"]
_ERROR_TYPES = ["invalid_request_error", "rate_limit_error", "server_error", "not_found"]


# -- schema helpers -------------------------------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], *, required: list[str] | None = None,
         description: str | None = None, nullable: bool = False, **extra: Any) -> Schema:
    """An object schema; every property is required unless ``required`` says otherwise."""
    out: Schema = {"type": ["object", "null"] if nullable else "object"}
    if description:
        out["description"] = description
    out["properties"] = properties
    out["required"] = list(properties) if required is None else required
    out.update(extra)
    return out


def _t(kind: str | list[str], description: str | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": kind}
    if description:
        out["description"] = description
    out.update(extra)
    return out


def _opt(kind: str | list[str], description: str, **extra: Any) -> Schema:
    """A request field: null is accepted everywhere and means "not given" (the default)."""
    kinds = [kind] if isinstance(kind, str) else list(kind)
    return _t([*kinds, "null"], description, **extra)


def _only(values: list[Any], description: str) -> Schema:
    """An OpenAI field accepted only with the value that asks for nothing unsupported."""
    return {"enum": [*values, None], "description": description}


def _ignored(description: str) -> Schema:
    return {"description": f"{description} Accepted and ignored (any value)."}


# -- request schemas ------------------------------------------------------------------------------


def _sampling_fields() -> dict[str, Schema]:
    """llama.cpp's server defaults, which OpenAI clients are used to from local servers."""
    return {
        "temperature": _opt("number", "Sampling temperature; 0 picks the most likely token "
                            "(greedy).", minimum=0, maximum=2, default=0.8),
        "top_p": _opt("number", "Nucleus sampling: keep the smallest set of tokens whose "
                      "probability adds up to top_p; 1 turns it off.",
                      minimum=0, maximum=1, default=0.95),
        "top_k": _opt("integer", "Keep the k most likely tokens; 0 or less turns it off "
                      "(llama.cpp extension).", default=40),
        "min_p": _opt("number", "Drop tokens less likely than min_p times the most likely one; "
                      "0 turns it off (llama.cpp extension).", minimum=0, maximum=1,
                      default=0.05),
        "repeat_penalty": _opt("number", "Penalise the tokens of the last repeat_last_n "
                               "(prompt included): positive logits are divided by it, negative "
                               "ones multiplied; 1 turns it off (llama.cpp extension).",
                               exclusiveMinimum=0, default=1.0),
        "repeat_last_n": _opt("integer", "How many recent tokens the repeat, presence and "
                              "frequency penalties look at; -1: all, 0: penalties off "
                              "(llama.cpp extension).", minimum=-1, maximum=MAX_REPEAT_LAST_N,
                              default=64),
        "presence_penalty": _opt("number", "Subtracted from the logit of every token seen in "
                                 "the last repeat_last_n.", minimum=-2, maximum=2, default=0.0),
        "frequency_penalty": _opt("number", "Subtracted from a token's logit once per time it "
                                  "was seen in the last repeat_last_n.", minimum=-2, maximum=2,
                                  default=0.0),
        "logit_bias": _opt("object", "Token id (as a string) to a bias added to its logit; "
                           "-100 practically bans the token, 100 practically forces it. Ids "
                           "outside the vocabulary are refused.",
                           propertyNames={"pattern": "^[0-9]+$"},
                           additionalProperties={"type": "number", "minimum": -100,
                                                 "maximum": 100}),
        "seed": _opt("integer", "Seed of the sampler's random numbers: the same request with "
                     "the same seed gives the same answer. Default: a fresh random seed.",
                     minimum=_SEED_MIN, maximum=_SEED_MAX),
    }


def _common_fields(*, max_tokens: Schema) -> dict[str, Schema]:
    return {
        "model": _opt("string", "Accepted for compatibility and not checked: the node serves "
                      "one model, named in every answer and by GET /v1/models."),
        "stream": _opt("boolean", "Answer with server-sent events (one chunk per piece of "
                       "text, then `data: [DONE]`).", default=False),
        "stream_options": _obj(
            {"include_usage": _opt("boolean", "Send a last chunk with `usage` and empty "
                                   "`choices`; every other chunk then carries `usage: null`.",
                                   default=False),
             "include_obfuscation": _ignored("OpenAI's stream padding option.")},
            required=[], nullable=True, additionalProperties=False,
            description="Only allowed with `stream: true`."),
        "max_tokens": max_tokens,
        "stop": {"description": f"Up to {MAX_STOP_STRINGS} strings that end the answer; the "
                 "stop string itself is not part of the answer.",
                 "anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
                           {"type": "array", "maxItems": MAX_STOP_STRINGS,
                            "items": {"type": "string", "minLength": 1,
                                      "maxLength": MAX_STOP_LENGTH}},
                           {"type": "null"}]},
        **_sampling_fields(),
        "n": _opt("integer", "Answers per request: only 1 (one sequence is generated).",
                  minimum=1, maximum=1, default=1),
        "logprobs": _only([False, 0], "Log-probabilities are not returned: only false/0."),
        "prompt_cache_key": _opt("string", "A name for this client's conversation (OpenAI's "
                                 "field): its requests stay on one KV-cache slot when no slot "
                                 "already holds at least half of the prompt."),
        "cache_prompt": _opt("boolean", "Reuse the KV cache of earlier requests for the longest "
                             "common prefix of the prompt; false evaluates the whole prompt "
                             "(llama.cpp extension).", default=True),
        "user": _ignored("OpenAI's end-user id."),
        "metadata": _ignored("OpenAI's stored-completion metadata."),
        "store": _ignored("OpenAI's stored completions."),
        "service_tier": _ignored("OpenAI's service tier."),
        "safety_identifier": _ignored("OpenAI's end-user id."),
        "parallel_tool_calls": _ignored("Whether the model may call several tools at once "
                                        "(the model decides)."),
        "prompt_cache_retention": _ignored("OpenAI's prompt cache retention."),
    }


def _chat_request() -> Schema:
    fields = _common_fields(max_tokens=_opt(
        "integer", "Most tokens to generate (deprecated name of max_completion_tokens). "
        "Default: until the model ends its answer or the context is full.", minimum=1))
    fields.update({
        "messages": _t("array", "The conversation so far.", minItems=1,
                       items=_ref("ChatMessage")),
        "max_completion_tokens": _opt("integer", "Most tokens to generate; wins over "
                                      "max_tokens. Default: until the model ends its answer "
                                      "or the context is full.", minimum=1),
        "tools": _opt("array", "Functions the model may call. Their names must be unique.",
                      items=_ref("Tool")),
        "tool_choice": {
            "description": "`auto` (default): the model may answer or call tools. `none`: the "
            "tools are not shown to the model at all. `required`: the answer is a call of one of "
            "the tools (constrained). A named function: the answer is a call of that function "
            "(constrained).",
            "anyOf": [{"enum": ["auto", "none", "required"]}, _ref("NamedToolChoice"),
                      {"type": "null"}],
            "default": "auto"},
        "response_format": {
            "description": "`json_object`: the answer is a JSON object. `json_schema`: the "
            "answer is JSON valid against the schema (constrained). Not combinable with "
            "tool_choice `required` or a named function.",
            "anyOf": [_ref("ResponseFormat"), {"type": "null"}]},
        "top_logprobs": _only([0], "Log-probabilities are not returned: only 0."),
        "chat_template_kwargs": _opt(
            "object", "Extra variables for the model's chat template (llama.cpp extension), "
            "e.g. {\"enable_thinking\": false}. messages, tools and add_generation_prompt come "
            "from the request and cannot be set here.",
            propertyNames={"not": {"enum": ["messages", "tools", "add_generation_prompt"]}}),
    })
    return _obj(fields, required=["messages"], additionalProperties=False,
                description="Fields not listed here are refused (400, code unknown_field).")


def _completion_request() -> Schema:
    fields = _common_fields(max_tokens=_opt(
        "integer", "Most tokens to generate; null: until the model ends its answer or the "
        "context is full.", minimum=1, default=16))
    fields.update({
        "prompt": {"description": "The text to continue: a string, a list of token ids, or a "
                   "batch of exactly one of those.",
                   "anyOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                             {"type": "array", "minItems": 1, "maxItems": 1,
                              "items": {"anyOf": [
                                  {"type": "string", "minLength": 1},
                                  {"type": "array", "minItems": 1,
                                   "items": {"type": "integer"}}]}}]},
        "echo": _only([False], "Echoing the prompt is not supported: only false."),
        "suffix": _only([""], "Fill-in-the-middle is not supported: only empty."),
        "best_of": _only([1], "Only 1: one sequence is generated per request."),
    })
    return _obj(fields, required=["prompt"], additionalProperties=False,
                description="Fields not listed here are refused (400, code unknown_field).")


def _chat_message() -> Schema:
    content = {"anyOf": [
        {"type": "string"},
        {"type": "array", "items": _obj({"type": {"const": "text"}, "text": {"type": "string"}},
                                        description="Only text parts are supported.")},
        {"type": "null"}]}
    return {
        "type": "object",
        "description": "One message. `developer` is read as `system`. Other fields are passed "
        "to the chat template as they are.",
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": content,
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "description": "An assistant's earlier calls "
                           "(send them back with the tool results).",
                           "items": {"type": "object", "required": ["function"],
                                     "properties": {"function": {
                                         "type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string"}}}}}},
            "tool_call_id": {"type": "string", "description": "On a tool message: the call it "
                             "answers."},
        },
        "required": ["role"],
        # content may only be missing or null on an assistant message carrying tool_calls
        "anyOf": [{"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                  {"required": ["tool_calls"], "properties": {"role": {"const": "assistant"},
                                                              "tool_calls": {"minItems": 1}}}],
    }


def _tool() -> Schema:
    return _obj({
        "type": {"const": "function"},
        "function": _obj({
            "name": _t("string", minLength=1),
            "description": _t("string"),
            "parameters": _t("object", "A JSON schema of the arguments; a forced call "
                             "(tool_choice required or named) follows it."),
        }, required=["name"]),
    }, description="Only function tools are supported.")


def _response_format() -> Schema:
    return {"oneOf": [
        _obj({"type": {"const": "text"}}),
        _obj({"type": {"const": "json_object"}}),
        _obj({"type": {"const": "json_schema"},
              "json_schema": _obj({
                  "name": _t("string"),
                  "description": _t("string"),
                  "schema": _t(["object", "null"], "The JSON schema the answer follows; "
                               "missing or null: any JSON object."),
                  "strict": _t(["boolean", "null"], "Accepted; the schema is always enforced."),
              }, required=[])})]}


# -- response schemas -----------------------------------------------------------------------------


def _usage() -> Schema:
    return _obj({
        "prompt_tokens": _t("integer", minimum=0),
        "completion_tokens": _t("integer", minimum=0),
        "total_tokens": _t("integer", minimum=0),
        "prompt_tokens_details": _obj({"cached_tokens": _t(
            "integer", "Prompt tokens served from the KV cache (not evaluated again).",
            minimum=0)}),
    })


def _timings() -> Schema:
    ms, n, rate = "number", "integer", "number"
    return _obj({
        "cache_n": _t(n, "Prompt tokens served from the KV cache.", minimum=0),
        "prompt_n": _t(n, "Prompt tokens evaluated (prompt_tokens - cache_n).", minimum=0),
        "prompt_ms": _t(ms, "Time evaluating them.", minimum=0),
        "prompt_per_second": _t(rate, "prompt_n / prompt_ms, per second.", minimum=0),
        "predicted_n": _t(n, "Tokens generated.", minimum=0),
        "predicted_ms": _t(ms, "Decode time after the first token.", minimum=0),
        "predicted_per_token_ms": _t(ms, "Decode time per forward pass after the prompt.",
                                     minimum=0),
        "predicted_per_second": _t(rate, "1000 / predicted_per_token_ms (0 without decode "
                                   "steps).", minimum=0),
        "first_token_ms": _t(ms, "From the start of the generation (after queueing) to the "
                             "first token.", minimum=0),
    }, description="llama.cpp's timings object (field names as its server uses them).")


def _envelope(kind: str, choice: Schema, *, chunk: bool, id_prefix: str) -> Schema:
    props: dict[str, Schema] = {
        "id": _t("string", "The same on every chunk of one answer.", pattern=f"^{id_prefix}"),
        "object": {"const": kind},
        "created": _t("integer", "Unix time of the request."),
        "model": _t("string", "The node's model id (the GGUF file's name without .gguf)."),
        "system_fingerprint": _t("string"),
        "choices": _t("array", items=choice, maxItems=1,
                      **({"description": "Empty in the usage chunk."} if chunk else
                         {"minItems": 1})),
    }
    required = list(props)
    if chunk:
        props["usage"] = {"description": "With stream_options.include_usage: null on every "
                          "chunk but the last, which carries the usage and no choices.",
                          "anyOf": [_ref("Usage"), {"type": "null"}]}
        props["timings"] = {"description": "On the chunk that carries finish_reason.",
                            **_ref("Timings")}
    else:
        props["usage"] = _ref("Usage")
        props["timings"] = _ref("Timings")
        required += ["usage", "timings"]
    return _obj(props, required=required)


def _finish(nullable: bool) -> Schema:
    return {"enum": [*_FINISH_REASONS, None] if nullable else _FINISH_REASONS,
            "description": "stop: the model ended or a stop string matched; length: "
            "max_tokens or the context was reached; tool_calls: the answer is tool calls."}


def _tool_call(*, indexed: bool) -> Schema:
    props: dict[str, Schema] = {"index": _t("integer", "Position among this answer's calls.",
                                            minimum=0)} if indexed else {}
    props.update({
        "id": _t("string"),
        "type": {"const": "function"},
        "function": _obj({"name": _t("string"),
                          "arguments": _t("string", "A JSON object, as text.")}),
    })
    return _obj(props, description="Streamed calls arrive whole, one per chunk."
                if indexed else None)


def _chat_completion() -> Schema:
    message = _obj({
        "role": {"const": "assistant"},
        "content": _t(["string", "null"], "null when the answer is only tool calls."),
        "refusal": _t("null"),
        "reasoning_content": _t("string", "The model's reasoning, where its format keeps it "
                                "apart from the answer (harmony: gpt-oss's analysis channel)."),
        "tool_calls": _t("array", items=_ref("ToolCall"), minItems=1),
    }, required=["role", "content", "refusal"])
    choice = _obj({"index": {"const": 0}, "message": message, "logprobs": _t("null"),
                   "finish_reason": _finish(False)})
    return _envelope("chat.completion", choice, chunk=False, id_prefix="chatcmpl-")


def _chat_chunk() -> Schema:
    delta = _obj({
        "role": {"const": "assistant"},
        "content": _t("string"),
        "reasoning_content": _t("string", "A piece of the model's reasoning (harmony)."),
        "tool_calls": _t("array", items=_ref("ToolCallDelta"), minItems=1),
    }, required=[], description="The first chunk has role and empty content; the one with "
       "finish_reason has an empty delta.")
    choice = _obj({"index": {"const": 0}, "delta": delta, "logprobs": _t("null"),
                   "finish_reason": _finish(True)})
    return _envelope("chat.completion.chunk", choice, chunk=True, id_prefix="chatcmpl-")


def _text_choice(*, chunk: bool) -> Schema:
    return _obj({"index": {"const": 0}, "text": _t("string"), "logprobs": _t("null"),
                 "finish_reason": _finish(chunk)})


def _sse_event(chunk: str) -> Schema:
    """One server-sent event of a streamed answer, as OpenAPI 3.2's ``itemSchema`` describes a
    stream: its fields as an object, the JSON in ``data`` by ``contentSchema``."""
    def json_data(name: str, description: str) -> Schema:
        return {"type": "string", "description": description,
                "contentMediaType": "application/json", "contentSchema": _ref(name)}

    return _obj({"data": {"anyOf": [
        json_data(chunk, "A part of the answer."),
        json_data("Error", "The answer failed part-way; the last event."),
        {"const": "[DONE]", "description": "The answer is complete; the last event."},
    ]}}, description=f"One event of a streamed answer (a `data:` line and a blank line; no "
       f"`event`, `id` or `retry` fields): `{chunk}` events, then `[DONE]`; or, when the answer "
       "fails part-way, one `Error` in place of `[DONE]`.", additionalProperties=False)


def _model_info(extra: dict[str, Schema], required: list[str]) -> Schema:
    """What the node reports about its model (the GGUF file's metadata once loaded)."""
    props = {
        **extra,
        "name": _t("string"),
        "file": _t("string"),
        "path": _t("string"),
        "size_bytes": _t("integer"),
        "architecture": _t("string"),
        "n_params": _t("integer"),
        "n_layers": _t("integer"),
        "n_embd": _t("integer"),
        "n_vocab": _t("integer"),
        "n_ctx_train": _t("integer", "The context length the model was trained with."),
        "n_ctx": _t("integer", "The context length the node runs it with (--ctx)."),
        "quant": _t(["string", "null"], "The quantisation holding most of the bytes."),
        "tensor_bytes_by_type": _t("object", additionalProperties={"type": "integer"}),
        "kv_bytes_per_token": _t("integer"),
        "gpu": _gpu_schema("The GPU the model uses; null: none (a CPU-only build, or no "
                           "layer asked for one)."),
        "gpu_layers": _t("integer", "Of its layers, how many the node runs on the GPU when "
                         "it serves alone (--gpu-layers); a ring's plan says its own."),
        "chat_template": _t("string"),
        "tool_format": _t(["string", "null"], "The tool-call syntax of the chat template "
                          "(null: tool calls cannot be recognised or forced)."),
        "can_call_tools": _t("boolean", "Whether the model can call tools. When it cannot, "
                             "a request's tools are left out of the prompt and the model is "
                             "told that it cannot act; a forced call is refused (400 "
                             "tools_unsupported)."),
    }
    return _obj(props, required=required, description="Most fields appear once the model "
                "is loaded.")


def _gpu_schema(description: str) -> Schema:
    return _obj({
        "name": _t("string", "ggml's name for it: CUDA0, MTL0 (Metal), Vulkan0."),
        "description": _t("string", "The card, as its driver names it."),
        "backend": _t("string", "CUDA, MTL (Metal) or Vulkan."),
        "unified": _t("boolean", "An integrated GPU sharing the host's memory (Apple "
                      "silicon)."),
        "memory_free": _t("integer", "Free GPU memory now, bytes."),
        "memory_total": _t("integer"),
        "used_by_model": _t("integer", "What the node holds there: its GPU layers' weights "
                            "and KV caches and the end tensors' copies, bytes."),
    }, nullable=True, description=description)


def _status_document() -> Schema:
    count = _t("integer", minimum=0)
    return _obj({
        "api_version": _t("integer", "Bumped on incompatible changes of this document."),
        "version": _t("string", "prima-node's version."),
        "node_id": _t("string", "Stable across restarts (kept in the state directory)."),
        "cluster_id": _t("string", "The head's node_id."),
        "state": {"enum": _STATES},
        "error": _t(["string", "null"], "Why the model failed to load."),
        "started_at": _t("string", format="date-time"),
        "uptime_s": _t("number"),
        "model": _model_info({"id": _t("string", "The id answers carry as `model`.")},
                             required=["id", "file"]),
        "context": _obj({
            "n_ctx": count, "cache_slots": count,
            "kv_tokens": _t("integer", "Positions held in all cache slots.", minimum=0),
            "kv_capacity_tokens": _t("integer", "n_ctx * cache_slots once loaded (0 before).",
                                     minimum=0),
            "kv_usage": _t("number", minimum=0, maximum=1)}),
        "queue": _obj({"running": count, "waiting": count,
                       "limit": _t("integer", "Waiting requests allowed (--queue-limit).")}),
        "requests": _obj({
            "requests": _t("integer", "Generations started.", minimum=0),
            "errors": _t("integer", "Answers with status >= 400 (any endpoint).", minimum=0),
            "prompt_tokens": count, "completion_tokens": count}),
        "last_request": _obj({
            "at": _t("string", format="date-time"),
            "endpoint": _t("string"),
            "finish_reason": _t("string"),
            "prompt_tokens": count, "cached_tokens": count, "completion_tokens": count,
            "prefill_tokens_per_s": _t("number"), "decode_tokens_per_s": _t("number"),
            "first_token_s": _t("number"),
        }, nullable=True, description="The last finished generation; null before the first."),
        "cluster": _obj({
            "mode": {"enum": ["single", "ring"], "description": "single: one machine (a "
                     "cluster of one); ring: a head and workers running the model together."},
            "nodes": _t("array", items=_obj({
                "node_id": _t("string"),
                "name": _t("string", "The host name."),
                "role": {"enum": ["head", "worker"]},
                "online": _t("boolean"),
                "address": _t("string", "host:port as configured."),
                "layers": _t(["array", "null"], "[first, end) of the layers this node runs "
                             "(single mode; null in a ring, see ranges).",
                             items={"type": "integer"}, minItems=2, maxItems=2),
                "version": _t(["string", "null"], "The node's prima-node version; null "
                              "while a worker has not reported it."),
                "memory": _obj({
                    "total_bytes": _t("integer"),
                    "available_bytes": _t("integer", "What the node can count on now (the "
                                          "OS's and its cgroup's rules)."),
                    "pressure_some_avg10": _t(["number", "null"], "Linux PSI: percent of the "
                                              "last 10 s some task waited for memory; null "
                                              "without PSI."),
                }, nullable=True, description="Read afresh (a worker's every 2 s); null while "
                   "a worker has not reported it."),
                "disk_read_bytes_per_s": _t(["number", "null"], "Ring: sequential read speed "
                                            "of the disk under its model file, from its "
                                            "profile; null before a plan and on a lone node."),
                "ranges": _t("array", "Ring: [first, end) of its window in each round.",
                             items=_t("array", items={"type": "integer"}, minItems=2,
                                      maxItems=2)),
                "layer_count": _t("integer", "Ring: layers it holds in all rounds."),
                "window": _t("integer", "Ring: layers per round (its largest window; a node's "
                                            "windows may differ by a layer)."),
                "gpu_layers": _t("integer", "Ring: of those, on its GPU."),
                "regime": _t(["string", "null"], "Ring: M4 (all in memory) or M1-M3 "
                             "(streams part of each window from disk)."),
                "predicted_compute_ms": _t(["number", "null"], "Ring: the plan's compute "
                                           "time per token."),
                "predicted_disk_ms": _t(["number", "null"], "Ring: the plan's disk "
                                        "streaming time per token."),
                "measured_compute_ms": _t(["number", "null"], "Ring: measured compute per "
                                          "decoded token (moving average); null before one."),
                "paging": _obj({
                    "enabled": _t("boolean", "false: --prefetch off (paging left to the OS)."),
                    "mode": {"enum": ["resident", "stream"], "description": "resident: its "
                             "windows fit and stay in memory; stream: each window is released "
                             "after use and the next one read ahead."},
                    "tail_bytes": _t("integer", "Streaming: bytes at the end of each window "
                                     "(in the order a forward pass reads them) that are "
                                     "released and read ahead, the rest staying (at least "
                                     "a window's bytes: whole windows move); 0 when nothing "
                                     "does."),
                    "mode_changes": _t("integer", "Times the node changed mode or tail as "
                                       "its available memory moved (read every few seconds "
                                       "of use)."),
                    "held_bytes": _t("integer", "Weights of all its windows."),
                    "capacity_bytes": _t("integer", "Memory it can count on for them, as "
                                         "last read."),
                    "uses": count,
                    "hit_rate": _t(["number", "null"], "Share of measured window uses that "
                                   "found at least 99% of the window in memory."),
                    "mean_residency": _t(["number", "null"], "Mean share of a window in "
                                         "memory before its use."),
                    "prefetches": count, "releases": count,
                    "bytes_prefetched": count, "bytes_released": count,
                }, nullable=True, description="Ring: prefetch and release of its windows; "
                   "null before it holds a plan."),
                "gpu": _gpu_schema("Its GPU and the memory its GPU layers hold there, read "
                                   "afresh; null without one (or before it reports)."),
                "gpu_unavailable": _t(["string", "null"], "Why a GPU backend its build has "
                                      "goes unused (it found no device: the driver is missing "
                                      "or too old), every layer then on its CPU; null when it "
                                      "found one, or the build has none, or --gpu none."),
                "repacked_bytes": _t(["integer", "null"], "Ring: anonymous memory holding "
                                     "repacked copies of its windows' matrices, which decode "
                                     "steps multiply with while the windows stay resident (0: "
                                     "it streams, or they would not fit twice); null before "
                                     "it reports."),
            }, required=["node_id", "name", "role", "online", "address", "layers"])),
            "plan": _obj({
                "k": _t("integer", "Rounds a token makes around the ring."),
                "ring": _t("array", "Node ids in ring order, the head first.",
                           items={"type": "string"}),
                "predicted_ms_per_token": _t("number"),
                "bound": _t("string", "What sets the predicted latency."),
                "measured_ms_per_token": _t(["number", "null"], "Decode steps, moving "
                                            "average; null before one."),
                "hop_overhead_ms": _t(["number", "null"], "What a ring hop costs beyond its "
                                      "link (the nodes' handling of a frame), learnt from "
                                      "decode steps and priced by the next plan; null "
                                      "before one."),
                "planned_at": _t("string", format="date-time"),
                "dropped": _t("object", "Nodes left out of the ring, with the reason.",
                              additionalProperties={"type": "string"}),
            }, nullable=True, description="The ring's plan; null on a lone node."),
            "links": _t("array", "Ring: every hop between two nodes as measured over the "
                        "real link when the plan was made.", items=_obj({
                            "from": _t("string", "Node id."), "to": _t("string", "Node id."),
                            "latency_ms": _t("number", "Half the median round trip."),
                            "mbit_per_s": _t("number", "Throughput of bulk transfers."),
                        })),
            "discovered": _t("array", "Ring: nodes seen over mDNS (_prima._tcp); workers of "
                             "this cluster holding the head's model are adopted.",
                             items=_obj({
                                 "node_id": _t("string"), "name": _t("string"),
                                 "address": _t("string", "host:port"),
                                 "role": {"enum": ["head", "worker", "standalone"]},
                                 "model": _t("string", "Its model file's name."),
                                 "version": _t("string"),
                                 "adopted": _t("boolean"),
                                 "reason": _t(["string", "null"], "Why it was not adopted."),
                             })),
        }, required=["mode", "nodes", "plan"]),
    }, description="The node's state for dashboards (Home Assistant). Later versions add "
       "fields; clients must ignore fields they do not know.")


def _components() -> dict[str, Any]:
    schemas: dict[str, Schema] = {
        "ChatCompletionRequest": _chat_request(),
        "CompletionRequest": _completion_request(),
        "ChatMessage": _chat_message(),
        "Tool": _tool(),
        "NamedToolChoice": _obj({"type": {"const": "function"},
                                 "function": _obj({"name": _t("string")})},
                                description="Names one of the tools."),
        "ResponseFormat": _response_format(),
        "ChatCompletion": _chat_completion(),
        "ChatCompletionChunk": _chat_chunk(),
        "Completion": _envelope("text_completion", _text_choice(chunk=False), chunk=False,
                                id_prefix="cmpl-"),
        "CompletionChunk": _envelope("text_completion", _text_choice(chunk=True), chunk=True,
                                     id_prefix="cmpl-"),
        "ToolCall": _tool_call(indexed=False),
        "ToolCallDelta": _tool_call(indexed=True),
        "Usage": _usage(),
        "Timings": _timings(),
        "ModelList": _obj({"object": {"const": "list"}, "data": _t("array", items=_obj({
            "id": _t("string"), "object": {"const": "model"},
            "created": _t("integer", "The model file's modification time."),
            "owned_by": _t("string"),
            "meta": _model_info({"state": {"enum": _STATES}}, required=["state"]),
        }), minItems=1, maxItems=1)}),
        "Error": _obj({"error": _obj({
            "message": _t("string", "What is wrong and what to do about it."),
            "type": {"enum": _ERROR_TYPES},
            "param": _t(["string", "null"], "The request field at fault, e.g. `temperature` or "
                        "`messages[2].role`."),
            "code": _t(["string", "null"], "A stable code, e.g. unknown_field, "
                       "context_length_exceeded, invalid_api_key, queue_full, model_loading."),
        })}, description="OpenAI's error shape. A stream that fails after its headers were "
           "sent ends with one `data:` event of this shape instead of `data: [DONE]`."),
        "Health": _obj({
            "status": {"enum": ["ok", "loading", "failed", "stopping"]},
            "error": _t("string", "Why the model failed to load."),
        }, required=["status"]),
        "ChatCompletionChunkEvent": _sse_event("ChatCompletionChunk"),
        "CompletionChunkEvent": _sse_event("CompletionChunk"),
        "StatusDocument": _status_document(),
        "ClusterView": _status_document()["properties"]["cluster"],
        "StatusEvent": _obj({"type": {"const": "status"}, "data": _ref("StatusDocument")},
                            description="A message of the /api/events websocket."),
    }
    return {
        "schemas": schemas,
        "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "The node's API key (--api-key, --api-key-file or $PRIMA_API_KEY). "
            "Without a configured key every endpoint is open."}},
        "headers": {"Retry-After": {"description": "Seconds to wait before retrying.",
                                    "schema": {"type": "integer"}}},
        "responses": {
            "BadRequest": _error("An invalid field (named in `param`), a body that is not "
                                 "JSON, or a prompt longer than the context."),
            "Unauthorized": _error("No API key, or a wrong one (code invalid_api_key)."),
            "TooLarge": _error("The body is over 16 MiB."),
            "QueueFull": _error("Too many requests are waiting for the model (code "
                                "queue_full).", retry=True),
            "Unavailable": _error("The model is loading (model_loading), failed to load "
                                  "(model_failed), or the node is stopping (shutting_down, "
                                  "cancelled).", retry=True),
            "InternalError": _error("A bug (code internal_error)."),
        },
    }


# -- paths ----------------------------------------------------------------------------------------


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": _ref("Error")}}}
    if retry:
        out["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return out


def _errors(*names: str) -> dict[str, Any]:
    codes = {"BadRequest": "400", "Unauthorized": "401", "TooLarge": "413", "QueueFull": "429",
             "InternalError": "500", "Unavailable": "503"}
    return {codes[n]: {"$ref": f"#/components/responses/{n}"} for n in names}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _ref(schema)}}}


def _generation(*, summary: str, operation_id: str, request: str, answer: str, chunk: str,
                description: str) -> dict[str, Any]:
    return {"post": {
        "operationId": operation_id,
        "tags": ["OpenAI-compatible"],
        "summary": summary,
        "description": description,
        "requestBody": {"required": True, "description": "JSON (any Content-Type is read as "
                        "JSON, as llama.cpp's server does).",
                        "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "The answer; with `stream: true` server-sent events, "
                    "described one by one (OpenAPI 3.2's itemSchema).",
                    "content": {
                        "application/json": {"schema": _ref(answer)},
                        "text/event-stream": {"itemSchema": _ref(f"{chunk}Event")}}},
            **_errors("BadRequest", "Unauthorized", "TooLarge", "QueueFull", "InternalError",
                      "Unavailable"),
        }}}


def _get(operation_id: str, summary: str, description: str, responses: dict[str, Any], *,
         tag: str = "Node", public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary,
                          "description": description, "responses": responses}
    if public:
        op["security"] = []
    return {"get": op}


_METRICS = (
    ("prima_requests_total", "counter", "HTTP requests answered, labels endpoint and status "
     "(499: the client went away)."),
    ("prima_generations_total", "counter", "Generations finished, label reason."),
    ("prima_prompt_tokens_total", "counter", "Prompt tokens of finished generations."),
    ("prima_completion_tokens_total", "counter", "Tokens generated."),
    ("prima_prefix_cache_hits_total", "counter", "Generations that reused cached prompt "
     "tokens."),
    ("prima_prefix_cache_misses_total", "counter", "Generations whose prompt was evaluated "
     "whole."),
    ("prima_prefix_cache_tokens_total", "counter", "Prompt tokens served from the KV cache."),
    ("prima_queue_rejected_total", "counter", "Requests answered 429."),
    ("prima_queue_wait_seconds", "histogram", "Time waiting for the model."),
    ("prima_prefill_seconds", "histogram", "Prompt evaluation time per generation."),
    ("prima_time_to_first_token_seconds", "histogram", "Generation start (after queueing) to "
     "first token."),
    ("prima_decode_seconds_per_token", "histogram", "Mean decode time per token of each "
     "generation."),
    ("prima_queue_depth", "gauge", "Requests waiting for the model."),
    ("prima_requests_running", "gauge", "Requests being generated."),
    ("prima_kv_cache_tokens", "gauge", "Positions held in the KV cache slots."),
    ("prima_kv_cache_capacity_tokens", "gauge", "Positions the KV cache slots can hold."),
    ("prima_kv_cache_usage_ratio", "gauge", "kv_cache_tokens / kv_cache_capacity_tokens."),
    ("prima_model_ready", "gauge", "1 when the model is loaded and answering."),
)


def _paths() -> dict[str, Any]:
    metrics = "\n".join(f"- `{name}` ({kind}): {help}" for name, kind, help in _METRICS)
    return {
        "/v1/chat/completions": _generation(
            summary="Chat completion", operation_id="createChatCompletion",
            request="ChatCompletionRequest", answer="ChatCompletion",
            chunk="ChatCompletionChunk",
            description="OpenAI's chat completions: streaming, tools (tool_choice auto, none, "
            "required or a named function), response_format json_object/json_schema "
            "(constrained), llama.cpp's extra sampling fields. The prompt's longest prefix "
            "already in a KV-cache slot is not evaluated again."),
        "/v1/completions": _generation(
            summary="Text completion", operation_id="createCompletion",
            request="CompletionRequest", answer="Completion", chunk="CompletionChunk",
            description="OpenAI's legacy completions: the answer continues the prompt's text "
            "(no chat template)."),
        "/v1/models": _get("listModels", "The served model",
                           "One entry: the node's model, with its load state and metadata.",
                           {"200": _json("ModelList", "The model list."),
                            **_errors("Unauthorized")}, tag="OpenAI-compatible"),
        "/health": _get("health", "Readiness (no key needed)",
                        "200 once the model answers; 503 while it loads, after a failed load "
                        "(with the reason) and while stopping.",
                        {"200": _json("Health", "Ready."),
                         "503": _json("Health", "Not ready.")}, public=True),
        "/metrics": _get("metrics", "Prometheus metrics",
                         "Text exposition format 0.0.4. Metrics:\n\n" + metrics,
                         {"200": {"description": "The metrics.", "content": {
                             "text/plain": {"schema": {"type": "string"}}}},
                          **_errors("Unauthorized")}),
        "/api/status": _get("status", "The node's status document",
                            "Model, context, KV cache, queue, totals, last request and the "
                            "cluster view.",
                            {"200": _json("StatusDocument", "The document."),
                             **_errors("Unauthorized")}),
        "/api/events": _get(
            "events", "Status changes (websocket)",
            "A websocket (send the key as a header on the handshake). The server sends "
            "StatusEvent messages as JSON text: the current document at once, then a new one "
            "whenever it changes (load state, queue, each finished generation); changes within "
            "one event-loop turn make one message. Messages from the client are ignored. The "
            "server pings every 30 s and closes the socket when it stops.",
            {"101": {"description": "Switching to the websocket protocol; then StatusEvent "
                     "messages.", "x-websocket-message": _ref("StatusEvent")},
             "400": _error("Not a websocket handshake (code bad_request)."),
             **_errors("Unauthorized")}),
        "/api/link": _get(
            "link", "Link probe (websocket)",
            "What nodes measure a ring hop with (round trip and throughput); "
            "`prima-node link URL` runs it. Binary frames only: a frame whose first byte is 1 "
            "(PING) comes back unchanged; a frame whose first byte is 2 (BULK, at most 4 MiB) "
            "is answered with 9 bytes: 3 (ACK) and the frame's length as a little-endian "
            "uint64. Any other frame closes the socket with code 1003 and the reason.",
            {"101": {"description": "Switching to the websocket protocol; then the probe."},
             "400": _error("Not a websocket handshake (code bad_request)."),
             **_errors("Unauthorized")}),
        "/api/plan": {"post": {
            "operationId": "plan", "tags": ["Node"], "summary": "Plan the ring again",
            "description": "On a cluster's head: measure the nodes and links again, run Halda "
            "and hand out the windows (after the answer in progress; KV caches start empty). "
            "Optional body {\"k\": rounds} forces the number of rounds for this plan. "
            "Answers the status document's cluster part.",
            "requestBody": {"required": False, "content": {"application/json": {"schema": _obj(
                {"k": _opt("integer", "Force the number of rounds (1 to the layer count; "
                           "a node's windows may differ by a layer).", minimum=1)}, required=[])}}},
            "responses": {"200": _json("ClusterView", "The new plan."),
                          "404": _error("Not a cluster's head (code not_a_cluster_node)."),
                          "409": _error("No plan fits (code no_plan; the message says why)."),
                          "503": _error("A node the plan needs could not be reached or did not "
                                        "answer in time (code node_unreachable; Retry-After)."),
                          **_errors("Unauthorized")}}},
        "/cluster/ws": _get(
            "cluster", "Cluster links (websocket, nodes only)",
            "Where the nodes of a cluster connect to each other: the head's control link to "
            "each worker, the ring's activation links and link probes. Not for clients: a "
            "connection is admitted only by the cluster secret's challenge-response (HMAC-SHA256 "
            "over fresh nonces; the secret never crosses the wire), not by the API key, and is "
            "closed with code 4401 otherwise. A node serving alone answers 404 "
            "(code not_a_cluster_node).",
            {"101": {"description": "Switching to the websocket protocol; then the handshake."},
             "404": _error("Not a cluster node (code not_a_cluster_node)."),
             "400": _error("Not a websocket handshake (code bad_request).")}, public=True),
        "/openapi.json": _get("openapi", "This document (no key needed)",
                              "The OpenAPI 3.2 description of the API.",
                              {"200": {"description": "The document.", "content": {
                                  "application/json": {"schema": {"type": "object"}}}}},
                              public=True),
    }


def openapi_document() -> dict[str, Any]:
    """A fresh document each call (cheap), so a caller may change its copy."""
    return {
        "openapi": "3.2.0",
        "info": {
            "title": API_TITLE,
            "version": API_VERSION,
            "description": "The head node's API: OpenAI-compatible chat and text completions, "
            "plus the node's health, metrics, status document and status events. With an API "
            "key configured every path but /health and /openapi.json needs `Authorization: "
            "Bearer KEY`. Errors use OpenAI's shape (`{\"error\": {\"message\", \"type\", "
            "\"param\", \"code\"}}`), also for unknown paths (404) and methods (405). "
            "See docs/api.md.",
        },
        "tags": [{"name": "OpenAI-compatible", "description": "OpenAI's API, as its clients "
                  "use it."},
                 {"name": "Node", "description": "Health, metrics and status of the node."}],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": _components(),
    }
