"""Tool calls in a model's streamed output, turned into OpenAI-shaped calls as they complete.

Each model family writes calls in its own syntax (the ``tool_format`` a
:class:`~prima_node.text.chat_template.ChatTemplate` detects); the rules follow llama.cpp's
parsers (``common/chat.cpp``, ``common/chat-parser.cpp``):

``hermes`` (Qwen 2.5 / 3, Hermes 2 / 3)
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of them,
    with text before, between and after.
``llama3`` (Llama 3.1 / 3.2 / 3.3)
    - a bare JSON object ``{"name": ..., "parameters": {...}}`` (``"arguments"`` accepted too,
      and an optional leading ``"type": "function"``) as the reply, i.e. only when the reply
      starts with ``{`` after whitespace; several such objects separated by whitespace are
      parallel calls. llama.cpp's rule is the same: ``"name"`` must be the first key (after
      ``"type"``), which lets a JSON *answer* be released as text as soon as its first key
      shows it is not a call.
    - ``<|python_tag|>`` followed by, up to the end of the output: a JSON call as above; a
      built-in tool call ``name.call(arg=<JSON value>, ...)`` (``brave_search``,
      ``wolfram_alpha``, ``code_interpreter``; the values are JSON, so strings are quoted); or
      raw code, which becomes a call of ``python`` with ``{"code": <the code>}`` as llama.cpp
      does. Text before the tag is ordinary text.
``mistral`` (Mistral Nemo / Small / Magistral / Devstral)
    ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]`` (v3 / Nemo), and the
    newer ``[TOOL_CALLS]name[ARGS]{...}`` (optionally ``name[CALL_ID]id[ARGS]{...}``), which
    may repeat. A model-written id of 9 letters and digits (what Mistral templates require) is
    kept; otherwise one of that shape is generated.

Markers such as ``<|python_tag|>`` and ``[TOOL_CALLS]`` are control tokens: the generation
loop must detokenise them to their text for this parser to see them.

Streaming rules: plain text is passed on at once, except a tail that could still be the start
of a marker (``"<tool"`` is held, ``"<tooth"`` is released). A call is emitted whole once it is
complete; its arguments are re-serialised JSON (always a valid JSON object text, the OpenAI
shape). Whitespace between or after calls is dropped (it would otherwise surface as a
content of ``"\\n"`` beside the calls); all other text is kept. A malformed call (invalid JSON,
no name, arguments that are not an object, no closing tag by the end) is logged as a warning
on the ``prima_node.text`` logger and its text passed on as ordinary text, so a confused model
never makes a request fail. Splitting the output into different chunks never changes the
result: decisions depend only on text seen so far and are deferred while ambiguous.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "MARKER_TOKENS",
    "Event",
    "TextDelta",
    "ToolCall",
    "ToolCallParser",
    "parse_tool_calls",
    "tool_calls_possible",
]

log = logging.getLogger("prima_node.text")

TOOL_FORMATS = ("llama3", "hermes", "mistral")

#: Texts of the tokens each syntax is written with. Where they are control tokens their text
#: must reach the parser (llama.cpp's "preserved tokens"), while other control tokens stay hidden.
MARKER_TOKENS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
}


@dataclass(frozen=True)
class TextDelta:
    """Ordinary reply text (``content`` in OpenAI's terms)."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """One complete call: ``arguments`` is a JSON object as text, as OpenAI's API carries it."""

    id: str
    name: str
    arguments: str


Event = TextDelta | ToolCall


def tool_calls_possible(tool_format: str | None, tools: Sequence[Any] | None) -> bool:
    """Whether output can contain tool calls: the request offers tools and the model has a
    known call syntax. When False, run the parser as passthrough (``ToolCallParser(None)``):
    a model that was offered no tools may still write ``<tool_call>`` as plain text."""
    return bool(tools) and tool_format is not None


def parse_tool_calls(text: str, tool_format: str | None) -> tuple[str, list[ToolCall]]:
    """A whole reply at once: its text content and its calls (non-streaming responses)."""
    parser = ToolCallParser(tool_format)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    return content, [e for e in events if isinstance(e, ToolCall)]


# -- incremental JSON ---------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_WS = " \t\r\n"


class _JsonScan:
    """Finds where a JSON object or array ends, fed piece by piece, each character once.

    ``status`` is ``"partial"`` while the text so far can still become a value, ``"done"``
    when the value closed (``length`` characters long), ``"error"`` at the first character
    that no JSON text could contain (``length`` is then its offset). Escapes inside strings
    are checked later by ``json.loads``; this scanner only has to find the end.
    """

    def __init__(self) -> None:
        self.status = "partial"
        self.length = 0
        self._stack: list[str] = []
        self._expect = "value"
        self._token = ""  # "str", "num", "lit" while inside one
        self._lexeme = ""
        self._escape = False
        self._key = False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.status != "partial":
                return
            if not self._step(ch):
                self.status = "error"
                return
            self.length += 1

    def _step(self, ch: str) -> bool:
        """One character: False where it cannot continue the JSON."""
        if self._token:
            consumed = self._in_token(ch)
            if consumed is not None:
                return consumed
        if ch in _WS:
            return True
        return self._structural(ch)

    def _in_token(self, ch: str) -> bool | None:
        """A character inside a string, number or literal: whether it fits, or None where it
        ends a number without being part of it (it is then read as structure)."""
        if self._token == "str":
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._token = ""
                if self._key:
                    self._expect = "colon"
                else:
                    self._value_done()
            return True
        if self._token == "num":
            if ch in _NUMBER_CHARS:
                self._lexeme += ch
                return True
            if not _NUMBER.fullmatch(self._lexeme):
                return False
            self._token = ""
            self._value_done()
            return None
        self._lexeme += ch  # a literal: true, false, null
        word = _LITERALS[self._lexeme[0]]
        if not word.startswith(self._lexeme):
            return False
        if len(self._lexeme) == len(word):
            self._token = ""
            self._value_done()
        return True

    def _structural(self, ch: str) -> bool:
        """A character between tokens: what the parser expects next decides."""
        expect = self._expect
        if expect in ("value", "value_or_close"):
            if ch == "]" and expect == "value_or_close":
                return self._close("[")
            if ch in "{[":
                self._stack.append(ch)
                self._expect = "key_or_close" if ch == "{" else "value_or_close"
            elif ch == '"':
                self._token, self._key = "str", False
            elif ch in "-0123456789":
                self._token, self._lexeme = "num", ch
            elif ch in _LITERALS:
                self._token, self._lexeme = "lit", ch
            else:
                return False
            return True
        if expect in ("key", "key_or_close"):
            if ch == "}" and expect == "key_or_close":
                return self._close("{")
            if ch != '"':
                return False
            self._token, self._key = "str", True
            return True
        if expect == "colon":
            if ch != ":":
                return False
            self._expect = "value"
            return True
        if expect == "comma_or_close" and self._stack:
            top = self._stack[-1]
            if ch == ",":
                self._expect = "key" if top == "{" else "value"
                return True
            if (ch == "}" and top == "{") or (ch == "]" and top == "["):
                return self._close(top)
        return False

    def _close(self, opener: str) -> bool:
        if not self._stack or self._stack[-1] != opener:
            return False
        self._stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        if self._stack:
            self._expect = "comma_or_close"
        else:
            self.status = "done"
            self._expect = "end"


# -- call extraction -----------------------------------------------------------------------

class _More:
    """The text so far is a possible call that is not complete yet."""


_MORE = _More()


@dataclass
class _Fail:
    """Not a call after all; ``warn`` when it looked enough like one to be worth a warning."""

    reason: str
    warn: bool = True


@dataclass
class _Done:
    calls: list[tuple[str, str, str | None]]  # (name, arguments JSON, model-given id)
    end: int


_Result = _More | _Fail | _Done


class _CallError(Exception):
    pass


def _arguments_json(value: Any) -> str:
    """Arguments as JSON object text; models sometimes write them as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _CallError("its arguments are a string that is not JSON") from None
    if not isinstance(value, dict):
        raise _CallError("its arguments are not a JSON object")
    return json.dumps(value, ensure_ascii=False)


def _call_from_object(obj: Any, *, arg_keys: tuple[str, ...],
                      require_args: bool) -> tuple[str, str, str | None]:
    if not isinstance(obj, dict):
        raise _CallError("it is not a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _CallError("it has no function name")
    for key in arg_keys:
        if key in obj:
            arguments = _arguments_json(obj[key])
            break
    else:
        if require_args:
            raise _CallError(f"it has no {' or '.join(repr(k) for k in arg_keys)}")
        arguments = "{}"
    call_id = obj.get("id")
    return name.strip(), arguments, call_id if isinstance(call_id, str) else None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _expect_literal(text: str, i: int, literal: str) -> int | _More | None:
    """End of ``literal`` at ``i``; _MORE while the text is a prefix of it; None otherwise."""
    rest = text[i:i + len(literal)]
    if rest == literal:
        return i + len(literal)
    if literal.startswith(rest):
        return _MORE
    return None


class _Json:
    """JSON values of one pending call, scanned incrementally and keyed by start offset."""

    def __init__(self) -> None:
        self._scans: dict[int, tuple[_JsonScan, int]] = {}
        self._results: dict[int, tuple[str, int, Any]] = {}

    def clear(self) -> None:
        self._scans.clear()
        self._results.clear()

    def at(self, text: str, start: int) -> tuple[str, int, Any]:
        """("more" | "error" | "done", end offset, value) for the value starting at ``start``."""
        if start in self._results:
            return self._results[start]
        scan, fed = self._scans.get(start) or (_JsonScan(), start)
        scan.feed(text[fed:])
        self._scans[start] = (scan, len(text))
        if scan.status == "partial":
            return "more", len(text), None
        end = start + scan.length
        result: tuple[str, int, Any] = ("error", end, None)
        if scan.status == "done":
            with contextlib.suppress(ValueError):  # e.g. a bad escape: stays an error
                result = ("done", end, json.loads(text[start:end], strict=False))
        self._results[start] = result
        return result


# Llama 3.x: the start of a JSON call, as llama.cpp's function_regex has it:
#   { ["type": "function",] "name":
_LLAMA3_HEADERS = (('{', '"name"', ':'), ('{', '"type"', ':', '"function"', ',', '"name"', ':'))
_BUILTIN_CALL = re.compile(r"\s*([A-Za-z_]\w*)\s*\.\s*call\(", re.ASCII)
_ARG_NAME = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*", re.ASCII)
_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def _llama3_header(text: str) -> str:
    """Whether a candidate reply starts like a call: "match", "maybe" (too short to tell), "no".

    Lexes the opening JSON tokens and compares them with the accepted openings; a string cut
    off by the end of the text matches while it is a prefix of the expected one.
    """
    tokens: list[str] = []
    cut = False  # the last token is a string the text ends inside
    i = 0
    while len(tokens) < max(map(len, _LLAMA3_HEADERS)):
        i = _skip_ws(text, i)
        if i >= len(text):
            break
        if text[i] != '"':
            tokens.append(text[i])  # punctuation, or the first character of something else
            i += 1
            continue
        j = i + 1
        while j < len(text) and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        cut = j >= len(text)
        tokens.append(text[i:j + 1])
        i = j + 1
    verdicts = set()
    for header in _LLAMA3_HEADERS:
        verdict = "match"
        for k, token in enumerate(tokens[:len(header)]):
            if k == len(tokens) - 1 and cut:
                verdict = "maybe" if header[k].startswith(token) else "no"
            elif token != header[k]:
                verdict = "no"
            if verdict == "no":
                break
        if verdict == "match" and len(tokens) < len(header):
            verdict = "maybe"
        verdicts.add(verdict)
    for verdict in ("match", "maybe"):
        if verdict in verdicts:
            return verdict
    return "no"


# -- the streaming parser -------------------------------------------------------------------

_ID_CHARS = string.ascii_letters + string.digits


class ToolCallParser:
    """Splits a model's streamed output into text and tool calls; see the module docstring.

    ``ToolCallParser(None)`` passes all text through unchanged. ``feed`` takes each new piece of
    detokenised output and returns the events it completes; ``finish`` (once, at the end of
    generation) flushes held text and resolves anything left open.
    """

    _MARKERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "hermes": ("<tool_call>",),
        "llama3": ("<|python_tag|>",),
        "mistral": ("[TOOL_CALLS]",),
    }

    def __init__(self, tool_format: str | None) -> None:
        if tool_format is not None and tool_format not in TOOL_FORMATS:
            raise ValueError(f"unknown tool-call format {tool_format!r} "
                             f"(choose from {', '.join(TOOL_FORMATS)}, or None)")
        self.tool_format = tool_format
        self._markers = self._MARKERS.get(tool_format or "", ())
        self._buf = ""
        self._in_call: Callable[[str, bool], _Result] | None = None
        self._fail_len = 0  # characters released as text when the pending call fails
        self._held_ws = ""  # whitespace dropped before the pending call, restored if it fails
        self._drop_ws = True  # at the start and after a call: hold whitespace
        self._json_start = tool_format == "llama3"  # a bare "{" may start a call here
        self._json = _Json()
        self._ids: set[str] = set()
        self._out: list[Event] = []
        self._finished = False

    def feed(self, text: str) -> list[Event]:
        """Events completed by ``text`` (text as soon as it cannot be part of a call)."""
        if self._finished:
            raise ValueError("ToolCallParser.feed() after finish()")
        if self.tool_format is None:
            return [TextDelta(text)] if text else []
        self._buf += text
        self._run(final=False)
        return self._flush()

    def finish(self) -> list[Event]:
        """The remaining events at the end of generation; an unfinished call becomes text."""
        if self._finished:
            return []
        self._finished = True
        if self.tool_format is None:
            return []
        self._run(final=True)
        return self._flush()

    # -- internals --

    def _flush(self) -> list[Event]:
        out: list[Event] = []
        for event in self._out:
            if isinstance(event, TextDelta):
                if not event.text:
                    continue
                if out and isinstance(out[-1], TextDelta):
                    out[-1] = TextDelta(out[-1].text + event.text)
                    continue
            out.append(event)
        self._out = []
        return out

    def _run(self, final: bool) -> None:
        while True:
            if self._in_call is None:
                if not self._scan_text(final):
                    return
                continue
            result = self._in_call(self._buf, final)
            if isinstance(result, _More):
                if not final:
                    return
                result = _Fail("it is not complete at the end of the output")
            if isinstance(result, _Done):
                for name, arguments, model_id in result.calls:
                    self._out.append(ToolCall(self._new_id(model_id), name, arguments))
                self._buf = self._buf[result.end:]
                self._drop_ws = True
                self._json_start = self.tool_format == "llama3"
            else:
                if result.warn:
                    log.warning("the model wrote a malformed %s tool call (%s); passing it on "
                                "as text: %.200r", self.tool_format, result.reason, self._buf)
                self._out.append(TextDelta(self._held_ws + self._buf[:self._fail_len]))
                self._buf = self._buf[self._fail_len:]
                self._drop_ws = False
                self._json_start = False
            self._held_ws = ""
            self._in_call = None
            self._json.clear()

    def _scan_text(self, final: bool) -> bool:
        """Pass text on up to the next call; True when a call starts (self._in_call set)."""
        buf = self._buf
        if not buf:
            return False
        if self._drop_ws:
            j = _skip_ws(buf, 0)
            if j == len(buf):
                if final:
                    self._buf = ""
                return False
            rest = buf[j:]
            starts = list(self._markers) + (["{"] if self._json_start else [])
            for marker in starts:
                if rest.startswith(marker):
                    self._held_ws = buf[:j]
                    self._buf = rest
                    self._start_call(marker)
                    return True
            if not final and any(m.startswith(rest) for m in starts):
                return False
            self._drop_ws = False
            self._json_start = False
        found = [(i, m) for m in self._markers if (i := buf.find(m)) >= 0]
        if found:
            i, marker = min(found)
            self._out.append(TextDelta(buf[:i]))
            self._buf = buf[i:]
            self._start_call(marker)
            return True
        keep = 0 if final else partial_marker_tail(buf, self._markers)
        self._out.append(TextDelta(buf[:len(buf) - keep]))
        self._buf = buf[len(buf) - keep:]
        return False

    def _start_call(self, marker: str) -> None:
        self._fail_len = len(marker)
        if marker == "{":
            self._in_call = self._llama3_bare
        elif marker == "<|python_tag|>":
            self._in_call = self._llama3_python_tag
        elif marker == "<tool_call>":
            self._in_call = self._hermes
        else:
            self._in_call = self._mistral

    def _new_id(self, model_id: str | None) -> str:
        if self.tool_format == "mistral" and model_id is not None \
                and _MISTRAL_ID.fullmatch(model_id) and model_id not in self._ids:
            self._ids.add(model_id)
            return model_id
        prefix, length = ("", 9) if self.tool_format == "mistral" else ("call_", 24)
        while (new := prefix + "".join(secrets.choice(_ID_CHARS) for _ in range(length))) \
                in self._ids:
            pass
        self._ids.add(new)
        return new

    # -- one handler per syntax: each looks at the pending text afresh (the JSON scanning is
    #    incremental), so chunk boundaries cannot change the outcome.

    def _hermes(self, buf: str, final: bool) -> _Result:
        i = _skip_ws(buf, len("<tool_call>"))
        if i == len(buf):
            return _MORE
        if buf[i] != "{":
            return _Fail("no JSON object after <tool_call>")
        status, end, value = self._json.at(buf, i)
        if status == "more":
            return _MORE
        if status == "error":
            return _Fail("invalid JSON")
        close = _expect_literal(buf, _skip_ws(buf, end), "</tool_call>")
        if close is None:
            return _Fail("no </tool_call> after the JSON object")
        if isinstance(close, _More):
            return _MORE
        try:
            call = _call_from_object(value, arg_keys=("arguments", "parameters"),
                                     require_args=False)
        except _CallError as exc:
            return _Fail(str(exc))
        return _Done([call], close)

    def _llama3_bare(self, buf: str, final: bool) -> _Result:
        header = _llama3_header(buf)
        if header == "no":
            return _Fail("not a call", warn=False)
        if header == "maybe":
            return _MORE if not final else _Fail("not a call", warn=False)
        status, end, value = self._json.at(buf, 0)
        if status == "more":
            return _MORE
        if status == "error":
            return _Fail("invalid JSON")
        try:
            call = _call_from_object(value, arg_keys=("parameters", "arguments"),
                                     require_args=True)
        except _CallError as exc:
            return _Fail(str(exc))
        return _Done([call], end)

    def _llama3_python_tag(self, buf: str, final: bool) -> _Result:
        if not final:
            return _MORE  # the call runs to the end of the output (<|eom_id|>)
        code = buf[len("<|python_tag|>"):].strip()
        for end in ("<|eom_id|>", "<|eot_id|>"):  # in case the loop passes the stop token on
            code = code.removesuffix(end).rstrip()
        if not code:
            return _Fail("nothing follows <|python_tag|>")
        if code.startswith("{"):
            calls = _json_calls(code)
            if calls is not None:
                return _Done(calls, len(buf))
        builtin = _builtin_call(code)
        if builtin is not None:
            return _Done([builtin], len(buf))
        return _Done([("python", json.dumps({"code": code}, ensure_ascii=False), None)],
                     len(buf))

    def _mistral(self, buf: str, final: bool) -> _Result:
        i = _skip_ws(buf, len("[TOOL_CALLS]"))
        if i == len(buf):
            return _MORE
        if buf[i] in "[{":
            status, end, value = self._json.at(buf, i)
            if status == "more":
                return _MORE
            if status == "error":
                return _Fail("invalid JSON")
            items = value if isinstance(value, list) else [value]
            if not items:
                return _Fail("an empty list of calls")
            try:
                calls = [_call_from_object(item, arg_keys=("arguments", "parameters"),
                                           require_args=False) for item in items]
            except _CallError as exc:
                return _Fail(str(exc))
            return _Done(calls, end)
        m = _MISTRAL_NAME.match(buf, i)
        if m is None:
            return _Fail("no function name after [TOOL_CALLS]")
        j = m.end()
        if j == len(buf):
            return _MORE
        name = m.group()
        call_id = None
        if buf.startswith("[CALL_ID]", j):  # name[CALL_ID]id[ARGS]{...}
            m_id = _MISTRAL_NAME.match(buf, j + len("[CALL_ID]"))
            after_id = m_id.end() if m_id else j + len("[CALL_ID]")
            if after_id == len(buf):
                return _MORE
            call_id = buf[j + len("[CALL_ID]"):after_id]
            j = after_id
        elif "[CALL_ID]".startswith(buf[j:]):
            return _MORE
        args = _expect_literal(buf, j, "[ARGS]")
        if args is None:
            return _Fail("no [ARGS] after the function name")
        if isinstance(args, _More):
            return _MORE
        k = _skip_ws(buf, args)
        if k == len(buf):
            return _MORE
        if buf[k] != "{":
            return _Fail("the arguments after [ARGS] are not a JSON object")
        status, end, value = self._json.at(buf, k)
        if status == "more":
            return _MORE
        if status == "error":
            return _Fail("invalid JSON")
        try:
            arguments = _arguments_json(value)
        except _CallError as exc:
            return _Fail(str(exc))
        return _Done([(name, arguments, call_id)], end)


def partial_marker_tail(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a marker (and so held)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def _json_calls(text: str) -> list[tuple[str, str, str | None]] | None:
    """Whitespace-separated Llama 3 JSON calls filling all of ``text``, or None."""
    decoder = json.JSONDecoder(strict=False)
    calls = []
    i = 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
            calls.append(_call_from_object(value, arg_keys=("parameters", "arguments"),
                                           require_args=True))
        except (ValueError, _CallError):
            return None
        i = _skip_ws(text, i)
    return calls or None


def _builtin_call(text: str) -> tuple[str, str, str | None] | None:
    """``name.call(arg=<JSON>, ...)`` filling all of ``text`` (Llama 3.1 built-in tools)."""
    m = _BUILTIN_CALL.match(text)
    if m is None:
        return None
    decoder = json.JSONDecoder(strict=False)
    args: dict[str, Any] = {}
    i = m.end()
    while True:
        a = _ARG_NAME.match(text, i)
        if a is None:
            break
        try:
            args[a.group(1)], i = decoder.raw_decode(text, a.end())
        except ValueError:
            return None
        i = _skip_ws(text, i)
        if not text.startswith(",", i):
            break
        i += 1
    i = _skip_ws(text, i)
    if not text.startswith(")", i) or text[i + 1:].strip():
        return None
    return m.group(1), json.dumps(args, ensure_ascii=False), None
