"""gpt-oss's answers in harmony's channels, turned into reasoning, text and tool calls.

A harmony answer is a run of messages, each a header and a body::

    <|channel|>analysis<|message|>The user wants the weather...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
    <|message|>{"city": "Paris"}<|call|>

The header names the channel (``analysis``: the model's reasoning; ``final``: the answer;
``commentary``: a preamble to the user, or a tool call) and, for a call, the recipient
(``to=functions.NAME``, before or after the channel); the body ends at ``<|end|>`` (another
message follows after ``<|start|>``), or at ``<|call|>`` / ``<|return|>``, which end the
generation (they are its end-of-generation tokens, so the parser usually sees the output end
instead). The first header follows the prompt's ``<|start|>assistant`` directly.

Events, as :mod:`prima_node.text.tool_calls` gives them: reasoning as :class:`ReasoningDelta`
(OpenAI-compatible servers' ``reasoning_content``: never spoken, never mixed into the answer),
the answer and preambles as :class:`TextDelta`, calls as :class:`ToolCall` once their
arguments are complete (re-serialised JSON; a body that is not a JSON object is logged and
passed on as text, so a confused model never makes a request fail). Where the request offered
no tools, a call is unsolicited, and so is a call outside the ``functions`` namespace where the
request's tools live (gpt-oss was trained with built-in tools such as ``browser.search`` and
``python``, which are never offered here): it is logged and dropped, as llama.cpp's parser
consumes it, never returned as a call the client did not ask for. Text streams as it comes,
less a tail that could still be the start of a marker. A model that writes no header at all
(it never reaches ``<|message|>`` within :data:`MAX_HEADER` characters, or the output ends
first) has its output passed on as text.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from dataclasses import dataclass

from .tool_calls import Event, TextDelta, ToolCall, partial_marker_tail

__all__ = ["MARKERS", "HarmonyParser", "ReasoningDelta"]

log = logging.getLogger("prima_node.text")

#: The control tokens the parser must see as text (llama.cpp renders the first four always;
#: ``<|end|>`` separates messages and must be shown by the detokeniser too)
MARKERS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>", "<|end|>", "<|call|>",
           "<|return|>")
_BODY_ENDS = ("<|end|>", "<|call|>", "<|return|>")
#: a header longer than this is no header: the model is not writing harmony
MAX_HEADER = 256
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_ID_CHARS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ReasoningDelta:
    """The model's reasoning (harmony's analysis channel): for the reader, not the listener."""

    text: str


@dataclass
class _Message:
    kind: str  # "reasoning" | "text" | "call"
    recipient: str = ""
    body: str = ""  # a call's arguments so far


class HarmonyParser:
    """Splits a harmony answer into reasoning, text and calls; ``feed`` each new piece of
    detokenised output, ``finish`` once at the end (a call still open there is complete: the
    generation stopped at its ``<|call|>``). ``calls``: whether the request offered tools."""

    def __init__(self, *, calls: bool = True) -> None:
        self._calls = calls
        self._buf = ""
        self._message: _Message | None = None  # None: reading a header
        self._plain = False  # the output is not harmony: everything is text
        self._out: list[Event | ReasoningDelta] = []
        self._finished = False

    def feed(self, text: str) -> list[Event | ReasoningDelta]:
        if self._finished:
            raise ValueError("HarmonyParser.feed() after finish()")
        self._buf += text
        self._run(final=False)
        return self._flush()

    def finish(self) -> list[Event | ReasoningDelta]:
        if self._finished:
            return []
        self._finished = True
        self._run(final=True)
        if self._message is not None:
            self._close_message()
        elif self._buf.strip():  # a header the output never finished: it was text
            self._out.append(TextDelta(self._buf))
        self._buf = ""
        return self._flush()

    # -- internals --

    def _run(self, final: bool) -> None:
        while self._buf:
            if self._plain:
                self._out.append(TextDelta(self._buf))
                self._buf = ""
            elif self._message is None:
                if not self._header():
                    return
            elif not self._body(final):
                return

    def _header(self) -> bool:
        """Reads a header up to ``<|message|>``; False while it is incomplete."""
        end = self._buf.find("<|message|>")
        if end < 0:
            if len(self._buf) > MAX_HEADER:
                log.warning("the model's answer is not in harmony's channels (no <|message|> "
                            "in its first %d characters): passed on as text", MAX_HEADER)
                self._plain = True
                return True
            return False
        header, self._buf = self._buf[:end], self._buf[end + len("<|message|>"):]
        header = header.removeprefix("<|start|>")
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        if recipient is not None and recipient.group(1) != "assistant":
            self._message = _Message("call", recipient.group(1))
        elif channel is not None and channel.group(1) == "analysis":
            self._message = _Message("reasoning")
        else:  # final, a commentary preamble, or a channel-less message: the answer
            self._message = _Message("text")
        return True

    def _body(self, final: bool) -> bool:
        """Passes on the body up to its end marker; False while more may follow."""
        assert self._message is not None
        ends = [(i, m) for m in _BODY_ENDS if (i := self._buf.find(m)) >= 0]
        if ends:
            i, marker = min(ends)
            self._emit(self._buf[:i])
            self._buf = self._buf[i + len(marker):]
            self._close_message()
            return True
        keep = 0 if final else partial_marker_tail(self._buf, _BODY_ENDS)
        self._emit(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _emit(self, text: str) -> None:
        assert self._message is not None
        if not text:
            return
        if self._message.kind == "call":
            self._message.body += text
        elif self._message.kind == "reasoning":
            self._out.append(ReasoningDelta(text))
        else:
            self._out.append(TextDelta(text))

    def _close_message(self) -> None:
        message, self._message = self._message, None
        if message is None or message.kind != "call":
            return
        try:
            arguments = json.loads(message.body) if message.body.strip() else {}
        except ValueError:
            arguments = None
        name = message.recipient.removeprefix("functions.")
        if not isinstance(arguments, dict) or not name:
            log.warning("the model's call of %r has arguments that are not a JSON object; "
                        "passed on as text", name)
            self._out.append(TextDelta(message.body))
            return
        if not self._calls:
            log.warning("the model called %r, but the request offered no tools: the call was "
                        "dropped", name)
            return
        if not message.recipient.startswith("functions."):
            log.warning("the model called its built-in tool %r, which is not offered here: "
                        "the call was dropped", message.recipient)
            return
        call_id = "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))
        self._out.append(ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False)))

    def _flush(self) -> list[Event | ReasoningDelta]:
        out: list[Event | ReasoningDelta] = []
        for event in self._out:
            if isinstance(event, (TextDelta, ReasoningDelta)):
                if not event.text:
                    continue
                if out and type(out[-1]) is type(event):
                    out[-1] = type(event)(out[-1].text + event.text)
                    continue
            out.append(event)
        self._out = []
        return out
