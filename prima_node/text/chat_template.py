"""Chat templates: turning an OpenAI-style conversation into the prompt text a model expects.

A GGUF file carries its model's Hugging Face chat template (``tokenizer.chat_template``), a Jinja
program. It is rendered here exactly as transformers renders it (``apply_chat_template``):
sandboxed Jinja with ``trim_blocks``/``lstrip_blocks`` and loop controls, the same ``tojson``
(no ASCII or HTML escaping, ``indent``/``separators``/``sort_keys``), ``raise_exception``,
``strftime_now``, the ``{% generation %}`` tag, and the same variables (``messages``, ``tools``,
``documents``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, plus any extra keyword such
as ``enable_thinking`` or ``date_string``). Templates are untrusted code from the file: the
sandbox keeps them from reaching Python internals, and any failure comes back as a
:class:`~prima_node.errors.ChatTemplateError` carrying the template's own message.

Requests arrive in OpenAI's message shape, which is not what the templates were written for:
tool-call ``arguments`` is a JSON *string* there but a mapping in every Hugging Face template
(Llama 3.1 iterates it, Qwen 2.5 and Hermes ``tojson`` it), and ``content`` may be a list of
parts. :func:`normalize_messages` bridges the two the way llama.cpp's server does
(``common/chat.cpp``): arguments parsed from JSON (kept as the string when they are not valid
JSON), text parts joined with newlines, every other key passed through.

A file without a template gets a built-in one chosen from its architecture and vocabulary
(:mod:`prima_node.text.builtin_templates`); the choice and the reason are logged on the
``prima_node.text`` logger.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateError
from .builtin_templates import BUILTIN_TEMPLATES

if TYPE_CHECKING:
    from ..model_file import ModelFile

__all__ = [
    "ChatTemplate",
    "builtin_template",
    "choose_builtin",
    "detect_tool_format",
    "load_chat_template",
    "normalize_messages",
]

log = logging.getLogger("prima_node.text")

TOOL_FORMATS = ("llama3", "hermes", "mistral", "harmony")

# Tool-call syntax each built-in template teaches the model.
_BUILTIN_TOOL_FORMAT: dict[str, str | None] = {"llama3": "llama3", "chatml": "hermes",
                                               "llama2": None, "gemma": None,
                                               "harmony": "harmony"}


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special-token texts it is rendered with.

    ``render`` returns the whole prompt as text, special tokens included as their text: tokenise
    it with special-token parsing on and *without* adding BOS/EOS (``add_special=False``), as
    llama.cpp's server does. BOS comes from the template itself: templates that open with
    ``{{ bos_token }}`` (Llama 2 and 3, Mistral, and the built-in ``llama3`` / ``llama2``) already
    emit it, so adding another would give the model a doubled BOS it never saw in training;
    ChatML / Qwen templates emit none, matching their ``add_bos_token = false``. Whether a given
    prompt starts with BOS is simply ``prompt.startswith(template.bos_token)`` when
    ``bos_token`` is not empty.

    ``tool_format`` names the tool-call syntax the model emits (the parser to run on its
    output, see :mod:`prima_node.text.tool_calls`), or None when the template offers no tools.
    """

    source: str
    name: str
    bos_token: str
    eos_token: str
    tool_format: str | None

    def render(self, messages: list[dict[str, Any]], /, *,
               tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """Render a conversation (OpenAI message shape) into prompt text.

        ``tools`` are OpenAI tool definitions (``{"type": "function", "function": {...}}``) and
        reach the template as given, which is the shape Hugging Face templates expect; an empty
        list counts as no tools (as in llama.cpp), since templates such as Llama 3.1's test
        ``tools is not none`` and would otherwise announce an empty tool list. Extra keyword
        arguments become template variables (``enable_thinking``, ``date_string``, ...); they may
        also override ``bos_token`` / ``eos_token``.
        """
        compiled = _compile(self.source)
        variables: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                                     "documents": None}
        variables.update(_plain(kwargs, "template arguments"))
        variables["messages"] = normalize_messages(messages)
        variables["tools"] = _plain(list(tools), "tools") if tools else None
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return compiled.render(variables)  # a dict: a variable named "self" is fine
        except _TemplateRaised as exc:
            raise ChatTemplateError(exc.message or "the chat template refused the conversation") \
                from None
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(
                f"the chat template ({self.name}) failed to render the conversation: {exc}"
            ) from None
        except Exception as exc:  # a template is a program: any failure of it is its own
            raise ChatTemplateError(
                f"the chat template ({self.name}) failed to render the conversation: "
                f"{type(exc).__name__}: {exc}"
            ) from None


