"""Chat templates rendered exactly as Hugging Face transformers renders them.

The reference is transformers' own ``render_jinja_template``, given the conversations in the
shape Hugging Face templates expect (tool-call arguments as objects); the code under test gets
the same conversations in OpenAI's shape (arguments as JSON strings, content as parts) and must
produce the identical prompt, or refuse with the same message.
"""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import gguf
import jinja2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from prima_node.errors import ChatTemplateError
from prima_node.model_file import ModelFile
from prima_node.synth.vocab import (
    LLAMA2_CHAT_TEMPLATE,
    LLAMA31_CHAT_TEMPLATE,
    QWEN25_CHAT_TEMPLATE,
)
from prima_node.text import builtin_templates
from prima_node.text.chat_template import (
    ChatTemplate,
    builtin_template,
    choose_builtin,
    detect_tool_format,
    load_chat_template,
    normalize_messages,
)
from prima_node.text.tool_calls import parse_tool_calls

# (name, source, bos, eos, tool format): every template the project ships.
TEMPLATES = [
    ("llama31", LLAMA31_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    ("qwen25", QWEN25_CHAT_TEMPLATE, "<|endoftext|>", "<|im_end|>", "hermes"),
    ("llama2", LLAMA2_CHAT_TEMPLATE, "<s>", "</s>", None),
    ("builtin-llama3", builtin_templates.LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    ("builtin-chatml", builtin_templates.CHATML, "<|endoftext|>", "<|im_end|>", "hermes"),
    ("builtin-llama2", builtin_templates.LLAMA2, "<s>", "</s>", None),
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city. Returns <b>°C</b> & wind.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "description": "e.g. Zürich"},
                                      "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "turn_on", "description": "Switch on a Home Assistant entity.",
        "parameters": {"type": "object", "properties": {"entity_id": {"type": "string"}},
                       "required": ["entity_id"]}}},
]

_CALL = {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}}
_CALL2 = {"id": "call_def", "type": "function",
          "function": {"name": "turn_on", "arguments": {"entity_id": "light.kitchen"}}}

# Conversations in the Hugging Face shape (the reference's input).
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "system-user": ([{"role": "system", "content": "You are a terse home assistant."},
                     {"role": "user", "content": "Is the kitchen light on?"}], None),
    "multi-turn": ([{"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "  Tell me a joke.  "}], None),
    "tools-offered": ([{"role": "system", "content": "Use tools when useful."},
                       {"role": "user", "content": "Weather in Zürich?"}], TOOLS),
    "tools-no-system": ([{"role": "user", "content": "Turn on the kitchen light"}], TOOLS),
    "tool-round-trip": ([
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [_CALL]},
        {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather",
         "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 21 °C and clear."},
        {"role": "user", "content": "Thanks"},
    ], TOOLS),
    "parallel-calls": ([
        {"role": "user", "content": "Weather, and light on please"},
        {"role": "assistant", "content": "On it.", "tool_calls": [_CALL, _CALL2]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_def", "content": "ok"},
    ], TOOLS),
    "not-alternating": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                        None),
}


def _openai_shape(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same conversation as an OpenAI client sends it: arguments as JSON text."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


def _reference(source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool, bos: str, eos: str, **kwargs: Any) -> str:
    """transformers' rendering of the conversation as llama.cpp's server hands it to templates
    (no content: empty text)."""
    messages = [{**m, "content": "" if m.get("content") is None else m["content"]}
                for m in messages]
    result: Any = render_jinja_template(
        conversations=[messages], tools=cast(Any, tools), chat_template=source,
        add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos, **kwargs)
    return str(result[0][0])  # (rendered conversations, generation indices)


def _template(entry: tuple[str, str, str, str, str | None]) -> ChatTemplate:
    name, source, bos, eos, fmt = entry
    return ChatTemplate(source=source, name=name, bos_token=bos, eos_token=eos, tool_format=fmt)


@pytest.mark.parametrize("agp", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("entry", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_matches_transformers(entry: tuple[str, str, str, str, str | None], conv: str,
                              agp: bool) -> None:
    messages, tools = CONVERSATIONS[conv]
    tpl = _template(entry)
    kwargs = {"date_string": "26 Jul 2024"}
    try:
        expected = _reference(tpl.source, messages, tools, agp, tpl.bos_token, tpl.eos_token,
                              **kwargs)
    except jinja2.TemplateError as exc:  # the reference refuses: so must we, saying the same
        with pytest.raises(ChatTemplateError) as info:
            tpl.render(_openai_shape(messages), tools=tools, add_generation_prompt=agp, **kwargs)
        assert str(exc) in str(info.value)
        return
    got = tpl.render(_openai_shape(messages), tools=tools, add_generation_prompt=agp, **kwargs)
    assert got == expected


def test_content_parts_are_joined_like_llama_cpp() -> None:
    parts: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "text", "text": "there"}]}]
    flat: list[dict[str, Any]] = [{"role": "user", "content": "Hello\nthere"}]
    for entry in TEMPLATES:
        tpl = _template(entry)
        assert tpl.render(parts) == _reference(tpl.source, flat, None, True, tpl.bos_token,
                                               tpl.eos_token)


