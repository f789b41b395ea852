"""OpenAI's response shapes: completions, their streamed chunks, usage and errors.

Answers also carry llama.cpp's ``timings`` object (an extra field OpenAI clients keep), so a
client can see prefill and decode speed and how much of the prompt came from the cache.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..generate import Finished, Timings, ToolCall

SYSTEM_FINGERPRINT = "prima-node"


def usage(t: Timings) -> dict[str, Any]:
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            "total_tokens": t.prompt_tokens + t.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": t.cached_tokens}}


def timings(t: Timings) -> dict[str, Any]:
    """llama.cpp's field names (prompt_n, predicted_per_second, ...), which tools already read."""
    prefill_n = t.prompt_tokens - t.cached_tokens
    return {"cache_n": t.cached_tokens, "prompt_n": prefill_n,
            "prompt_ms": round(1e3 * t.prefill_s, 3),
            "prompt_per_second": round(t.prefill_tokens_per_s, 2),
            "predicted_n": t.completion_tokens, "predicted_ms": round(1e3 * t.decode_s, 3),
            "predicted_per_token_ms": round(t.decode_ms_per_token, 3),
            "predicted_per_second": round(1e3 / t.decode_ms_per_token, 2)
            if t.decode_ms_per_token else 0.0,
            "first_token_ms": round(1e3 * t.first_token_s, 3)}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    out.update({"id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}})
    return out


@dataclass
class Reply:
    """One answer being built: the same id and timestamp on every chunk of a stream."""

    model: str
    chat: bool  # chat.completion(s) or text_completion shapes
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = False
    text: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # a harmony model's analysis channel

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
        if chunk and self.include_usage:
            out["usage"] = None  # every chunk but the last one, as OpenAI sends them
        return out

    # -- streaming ----------------------------------------------------------------------------

    def first_chunk(self) -> dict[str, Any] | None:
        if not self.chat:
            return None
        return self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}], chunk=True)

    def text_chunk(self, text: str) -> dict[str, Any]:
        self.text.append(text)
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return self._envelope([choice], chunk=True)

    def reasoning_chunk(self, text: str) -> dict[str, Any]:
        """Reasoning as llama.cpp's and DeepSeek's servers send it: ``reasoning_content``,
        beside ``content`` (which OpenAI's clients read alone)."""
        self.reasoning.append(text)
        return self._envelope([{"index": 0, "delta": {"reasoning_content": text},
                                "logprobs": None, "finish_reason": None}], chunk=True)

    def call_chunk(self, call: ToolCall) -> dict[str, Any]:
        index = len(self.calls)
        self.calls.append(call)
        return self._envelope([{"index": 0, "delta": {"tool_calls": [tool_call_json(call, index)]},
                                "logprobs": None, "finish_reason": None}], chunk=True)

    def final_chunks(self, fin: Finished) -> list[dict[str, Any]]:
        delta: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": fin.finish_reason}
        if self.chat:
            delta["delta"] = {}
        else:
            delta["text"] = ""
        last = self._envelope([delta], chunk=True)
        last["timings"] = timings(fin.timings)
        out = [last]
        if self.include_usage:
            tail = self._envelope([], chunk=True)
            tail["usage"] = usage(fin.timings)
            out.append(tail)
        return out

    # -- whole answers --------------------------------------------------------------------------

    def whole(self, fin: Finished) -> dict[str, Any]:
        text = "".join(self.text)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant",
                                       "content": text if text or not self.calls else None,
                                       "refusal": None}
            if self.reasoning:
                message["reasoning_content"] = "".join(self.reasoning)
            if self.calls:
                message["tool_calls"] = [tool_call_json(c) for c in self.calls]
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": fin.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": fin.finish_reason}
        out = self._envelope([choice], chunk=False)
        out["usage"] = usage(fin.timings)
        out["timings"] = timings(fin.timings)
        return out