def builtin_template(name: str, *, bos_token: str, eos_token: str) -> ChatTemplate:
    """One of the built-in templates: ``"llama3"``, ``"chatml"`` or ``"llama2"``.

    The ``"builtin:"`` prefix of ``ChatTemplate.name`` is accepted too, so a name read back
    from a template can be passed in again.
    """
    short = name.removeprefix("builtin:")
    source = BUILTIN_TEMPLATES.get(short)
    if source is None:
        raise ValueError(f"unknown built-in chat template {name!r} "
                         f"(choose from {', '.join(BUILTIN_TEMPLATES)})")
    _compile(source)
    return ChatTemplate(source=source, name="builtin:" + short, bos_token=bos_token,
                        eos_token=eos_token, tool_format=_BUILTIN_TOOL_FORMAT[short])


def load_chat_template(mf: ModelFile) -> ChatTemplate:
    """The file's chat template, or a built-in one when it has none (logged, with the reason).

    A template that does not compile is also replaced by a built-in one, with a warning,
    rather than making the model unusable (llama.cpp falls back to ChatML in that case).
    """
    bos = _token_text(mf, "tokenizer.ggml.bos_token_id")
    eos = _token_text(mf, "tokenizer.ggml.eos_token_id")
    source = mf.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        try:
            _compile(source)
        except ChatTemplateError as exc:
            log.warning("%s: the chat template in the file cannot be used (%s); "
                        "falling back to a built-in template", mf.path, exc)
        else:
            fmt = detect_tool_format(source)
            log.debug("%s: using the file's chat template (tool-call format: %s)", mf.path, fmt)
            return ChatTemplate(source=source, name="gguf", bos_token=bos, eos_token=eos,
                                tool_format=fmt)
    arch = mf.get("general.architecture")
    tokens = mf.get("tokenizer.ggml.tokens") or []
    model = mf.get("tokenizer.ggml.model")
    name, why = choose_builtin(arch if isinstance(arch, str) else None, tokens,
                               model if isinstance(model, str) else None)
    log.info("%s: no usable chat template in the file; using the built-in %r template (%s)",
             mf.path, name, why)
    return builtin_template(name, bos_token=bos, eos_token=eos)


def choose_builtin(arch: str | None, tokens: Sequence[str],
                   tokenizer_model: str | None) -> tuple[str, str]:
    """Which built-in template fits a model, and why (for the log line).

    The vocabulary decides before the architecture: the turn markers a model was trained with
    are tokens of its vocabulary, whereas the architecture name is shared by many families
    (Llama 2, Llama 3 and Mistral are all ``llama``).
    """
    vocab = frozenset(tokens)
    if "<|channel|>" in vocab and "<|message|>" in vocab:
        return "harmony", "the vocabulary has harmony's <|channel|> and <|message|> tokens"
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3", "the vocabulary has Llama 3's <|start_header_id|> and <|eot_id|> tokens"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml", "the vocabulary has ChatML's <|im_start|> and <|im_end|> tokens"
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        return "gemma", "the vocabulary has Gemma's <start_of_turn> and <end_of_turn> tokens"
    if arch in ("qwen2", "qwen3"):
        return "chatml", f"architecture {arch!r} is a Qwen model, which uses ChatML"
    if tokenizer_model == "llama":
        return "llama2", ("the vocabulary is a SentencePiece (Llama 2 / Mistral style) one, "
                          "whose chat format is [INST] ... [/INST]")
    return "chatml", ("no known chat format was recognised from the vocabulary or architecture "
                      f"{arch!r}; ChatML is also llama.cpp's default")


def detect_tool_format(source: str) -> str | None:
    """The tool-call syntax a template teaches its model, from the markers in its source.

    Checked in llama.cpp's order (``common_chat_templates_apply_jinja``): Hermes / Qwen's
    ``<tool_call>`` first (some Llama-based fine-tunes use it), then Mistral's ``[TOOL_CALLS]``,
    then Llama 3.x (``ipython`` turns or ``<|python_tag|>``); harmony (gpt-oss) by its
    ``<|channel|>`` marker, whatever else it holds: its answers are always in channels.
    """
    if "<|channel|>" in source:
        return "harmony"
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|start_header_id|>ipython<|end_header_id|>" in source or "<|python_tag|>" in source:
        return "llama3"
    return None