def test_date_defaults_to_today_via_strftime_now() -> None:
    tpl = _template(TEMPLATES[3])  # built-in llama3 dates the prompt when tools are offered
    messages, tools = CONVERSATIONS["tools-offered"]
    got = tpl.render(_openai_shape(messages), tools=tools)
    assert got == _reference(tpl.source, messages, tools, True, tpl.bos_token, tpl.eos_token)
    assert "Today Date: " + datetime.now().strftime("%d %b %Y") in got


# Hand-checked prompts, written out from each family's documented format, so that a wrong
# reference (or a wrong built-in) would be caught too.
SIMPLE: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Hi!"}]
LLAMA3_SIMPLE = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                 "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                 "Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
CHATML_SIMPLE = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                 "<|im_start|>assistant\n")
LLAMA2_SIMPLE = "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST]"
HAND_CHECKED = {
    "llama31": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                "Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen25": CHATML_SIMPLE,
    "llama2": LLAMA2_SIMPLE,
    "builtin-llama3": LLAMA3_SIMPLE,
    "builtin-chatml": CHATML_SIMPLE,
    "builtin-llama2": LLAMA2_SIMPLE,
}


@pytest.mark.parametrize("entry", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_hand_checked_prompt(entry: tuple[str, str, str, str, str | None]) -> None:
    assert _template(entry).render(SIMPLE) == HAND_CHECKED[entry[0]]


def test_builtin_chatml_tool_turns_by_hand() -> None:
    tpl = builtin_template("chatml", bos_token="", eos_token="<|im_end|>")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Light on"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "turn_on", "arguments": '{"entity_id": "light.k"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    tools = [{"type": "function", "function": {"name": "turn_on", "parameters": {}}}]
    assert tpl.render(messages, tools=tools) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML "
        'tags:\n<tools>\n{"type": "function", "function": {"name": "turn_on", "parameters": {}}}'
        "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nLight on<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "turn_on", "arguments": '
        '{"entity_id": "light.k"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\ndone\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_builtin_llama3_tool_turns_by_hand() -> None:
    tpl = builtin_template("llama3", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Light on"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "turn_on", "arguments": '{"entity_id": "light.k"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    tools = [{"type": "function", "function": {"name": "turn_on", "parameters": {}}}]
    assert tpl.render(messages, tools=tools, date_string="01 Jan 2025") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n"
        "You have access to the following functions. To call a function, respond with JSON for "
        'a function call. Respond in the format {"name": function name, "parameters": '
        "dictionary of argument name and its value}. Do not use variables.\n\n"
        '{\n    "type": "function",\n    "function": {\n        "name": "turn_on",\n'
        '        "parameters": {}\n    }\n}\n\n<|eot_id|>'
        "<|start_header_id|>user<|end_header_id|>\n\nLight on<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "turn_on", "parameters": {"entity_id": "light.k"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\ndone<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("entry", [t for t in TEMPLATES if t[4] is not None],
                         ids=[t[0] for t in TEMPLATES if t[4] is not None])
def test_rendered_tool_call_parses_back(entry: tuple[str, str, str, str, str | None]) -> None:
    """What a template shows the model as a call is what the parser of its format reads."""
    tpl = _template(entry)
    user: list[dict[str, Any]] = [{"role": "user", "content": "Weather?"}]
    call: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [_CALL]}
    before = tpl.render(user, tools=TOOLS, add_generation_prompt=True, date_string="1 Jan 2025")
    after = tpl.render(_openai_shape([*user, call]), tools=TOOLS, add_generation_prompt=False,
                       date_string="1 Jan 2025")
    assert after.startswith(before)
    reply = after[len(before):].removesuffix("\n").removesuffix(tpl.eos_token)
    content, calls = parse_tool_calls(reply, tpl.tool_format)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Zürich", "unit": "c"})]


# -- errors and environment ---------------------------------------------------------------------

def test_raise_exception_carries_the_template_message() -> None:
    tpl = _template(TEMPLATES[2])
    with pytest.raises(ChatTemplateError) as info:
        tpl.render(CONVERSATIONS["not-alternating"][0])
    assert str(info.value) == "Conversation roles must alternate user/assistant/user/assistant/..."


def test_jinja_errors_become_chat_template_errors() -> None:
    broken = ChatTemplate("{{ messages[0].content.nope() }}", "gguf", "", "", None)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        broken.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}", "gguf", "", "", None).render([{"role": "user", "content": "x"}])
    sandboxed = ChatTemplate("{{ messages.append(1) }}", "gguf", "", "", None)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        sandboxed.render([{"role": "user", "content": "x"}])
    ns = ChatTemplate("{% set ns = namespace(_x=1) %}", "gguf", "", "", None)
    with pytest.raises(ChatTemplateError, match="underscore"):
        ns.render([])


def test_environment_matches_transformers_helpers() -> None:
    source = ("{{ tools | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}"
              "|{{ {'a': 1} | tojson(separators=(',', ':')) }}|{{ enable_thinking }}|{{ x }}"
              "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}"
              "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
              "{% set ns = namespace(n=0) %}{% set ns.n = 3 %}{{ ns.n }}{{ dict(a=1) | tojson }}")
    tools = [{"type": "function", "function": {"name": "f", "description": "<b>ü</b> & 'q'"}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "one"},
                                      {"role": "user", "content": "two"}]
    got = ChatTemplate(source, "t", "", "", None).render(messages, tools=tools,
                                                         enable_thinking=False, x="é")
    assert got == _reference(source, messages, tools, True, "", "", enable_thinking=False, x="é")
    assert '"<b>ü</b> & \'q\'"' in got


def test_empty_tool_list_counts_as_no_tools() -> None:
    tpl = _template(TEMPLATES[0])
    messages = CONVERSATIONS["system-user"][0]
    assert tpl.render(messages, tools=[]) == tpl.render(messages)
    assert "Environment: ipython" not in tpl.render(messages, tools=[])


def test_normalize_messages() -> None:
    original: list[dict[str, Any]] = [
        {"role": "assistant", "content": [{"type": "text", "text": "a"}], "extra": {"k": 1},
         "tool_calls": [{"id": "1", "type": "function",
                         "function": {"name": "f", "arguments": '{"x": [1, 2]}'}},
                        {"id": "2", "type": "function",
                         "function": {"name": "g", "arguments": "not json {"}}]},
        {"role": "tool", "tool_call_id": "1", "name": "f", "content": None},
        {"role": "assistant", "content": "ok", "reasoning_content": "hmm"},
    ]
    before = copy.deepcopy(original)
    out = normalize_messages(original)
    assert original == before  # the caller's messages are not touched
    assert out[0]["content"] == "a"
    assert out[0]["extra"] == {"k": 1}
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"x": [1, 2]}
    assert out[0]["tool_calls"][1]["function"]["arguments"] == "not json {"
    # no content is empty text, as llama.cpp gives it
    assert out[1] == {"role": "tool", "tool_call_id": "1", "name": "f", "content": ""}
    assert out[2]["thinking"] == out[2]["reasoning_content"] == "hmm"