# -- messages -------------------------------------------------------------------------------

# Names a message's reasoning may come under; templates read "reasoning_content" (Qwen 3,
# DeepSeek) or "thinking" (gpt-oss). transformers fills both from whichever is given.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages in the shape chat templates expect (a fresh copy).

    - ``content`` as a list of ``{"type": "text", "text": ...}`` parts becomes one string, the
      parts joined by newlines (llama.cpp does the same); other part types are refused, since
      the node serves text-only models. A string is kept; null or no content becomes ``""``,
      as llama.cpp's server hands every template (gpt-oss's fails on null).
    - each ``tool_calls[i].function.arguments`` that is a JSON string is parsed, so templates
      can iterate or ``tojson`` it; a string that is not valid JSON is kept as it is.
    - reasoning given as ``reasoning_content``, ``thinking`` or ``reasoning`` is offered under
      the first two names too, as transformers does.
    - every other key (``name``, ``tool_call_id``, ...) passes through unchanged.

    Raises ValueError naming the message at fault when the input is not a list of messages.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of message objects")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is not an object: {message!r}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no 'role' string")
        msg: dict[str, Any] = _plain(dict(message), f"message {i}")
        # no content (an assistant's calls) is empty text, as llama.cpp's server gives every
        # template: some test it with `in` (gpt-oss's), which fails on null
        msg["content"] = _flatten_content(msg.get("content"), i)
        if msg.get("tool_calls") is not None:
            msg["tool_calls"] = _normalize_tool_calls(msg["tool_calls"], i)
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def _flatten_content(content: Any, index: int) -> Any:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise ValueError(f"message {index}: a content part must be an object")
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"message {index}: content part type {kind!r} is not supported "
                                 "(only 'text' parts: this node serves text-only models)")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"message {index}: a text content part needs a 'text' string")
            texts.append(text)
        return "\n".join(texts)
    raise ValueError(f"message {index}: 'content' must be a string, null or a list of text "
                     f"parts, not {type(content).__name__}")


def _normalize_tool_calls(tool_calls: Any, index: int) -> list[Any]:
    if not isinstance(tool_calls, list):
        raise ValueError(f"message {index}: 'tool_calls' must be a list")
    calls = []
    for call in tool_calls:
        if not isinstance(call, dict):
            raise ValueError(f"message {index}: each tool call must be an object")
        call = dict(call)
        function = call.get("function")
        if isinstance(function, dict):
            function = dict(function)
            function["arguments"] = _parse_arguments(function.get("arguments"))
            call["function"] = function
        elif "arguments" in call:  # already flat ({"name", "arguments"}), as some clients send
            call["arguments"] = _parse_arguments(call["arguments"])
        calls.append(call)
    return calls


def _parse_arguments(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _plain(value: Any, what: str) -> Any:
    """A deep copy made of JSON types only: the sandbox then sees no objects with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    if isinstance(value, (str, int, float)):  # subclasses (enums, numpy scalars): drop them
        for base in (bool, str, int, float):
            if isinstance(value, base):
                return base(value)
    raise ValueError(f"{what}: a value of type {type(value).__name__} cannot be passed to a "
                     "chat template (use JSON types: objects, lists, strings, numbers, booleans)")


# -- the Jinja environment ---------------------------------------------------------------------

class _TemplateRaised(jinja2.TemplateError):
    """raise_exception() called by the template: its message goes to the user verbatim."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' definition, not Jinja's: Jinja's own filter HTML-escapes <, >, & and '
    # (turning "<tool_call>" into "\u003ctool_call\u003e") and takes no separators.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """``dict(...)`` for templates without handing them the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `self` is a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore names on a namespace ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text for training masks in
    transformers; for inference it renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - the attribute Jinja reads, declared as it does

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """Compile once per distinct source (a template is rendered for every request)."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


def _token_text(mf: ModelFile, key: str) -> str:
    token_id = mf.get(key)
    if not isinstance(token_id, int) or token_id < 0:
        return ""
    n = mf.array_length("tokenizer.ggml.tokens")
    if n is None or token_id >= n:
        return ""
    tokens = mf.get("tokenizer.ggml.tokens")
    text = tokens[token_id]
    return text if isinstance(text, str) else ""