@pytest.mark.parametrize(("messages", "problem"), [
    ("hello", "must be a list"),
    ([{"content": "x"}], "no 'role'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "'image_url' is not supported"),
    ([{"role": "user", "content": 5}], "'content' must be"),
    ([{"role": "assistant", "tool_calls": {"id": 1}}], "'tool_calls' must be a list"),
    ([{"role": "user", "content": "x", "when": datetime(2025, 1, 1)}], "type datetime"),
])
def test_bad_messages_are_refused_clearly(messages: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        builtin_template("chatml", bos_token="", eos_token="").render(messages)


def test_compiled_once_per_source() -> None:
    from prima_node.text.chat_template import _compile

    assert _compile(LLAMA31_CHAT_TEMPLATE) is _compile(LLAMA31_CHAT_TEMPLATE)


def test_detect_tool_format() -> None:
    assert detect_tool_format(LLAMA31_CHAT_TEMPLATE) == "llama3"
    assert detect_tool_format(QWEN25_CHAT_TEMPLATE) == "hermes"
    assert detect_tool_format(LLAMA2_CHAT_TEMPLATE) is None
    assert detect_tool_format("{{ '[TOOL_CALLS]' }}") == "mistral"


def test_builtin_llama2_refuses_tool_calls() -> None:
    tpl = builtin_template("llama2", bos_token="<s>", eos_token="</s>")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [_CALL]}]
    with pytest.raises(ChatTemplateError, match="no tool-call syntax"):
        tpl.render(_openai_shape(messages))


def test_builtin_template_names() -> None:
    tpl = builtin_template("builtin:llama3", bos_token="<b>", eos_token="<e>")
    assert (tpl.name, tpl.tool_format, tpl.bos_token) == ("builtin:llama3", "llama3", "<b>")
    assert builtin_template("chatml", bos_token="", eos_token="").tool_format == "hermes"
    assert builtin_template("llama2", bos_token="", eos_token="").tool_format is None
    with pytest.raises(ValueError, match="choose from"):
        builtin_template("vicuna", bos_token="", eos_token="")


# -- from GGUF files ------------------------------------------------------------------------------

MODELS = [("llama", "bpe", "llama3", "<|begin_of_text|>", "<|eot_id|>"),
          ("qwen2", "bpe", "hermes", "<|endoftext|>", "<|im_end|>"),
          ("llama", "spm", None, "<s>", "</s>")]


@pytest.mark.parametrize(("arch", "vocab", "fmt", "bos", "eos"), MODELS)
def test_template_from_file(make_model: Any, arch: str, vocab: str, fmt: str | None, bos: str,
                            eos: str) -> None:
    mf = ModelFile.open(make_model(arch=arch, vocab=vocab))
    try:
        tpl = load_chat_template(mf)
        assert tpl.source == mf.get("tokenizer.chat_template")
    finally:
        mf.close()
    assert (tpl.name, tpl.tool_format, tpl.bos_token, tpl.eos_token) == ("gguf", fmt, bos, eos)


def _copy_without_template(src: Path, dst: Path) -> Path:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "tokenizer.chat_template"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize(("arch", "vocab", "builtin"), [("llama", "bpe", "llama3"),
                                                       ("qwen2", "bpe", "chatml"),
                                                       ("llama", "spm", "llama2")])
def test_file_without_template_falls_back_with_a_log_record(
        make_model: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, arch: str, vocab: str,
        builtin: str) -> None:
    path = _copy_without_template(make_model(arch=arch, vocab=vocab), tmp_path / "bare.gguf")
    mf = ModelFile.open(path)
    try:
        assert mf.get("tokenizer.chat_template") is None
        with caplog.at_level(logging.INFO, logger="prima_node.text"):
            tpl = load_chat_template(mf)
    finally:
        mf.close()
    assert tpl.name == "builtin:" + builtin
    assert tpl.source == builtin_templates.BUILTIN_TEMPLATES[builtin]
    records = [r for r in caplog.records if r.name == "prima_node.text"]
    assert any(repr(builtin) in r.getMessage() and "no usable chat template" in r.getMessage()
               for r in records), caplog.text


def test_choose_builtin_reasons() -> None:
    assert choose_builtin("qwen3", ["a", "b"], "gpt2")[0] == "chatml"
    name, why = choose_builtin("gpt2", ["a"], "gpt2")
    assert name == "chatml"
    assert "default" in why
    assert choose_builtin("llama", ["<unk>", "<s>", "</s>"], "llama")[0] == "llama2"
