"""Real tokenizer vocabularies for synthetic GGUF models.

``prima-node make-model`` writes GGUF files whose weights are random but whose
tokenizer is real: a byte-level BPE (``tokenizer.ggml.model = "gpt2"``, Llama 3 /
Qwen 2.5 style) or a SentencePiece-style vocabulary (``tokenizer.ggml.model =
"llama"``, Llama 2 style), laid out the way llama.cpp's ``convert_hf_to_gguf.py``
writes real models, so that llama.cpp loads the files and tokenizes with them.

Nothing is downloaded.  The merges are learned with the ``tokenizers`` library's
``BpeTrainer`` on a corpus that is generated here, deterministically, from
built-in word lists and a small integer PRNG (splitmix64): the same arguments
give the same vocabulary, byte for byte, on every platform and Python version.

Layouts
-------
``bpe``
    The 256 byte-level characters (GPT-2 byte-to-unicode mapping, in code-point
    order like GPT-2 / Llama 3 / Qwen), then the merged tokens in merge order,
    then the style's special tokens (Llama 2 style puts ``<unk> <s> </s>`` first).
    ``tokenizer.ggml.merges`` holds every merge as ``"left right"`` in the same
    mapping; the pre-tokenizer regex used for training is the one llama.cpp uses
    for ``tokenizer.ggml.pre`` (``llama-bpe`` or ``qwen2``).
``spm``
    ``<unk>`` (and ``<s> </s>`` for Llama 2 style), the byte tokens
    ``<0x00>`` .. ``<0xFF>``, the merged pieces in merge order with score
    ``-(merge rank)``, then the single-character pieces (lowest scores), then the
    style's other special tokens.  Space is ``"▁"`` (U+2581).  llama.cpp's SPM
    tokenizer repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring piece, which replays the learned BPE merges in rank order.
"""

# The corpus word lists are multilingual on purpose (Greek, Cyrillic, full-width punctuation).
# ruff: noqa: RUF001

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..text.builtin_templates import HARMONY

if TYPE_CHECKING:
    import gguf

__all__ = [
    "KINDS",
    "STYLES",
    "TOKEN_TYPE_BYTE",
    "TOKEN_TYPE_CONTROL",
    "TOKEN_TYPE_NORMAL",
    "TOKEN_TYPE_UNKNOWN",
    "TOKEN_TYPE_UNUSED",
    "TOKEN_TYPE_USER_DEFINED",
    "SyntheticVocab",
    "build_corpus",
    "build_vocab",
    "bytes_to_unicode",
]

# llama.cpp / gguf token types (gguf.TokenType).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

KINDS = ("bpe", "spm")
STYLES = ("llama3", "qwen", "llama2", "gpt-oss")

SPM_SPACE = "\u2581"  # "▁"

# Pre-tokenizer regexes, exactly as in the Hugging Face tokenizer.json of the real
# models and as llama.cpp implements them for tokenizer.ggml.pre = "llama-bpe" / "qwen2".
LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (gpt-4o, gpt-oss): cased words with contractions, numbers in threes
GPT4O_PRETOKENIZE_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Longest learned token, in characters (bytes for byte-level BPE).
_MAX_TOKEN_CHARS = 16
# Extra merges to learn beyond the budget, to make up for learned tokens that must be
# dropped (see _banned_pieces).
_TRAIN_SLACK = 256


# --------------------------------------------------------------------------------------
# The public type
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticVocab:
    """A complete tokenizer description, ready to be written as GGUF metadata."""

    kind: str  # "bpe" (tokenizer.ggml.model = "gpt2") or "spm" ("llama")
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    pre: str | None  # tokenizer.ggml.pre (bpe only): "llama-bpe" or "qwen2"
    bos_id: int
    eos_id: int
    eot_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def ggml_model(self) -> str:
        """The value of ``tokenizer.ggml.model``."""
        return "gpt2" if self.kind == "bpe" else "llama"

    def token_id(self, text: str) -> int:
        """Id of the token whose stored text is ``text`` (KeyError if absent)."""
        try:
            return self.tokens.index(text)
        except ValueError:
            raise KeyError(text) from None

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        """Add every ``tokenizer.*`` key (and ``tokenizer.chat_template``) to ``writer``."""
        writer.add_tokenizer_model(self.ggml_model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        if self.eot_id is not None:
            writer.add_eot_token_id(self.eot_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_chat_template(self.chat_template)


def build_vocab(kind: str, size: int, *, style: str) -> SyntheticVocab:
    """Build a vocabulary of exactly ``size`` tokens (special and byte tokens included).

    ``kind`` is "bpe" or "spm"; ``style`` ("llama3", "qwen", "llama2") chooses the
    special tokens, the ids of BOS/EOS/EOT/PAD/UNK, ``add_bos`` and the chat template.
    The required combinations are bpe+llama3, bpe+qwen and spm+llama2; the others work
    too (spm+llama3 / spm+qwen keep ``<unk>`` at id 0 and append the style's specials;
    bpe+llama2 puts ``<unk> <s> </s>`` first and uses the Llama 3 pre-tokenizer).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown vocab kind {kind!r} (expected one of {KINDS})")
    if style not in STYLES:
        raise ValueError(f"unknown vocab style {style!r} (expected one of {STYLES})")
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"vocab size must be an int, got {size!r}")
    frozen = _build_frozen(kind, size, style)
    return SyntheticVocab(
        kind=kind,
        tokens=list(frozen.tokens),
        token_types=list(frozen.token_types),
        scores=None if frozen.scores is None else list(frozen.scores),
        merges=None if frozen.merges is None else list(frozen.merges),
        pre=frozen.pre,
        bos_id=frozen.bos_id,
        eos_id=frozen.eos_id,
        eot_id=frozen.eot_id,
        pad_id=frozen.pad_id,
        unk_id=frozen.unk_id,
        add_bos=frozen.add_bos,
        add_eos=frozen.add_eos,
        add_space_prefix=frozen.add_space_prefix,
        chat_template=frozen.chat_template,
    )


# --------------------------------------------------------------------------------------
# Styles: special tokens, ids and chat templates
# --------------------------------------------------------------------------------------

# Llama 3.1 Instruct (meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json), with tools.
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501

# Qwen 2.5 Instruct (Qwen/Qwen2.5-7B-Instruct tokenizer_config.json): ChatML with tools.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

# Llama 2 chat (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json): [INST] ... [/INST]
# with the system prompt in <<SYS>> inside the first user turn (Mistral's format minus <<SYS>>).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}"
    "{% set loop_messages = messages %}"
    "{% set system_message = false %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}"
    "{% set content = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

_C = TOKEN_TYPE_CONTROL
_U = TOKEN_TYPE_USER_DEFINED


@dataclass(frozen=True)
class _Style:
    specials: tuple[tuple[str, int], ...]
    specials_first: bool  # Llama 2: <unk> <s> </s> are ids 0..2
    bos: str
    eos: str
    eot: str | None
    pad: str | None
    unk: str | None
    add_bos: bool
    pre: str  # tokenizer.ggml.pre and training regex when kind == "bpe"
    chat_template: str


_LLAMA3_SPECIALS: tuple[tuple[str, int], ...] = (
    ("<|begin_of_text|>", _C),
    ("<|end_of_text|>", _C),
    ("<|reserved_special_token_0|>", _C),
    ("<|reserved_special_token_1|>", _C),
    ("<|finetune_right_pad_id|>", _C),
    ("<|reserved_special_token_2|>", _C),
    ("<|start_header_id|>", _C),
    ("<|end_header_id|>", _C),
    ("<|eom_id|>", _C),
    ("<|eot_id|>", _C),
    ("<|python_tag|>", _C),
    *((f"<|reserved_special_token_{i}|>", _C) for i in range(3, 8)),
)

# Qwen 2.5's added tokens in id order.  convert_hf_to_gguf marks an added token CONTROL
# when it is "special" or looks like <|...|>; <tool_call> and </tool_call> are neither
# (special: false in tokenizer.json), so Qwen 2.5 GGUFs have them as USER_DEFINED.
_QWEN_SPECIALS: tuple[tuple[str, int], ...] = (
    ("<|endoftext|>", _C),
    ("<|im_start|>", _C),
    ("<|im_end|>", _C),
    ("<|object_ref_start|>", _C),
    ("<|object_ref_end|>", _C),
    ("<|box_start|>", _C),
    ("<|box_end|>", _C),
    ("<|quad_start|>", _C),
    ("<|quad_end|>", _C),
    ("<|vision_start|>", _C),
    ("<|vision_end|>", _C),
    ("<|vision_pad|>", _C),
    ("<|image_pad|>", _C),
    ("<|video_pad|>", _C),
    ("<tool_call>", _U),
    ("</tool_call>", _U),
    ("<|fim_prefix|>", _C),
    ("<|fim_middle|>", _C),
    ("<|fim_suffix|>", _C),
    ("<|fim_pad|>", _C),
    ("<|repo_name|>", _C),
    ("<|file_sep|>", _C),
)

# o200k_harmony's special tokens (gpt-oss), in id order; the reserved ones keep their places
_HARMONY_SPECIALS: tuple[tuple[str, int], ...] = (
    ("<|startoftext|>", _C),
    ("<|endoftext|>", _C),
    ("<|reserved_200000|>", _C),
    ("<|reserved_200001|>", _C),
    ("<|return|>", _C),
    ("<|constrain|>", _C),
    ("<|reserved_200004|>", _C),
    ("<|channel|>", _C),
    ("<|start|>", _C),
    ("<|end|>", _C),
    ("<|message|>", _C),
    ("<|reserved_200009|>", _C),
    ("<|reserved_200010|>", _C),
    ("<|reserved_200011|>", _C),
    ("<|call|>", _C),
)

_LLAMA2_SPECIALS: tuple[tuple[str, int], ...] = (
    ("<unk>", TOKEN_TYPE_UNKNOWN),
    ("<s>", _C),
    ("</s>", _C),
)

_STYLES: dict[str, _Style] = {
    # Llama 3.1 Instruct GGUFs: bos 128000, eos = <|eot_id|> (128009), no pad.
    "llama3": _Style(
        specials=_LLAMA3_SPECIALS,
        specials_first=False,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        eot="<|eot_id|>",
        pad=None,
        unk=None,
        add_bos=True,
        pre="llama-bpe",
        chat_template=LLAMA31_CHAT_TEMPLATE,
    ),
    # Qwen 2.5 Instruct GGUFs: bos = pad = <|endoftext|>, eos = <|im_end|>, add_bos false.
    "qwen": _Style(
        specials=_QWEN_SPECIALS,
        specials_first=False,
        bos="<|endoftext|>",
        eos="<|im_end|>",
        eot="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        pre="qwen2",
        chat_template=QWEN25_CHAT_TEMPLATE,
    ),
    # Llama 2 chat GGUFs: <unk>=0 <s>=1 </s>=2, add_bos true, no pad, no EOT.
    "llama2": _Style(
        specials=_LLAMA2_SPECIALS,
        specials_first=True,
        bos="<s>",
        eos="</s>",
        eot=None,
        pad=None,
        unk="<unk>",
        add_bos=True,
        pre="llama-bpe",
        chat_template=LLAMA2_CHAT_TEMPLATE,
    ),
    # gpt-oss GGUFs: bos <|startoftext|>, eos <|return|>, pad <|endoftext|>, no BOS added
    # (the harmony prompt starts with <|start|>)
    "gpt-oss": _Style(
        specials=_HARMONY_SPECIALS,
        specials_first=False,
        bos="<|startoftext|>",
        eos="<|return|>",
        eot=None,
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        pre="gpt-4o",
        chat_template=HARMONY,
    ),
}

_PRE_REGEX = {"llama-bpe": LLAMA3_PRETOKENIZE_REGEX, "qwen2": QWEN2_PRETOKENIZE_REGEX,
              "gpt-4o": GPT4O_PRETOKENIZE_REGEX}

# Token texts that llama.cpp's vocab loader recognises by name (EOT / EOM / EOG / FIM
# detection, gpt-oss attributes) and forces to CONTROL or USER_DEFINED whatever their
# type in the file.  A learned piece must never be one of them (nor any style's special
# token text): "<|im_end|>" learned as a plain piece of a Llama 2 vocabulary would turn
# into an end-of-generation token.
_LLAMA_CPP_NAMED_TOKENS = frozenset(
    [
        "</s>", "<EOT>", "<MID>", "<PAD>", "<PRE>", "<REPO>", "<SUF>", "<end_of_turn>",
        "<end_of_utterance>", "<eos>", "<fim-middle>", "<fim-pad>", "<fim-prefix>",
        "<fim-repo>", "<fim-suffix>", "<fim_middle>", "<fim_pad>", "<fim_prefix>",
        "<fim_suffix>", "<reponame>", "<turn|>", "<|calls|>", "<|call|>", "<|channel|>",
        "<|code_middle|>", "<|code_prefix|>", "<|code_suffix|>", "<|constrain|>",
        "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<|eom_id|>", "<|eot_id|>",
        "<|file_sep|>", "<|fim_middle|>", "<|fim_pad|>", "<|fim_prefix|>", "<|fim_repo|>",
        "<|fim_suffix|>", "<|flush|>", "<|im_end|>", "<|message|>", "<|middle|>",
        "<|prefix|>", "<|repo_name|>", "<|return|>", "<|start|>", "<|suffix|>",
        "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581end\uff5c>",
        "<\uff5cfim\u2581hole\uff5c>", "[EOS]", "[EOT]", "[PAD]", "[e~[", "_<EOT>",
        "\u2581<MID>", "\u2581<PRE>", "\u2581<SUF>", "<mask>", "[MASK]", "<unk>", "<s>",
    ]
    + [t for style in (_LLAMA3_SPECIALS, _QWEN_SPECIALS, _LLAMA2_SPECIALS, _HARMONY_SPECIALS)
       for t, _ in style]
)  # fmt: skip


def _special_looking(piece: str) -> bool:
    return piece in _LLAMA_CPP_NAMED_TOKENS or (
        len(piece) > 4 and piece.startswith("<|") and piece.endswith("|>")
    )


# --------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrozenVocab:
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[str, ...] | None
    pre: str | None
    bos_id: int
    eos_id: int
    eot_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str


@functools.lru_cache(maxsize=16)
def _build_frozen(kind: str, size: int, style_name: str) -> _FrozenVocab:
    style = _STYLES[style_name]
    if kind == "bpe":
        return _assemble_bpe(size, style)
    return _assemble_spm(size, style)


def _ids(style: _Style, tokens: list[str]) -> dict[str, int | None]:
    index = {t: i for i, t in enumerate(tokens)}

    def get(text: str | None) -> int | None:
        return None if text is None else index[text]

    return {
        "bos_id": get(style.bos),
        "eos_id": get(style.eos),
        "eot_id": get(style.eot),
        "pad_id": get(style.pad),
        "unk_id": get(style.unk),
    }


def _pad_name(i: int) -> str:
    # What convert_hf_to_gguf writes for ids the tokenizer does not define.
    return f"[PAD{i}]"


def _assemble_bpe(size: int, style: _Style) -> _FrozenVocab:
    specials = list(style.specials)
    n_fixed = 256 + len(specials)
    if size <= n_fixed:
        raise ValueError(
            f"bpe vocab size must exceed {n_fixed} for style with {len(specials)} "
            f"special tokens, got {size}"
        )
    n_learned = size - n_fixed
    special_texts = {t for t, _ in specials}
    merges_pairs, learned = _train_bytelevel(style.pre, n_learned, frozenset(special_texts))

    byte_chars = sorted(bytes_to_unicode().values())  # GPT-2 / Llama 3 / Qwen id order
    body: list[str] = byte_chars + learned
    body_types = [TOKEN_TYPE_NORMAL] * len(body)

    tokens: list[str] = []
    types: list[int] = []
    if style.specials_first:
        tokens += [t for t, _ in specials]
        types += [ty for _, ty in specials]
    tokens += body
    types += body_types
    n_pad = n_learned - len(learned)
    if n_pad > 0:
        start = len(tokens)
        tokens += [_pad_name(start + i) for i in range(n_pad)]
        types += [TOKEN_TYPE_UNUSED] * n_pad
    if not style.specials_first:
        tokens += [t for t, _ in specials]
        types += [ty for _, ty in specials]
    merges = [f"{a} {b}" for a, b in merges_pairs]
    _check(tokens, size)
    ids = _ids(style, tokens)
    return _FrozenVocab(
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=None,
        merges=tuple(merges),
        pre=style.pre,
        bos_id=_req(ids["bos_id"]),
        eos_id=_req(ids["eos_id"]),
        eot_id=ids["eot_id"],
        pad_id=ids["pad_id"],
        unk_id=ids["unk_id"],
        add_bos=style.add_bos,
        add_eos=False,
        add_space_prefix=None,
        chat_template=style.chat_template,
    )


def _assemble_spm(size: int, style: _Style) -> _FrozenVocab:
    if style.specials_first:
        head = list(style.specials)
        tail: list[tuple[str, int]] = []
    else:
        head = [("<unk>", TOKEN_TYPE_UNKNOWN)]
        tail = [st for st in style.specials if st[0] != "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_fixed = len(head) + 256 + len(tail)
    if size <= n_fixed + 64:
        raise ValueError(f"spm vocab size must exceed {n_fixed + 64}, got {size}")
    n_learned = size - n_fixed
    reserved = frozenset([t for t, _ in head] + [t for t, _ in tail] + byte_tokens)
    pieces, chars = _train_metaspace(n_learned, _banned_pieces(reserved))

    tokens: list[str] = [t for t, _ in head] + byte_tokens
    types: list[int] = [ty for _, ty in head] + [TOKEN_TYPE_BYTE] * 256
    scores: list[float] = [0.0] * len(tokens)
    learned = pieces + chars
    tokens += learned
    types += [TOKEN_TYPE_NORMAL] * len(learned)
    # score = -(merge rank): llama.cpp merges the highest-scoring piece first.  Single
    # characters are never the result of a merge; they get the lowest scores, as in the
    # Llama 2 tokenizer.model.
    scores += [float(-r) for r in range(len(learned))]
    n_pad = n_learned - len(learned)
    if n_pad > 0:
        start = len(tokens)
        tokens += [_pad_name(start + i) for i in range(n_pad)]
        types += [TOKEN_TYPE_UNUSED] * n_pad
        scores += [float(-(len(learned) + i)) for i in range(n_pad)]
    tokens += [t for t, _ in tail]
    types += [ty for _, ty in tail]
    scores += [0.0] * len(tail)
    _check(tokens, size)
    ids = _ids(style, tokens)
    return _FrozenVocab(
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=tuple(scores),
        merges=None,
        pre=None,
        bos_id=_req(ids["bos_id"]),
        eos_id=_req(ids["eos_id"]),
        eot_id=ids["eot_id"],
        pad_id=ids["pad_id"],
        unk_id=_req(ids["unk_id"]) if style.unk is not None else 0,
        add_bos=style.add_bos,
        add_eos=False,
        add_space_prefix=True,
        chat_template=style.chat_template,
    )


def _banned_pieces(reserved: frozenset[str]) -> frozenset[str]:
    """Learned SPM pieces that must not exist.

    llama.cpp's SPM tokenizer merges any two adjacent symbols whose concatenation is a
    token, special tokens included.  If ``"<s"`` were a piece, plain text ``"<s>"`` would
    come out as the BOS control token (and ``"<0x0A"`` would make ``"<0x0A>"`` a byte
    token).  The last merge forming a reserved text always joins a proper prefix and a
    proper suffix, one of them at least two characters long (there are no two-character
    reserved texts), so banning every proper prefix / suffix of two or more characters
    keeps special, byte and unknown tokens unreachable from plain text.
    """
    banned = set(reserved)
    for text in reserved:
        for i in range(2, len(text)):
            banned.add(text[:i])
            banned.add(text[-i:])
    return frozenset(banned)


def _req(v: int | None) -> int:
    if v is None:
        raise AssertionError("required special token missing")
    return v


def _check(tokens: list[str], size: int) -> None:
    if len(tokens) != size:
        raise AssertionError(f"vocab assembled with {len(tokens)} tokens, expected {size}")
    if len(set(tokens)) != len(tokens):
        raise AssertionError("vocab has duplicate tokens")
    if any(not t for t in tokens):
        raise AssertionError("vocab has an empty token")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _merge_list(model: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in model["merges"]:
        if isinstance(m, str):  # tokenizers < 0.20 serialises merges as "a b"
            a, b = m.split(" ")
        else:
            a, b = m
        out.append((a, b))
    return out


def _learned_tokens(
    merges: list[tuple[str, str]], want: int, banned: frozenset[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """Merged tokens in order of their first merge, at most ``want`` of them, and the
    merges that produce them (a merge whose result is dropped is dropped too, and so is
    every later merge that uses it)."""
    known: set[str] = set()
    learned: list[str] = []
    kept: list[tuple[str, str]] = []
    dropped: set[str] = set()
    for a, b in merges:
        piece = a + b
        if a in dropped or b in dropped:
            dropped.add(piece)
            continue
        if piece in banned or _special_looking(piece):
            dropped.add(piece)
            continue
        if piece not in known:
            if len(learned) >= want:
                dropped.add(piece)
                continue
            known.add(piece)
            learned.append(piece)
        kept.append((a, b))
    return kept, learned


@functools.lru_cache(maxsize=8)
def _train_bytelevel(
    pre: str, n_learned: int, reserved: frozenset[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_learned + _TRAIN_SLACK,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=_MAX_TOKEN_CHARS,
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges, learned = _learned_tokens(_merge_list(model), n_learned, reserved)
    known = set(bytes_to_unicode().values()) | set(learned)
    if any(a not in known or b not in known or a + b not in known for a, b in merges):
        raise AssertionError("byte-level training produced a merge outside the vocabulary")
    return merges, learned


@functools.lru_cache(maxsize=8)
def _train_metaspace(n_learned: int, banned: frozenset[str]) -> tuple[list[str], list[str]]:
    """Pieces learned by BPE over characters, SentencePiece style (space -> "▁", a "▁"
    prepended to every text, words split before each "▁"), and the single characters.
    Returns ``(merged pieces in merge order, characters)`` with
    ``len(pieces) + len(chars) <= n_learned``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # Characters get at most about a quarter of the learned budget (the rest falls back
    # to byte tokens), the remainder goes to merged pieces.  The alphabet is chosen here
    # (most frequent first, ties by code point): the trainer's own limit_alphabet breaks
    # ties in hash order, which differs from one process to the next.
    alphabet = _spm_alphabet(max(32, n_learned // 4))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPM_SPACE, prepend_scheme="always", split=True
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned + _TRAIN_SLACK,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=list(alphabet),
        limit_alphabet=len(alphabet),
        max_token_length=_MAX_TOKEN_CHARS,
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    chars = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if len(t) == 1]
    chars = [c for c in chars if c not in banned]
    _, pieces = _learned_tokens(_merge_list(model), n_learned - len(chars), banned)
    return pieces, chars


def _spm_alphabet(limit: int) -> tuple[str, ...]:
    counts: dict[str, int] = {}
    for doc in build_corpus():
        for ch in SPM_SPACE + doc.replace(" ", SPM_SPACE):
            counts[ch] = counts.get(ch, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], ord(kv[0])))
    return tuple(ch for ch, _ in ranked[:limit])


# --------------------------------------------------------------------------------------
# The built-in corpus
# --------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


class _Rng:
    """splitmix64: tiny, fast enough, and identical on every Python version."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent

    def choice(self, seq: list[str] | tuple[str, ...]) -> str:
        return seq[self.below(len(seq))]

    def zipf(self, seq: list[str] | tuple[str, ...]) -> str:
        """Pick with a heavy bias towards the start of ``seq`` (roughly 1/rank)."""
        return seq[self.below(self.below(len(seq)) + 1)]


def _words(s: str) -> tuple[str, ...]:
    return tuple(s.split())


# Common English words, roughly by frequency.
_ENGLISH = _words("""
the of and to a in is it you that he was for on are with as I his they be at one have
this from or had by not word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man
year came show every good me give our under name very through just form sentence great
think say help low line differ turn cause much mean before move right boy old too same
tell does set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off
need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover
food sun four between state keep eye never last let thought city tree cross farm hard
start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure
watch color face wood main enough plain girl usual young ready above ever red list though
feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six
table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait plan figure star box
noun field rest correct able pound done beauty drive stood contain front teach week final
gave green oh quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane
stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow
tire bring yes distant fill east paint language among model network token server cluster
memory compute layer tensor weight matrix vector kernel thread device cache buffer stream
request response latency throughput benchmark inference training parameter quantize
""")

_CONTRACTIONS = _words("""
don't can't won't isn't aren't wasn't weren't hasn't haven't hadn't doesn't didn't
couldn't wouldn't shouldn't mustn't it's that's there's here's what's who's let's I'm
you're we're they're I've you've we've they've I'll you'll we'll they'll she'll he'll
I'd you'd we'd they'd she'd he'd y'all o'clock DON'T IT'S WE'LL THEY'RE I'M
""")

_ACCENTED = _words("""
café naïve résumé déjà vu façade crème brûlée garçon élève être où très français
fiancée coöperate über Straße Größe schön Mädchen Äpfel Öl Übung Fräulein Käse
mañana niño año señor corazón canción acción jalapeño pingüino Ñandú
ação coração São Paulo informação não também você
Kraków żółć źdźbło łódź gęślą jaźń Dvořák Škoda Čapek příliš žluťoučký kůň
smörgåsbord Ångström fjärd Ærø Øresund København Malmö Åland
Zürich Genève Besançon Noël Hélène Françoise Émile Île-de-France
İstanbul Gülşen Şanlıurfa ağaç çiçek Reykjavík Þórður Eyjafjallajökull
Ελλάδα γεια σου καλημέρα ευχαριστώ Αθήνα λόγος
привет мир Москва спасибо хорошо сегодня русский язык
""")

_OTHER_SCRIPTS = _words("""
مرحبا بالعالم شكرا العربية שלום עולם תודה עברית नमस्ते दुनिया धन्यवाद हिन्दी
สวัสดี ขอบคุณ ภาษาไทย Xin chào Việt Nam cảm ơn tiếng Việt ሰላም ქართული Հայերեն
""")

_CJK_PHRASES = _words("""
你好 世界 你好世界 中文 我们 今天天气很好 学习 人工智能 机器学习 北京 上海 中国
谢谢 不客气 朋友 时间 问题 数据 模型 计算机 网络 服务器 我爱你 早上好 晚安
こんにちは ありがとう 日本語 東京 大阪 カタカナ ひらがな すみません おはよう
さようなら 漢字 コンピュータ 機械学習 私は学生です
안녕하세요 감사합니다 한국어 서울 사랑해 컴퓨터 학교 친구
""")

_CJK_PUNCT = ("，", "。", "！", "？", "、", "「", "」", "：", "（", "）")

_EMOJI = (
    "😀", "😂", "🥲", "😍", "🤔", "👍", "👎", "🙏", "🎉", "🔥", "✨", "🚀", "💡", "✅",
    "❌", "⚠️", "❤️", "💔", "🌍", "🍕", "☕", "🐍", "🦀", "📦", "🧠", "⭐", "🌈", "🎵",
    "👨\u200d👩\u200d👧\u200d👦", "👩\u200d💻", "👨🏽\u200d🚀", "🏳️\u200d🌈",
    "👋🏻", "👋🏿", "🇺🇸", "🇯🇵", "🇫🇷", "🇩🇪", "🇧🇷", "1️⃣", "#️⃣", "©", "™", "→", "…",
)  # fmt: skip

_SYMBOLS = (
    "€", "£", "¥", "°", "±", "×", "÷", "≤", "≥", "≠", "∞", "√", "π", "µ", "§", "¶", "«",
    "»", "“", "”", "‘", "’", "—", "–", "•", "½", "¼", "²", "³", "‰", "←", "↑", "↓",
)  # fmt: skip

_CODE_SNIPPETS = (
    'def {a}({b}, {c}=None):\n    """Return the {a} of {b}."""\n    if {c} is None:\n'
    "        {c} = []\n    for i in range(len({b})):\n        {c}.append({b}[i] * 2)\n"
    "    return {c}\n",
    "class {A}:\n    def __init__(self, {b}: int) -> None:\n        self.{b} = {b}\n\n"
    '    def __repr__(self) -> str:\n        return f"{A}({b}={{self.{b}!r}})"\n',
    "import os\nimport sys\nfrom pathlib import Path\n\n{a} = Path(sys.argv[1])\n"
    'if not {a}.exists():\n    print(f"missing: {{{a}}}", file=sys.stderr)\n'
    "    sys.exit(1)\n",
    "#include <stdio.h>\n#include <stdlib.h>\n\nint {a}(int {b}, char **{c}) {{\n"
    '    for (int i = 0; i < {b}; ++i) {{\n        printf("%s\\n", {c}[i]);\n    }}\n'
    "    return 0;\n}}\n",
    "const {a} = async ({b}) => {{\n  const res = await fetch(`/api/{b}/${{{b}.id}}`);\n"
    "  if (!res.ok) throw new Error(res.statusText);\n  return res.json();\n}};\n",
    "fn {a}({b}: &[u8]) -> Result<usize, Error> {{\n    let mut {c} = 0usize;\n"
    "    for &x in {b}.iter() {{\n        {c} += x as usize;\n    }}\n    Ok({c})\n}}\n",
    '{{\n  "{a}": {{\n    "{b}": [1, 2, 3],\n    "{c}": true,\n    "name": "{A}",\n'
    '    "value": null\n  }}\n}}\n',
    '<div class="{a}">\n  <p id="{b}">Hello &amp; welcome</p>\n'
    '  <a href="https://example.com/{c}?q=1&x=2">link</a>\n</div>\n',
    "SELECT {a}, COUNT(*) AS n\nFROM {b}\nWHERE {c} > 10 AND {a} IS NOT NULL\n"
    "GROUP BY {a}\nORDER BY n DESC;\n",
    "#!/bin/bash\nset -euo pipefail\nfor f in ./{a}/*.txt; do\n"
    '    echo "$f" | grep -q \'{b}\' && cp "$f" /tmp/{c}/\ndone\n',
    "if ({a} != {b} && {c} >= 0) {{\n\t{a} += {c};\n\t{b} -= 1;\n}} else {{\n\treturn -1;\n}}\n",
    "x = [i ** 2 for i in range(10) if i % 2 == 0]\n{a} = {{k: v for k, v in zip(x, x)}}\n"
    "assert {a}[4] == 4, '{b} failed'\n",
    '- name: {a}\n  image: {b}:latest\n  ports:\n    - "8080:80"\n  env:\n    {C}: "true"\n',
)

_SPECIAL_LOOKALIKES = (
    "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>assistant", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>",
    "<s>[INST]", "[/INST]", "</s>", "<<SYS>>", "<</SYS>>", "<unk>", "<pad>", "<think>",
)  # fmt: skip

_ONSETS = (
    _words(
        "b c d f g h j k l m n p r s t v w y z br cr dr fl gr pl pr sh st th tr ch sp sk sl "
        "sn sw wh bl cl gl fr str qu ph"
    )
    + ("",) * 6
)
_NUCLEI = _words("a e i o u a e i o u ai ea ee ie oo ou oa au y io")
_CODAS = _words("n r s t l m nd ng st ck rt nt ll ss x th sh rk mp") + ("",) * 12

_PUNCT_END = (".", ".", ".", ".", "!", "?", "...", ":", ";")


def _pseudo_words(rng: _Rng, n: int) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    while len(seen) < n:
        syl = (1, 1, 2, 2, 2, 3, 3, 4)[rng.below(8)]
        w = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syl)
        )
        if len(w) >= 2:
            seen.setdefault(w, None)
    return tuple(seen)


def _cjk_word(rng: _Rng) -> str:
    # Common CJK unified ideographs (U+4E00..U+62FF) and hiragana / katakana / hangul.
    r = rng.below(10)
    n = 1 + rng.below(4)
    if r < 6:
        return "".join(chr(0x4E00 + rng.below(0x1500)) for _ in range(n))
    if r < 8:
        return "".join(chr(0x3041 + rng.below(0x56) + 0x60 * rng.below(2)) for _ in range(n))
    return "".join(chr(0xAC00 + rng.below(0x0C00)) for _ in range(n))


def _number(rng: _Rng) -> str:
    r = rng.below(12)
    if r == 0:
        return str(rng.below(10))
    if r == 1:
        return str(rng.below(100))
    if r == 2:
        return str(1900 + rng.below(130))
    if r == 3:
        return f"{rng.below(1000)}.{rng.below(100):02d}"
    if r == 4:
        return f"${rng.below(500)}.{rng.below(100):02d}"
    if r == 5:
        return f"{rng.below(100)}%"
    if r == 6:
        return f"{2000 + rng.below(30)}-{1 + rng.below(12):02d}-{1 + rng.below(28):02d}"
    if r == 7:
        return f"{rng.below(24):02d}:{rng.below(60):02d}"
    if r == 8:
        return f"{rng.below(1_000_000):,}"
    if r == 9:
        return f"0x{rng.below(1 << 16):04X}"
    if r == 10:
        return f"v{rng.below(5)}.{rng.below(20)}.{rng.below(10)}"
    return str(rng.below(10**9))


def _sentence(rng: _Rng, pseudo: tuple[str, ...]) -> str:
    words: list[str] = []
    n = 4 + rng.below(16)
    for _ in range(n):
        r = rng.below(100)
        if r < 52:
            w = rng.zipf(_ENGLISH)
        elif r < 80:
            w = rng.zipf(pseudo)
        elif r < 85:
            w = rng.choice(_CONTRACTIONS)
        elif r < 89:
            w = _number(rng)
        elif r < 92:
            w = rng.choice(_ACCENTED)
        elif r < 94:
            w = rng.choice(_EMOJI)
        elif r < 96:
            w = rng.choice(_SYMBOLS)
        else:
            w = rng.zipf(_ENGLISH).upper() if rng.chance(30) else rng.zipf(_ENGLISH).title()
        words.append(w)
        if rng.chance(7):
            words[-1] += ","
    words[0] = words[0][:1].upper() + words[0][1:]
    s = " ".join(words) + rng.choice(_PUNCT_END)
    if rng.chance(8):
        s = f'"{s}"'
    elif rng.chance(5):
        s = f"({s})"
    return s


def _prose(rng: _Rng, pseudo: tuple[str, ...]) -> str:
    sents = [_sentence(rng, pseudo) for _ in range(1 + rng.below(6))]
    return " ".join(sents)


def _cjk_text(rng: _Rng) -> str:
    parts: list[str] = []
    for _ in range(2 + rng.below(10)):
        r = rng.below(10)
        if r < 4:
            parts.append(rng.choice(_CJK_PHRASES))
        elif r < 8:
            parts.append(_cjk_word(rng))
        elif r < 9:
            parts.append(_number(rng))
        else:
            parts.append(rng.choice(_CJK_PUNCT))
    sep = "" if rng.chance(70) else " "
    return sep.join(parts) + rng.choice(_CJK_PUNCT[:4])


def _foreign_text(rng: _Rng) -> str:
    pool = _ACCENTED if rng.chance(70) else _OTHER_SCRIPTS
    words = [rng.choice(pool) for _ in range(3 + rng.below(10))]
    return " ".join(words) + rng.choice(_PUNCT_END)


def _code(rng: _Rng, pseudo: tuple[str, ...]) -> str:
    snippet = rng.choice(_CODE_SNIPPETS)
    a, b, c = (rng.zipf(pseudo) if rng.chance(50) else rng.zipf(_ENGLISH) for _ in range(3))
    if rng.chance(40):
        a = f"{a}_{b}"
    text = snippet.format(a=a, b=b, c=c, A=a.title().replace("_", ""), C=c.upper())
    if rng.chance(30):
        text = text.replace("    ", "\t")
    return text


def _data_line(rng: _Rng, pseudo: tuple[str, ...]) -> str:
    r = rng.below(5)
    if r == 0:
        return ",".join(_number(rng) for _ in range(2 + rng.below(6)))
    if r == 1:
        user = rng.zipf(pseudo)
        return f"{user}.{rng.zipf(_ENGLISH)}@example.{rng.choice(('com', 'org', 'net', 'io'))}"
    if r == 2:
        path = "/".join(rng.zipf(pseudo) for _ in range(1 + rng.below(4)))
        return f"https://www.{rng.zipf(_ENGLISH)}.com/{path}?id={rng.below(10000)}"
    if r == 3:
        ip = ".".join(str(rng.below(256)) for _ in range(4))
        return f'{ip}:{rng.below(65536)} - - [{_number(rng)}] "GET /{rng.zipf(pseudo)} HTTP/1.1"'
    return f"| {rng.zipf(_ENGLISH)} | {_number(rng)} | {rng.zipf(pseudo)} |"


def _whitespace_text(rng: _Rng, pseudo: tuple[str, ...]) -> str:
    out: list[str] = []
    for _ in range(2 + rng.below(6)):
        indent = rng.choice((" ", "  ", "    ", "        ", "\t", "\t\t", "   ", ""))
        words = [rng.zipf(_ENGLISH) for _ in range(1 + rng.below(5))]
        gap = rng.choice((" ", "  ", "   ", "\t", "     "))
        tail = rng.choice(("", "", " ", "  ", "\t"))
        out.append(indent + gap.join(words) + tail)
    return rng.choice(("\n", "\n\n", "\r\n", "\n\n\n")).join(out)


def _special_text(rng: _Rng, pseudo: tuple[str, ...]) -> str:
    a = rng.choice(_SPECIAL_LOOKALIKES)
    b = rng.choice(_SPECIAL_LOOKALIKES)
    return f"{a}{_sentence(rng, pseudo)}{b}"


def _document(rng: _Rng, pseudo: tuple[str, ...]) -> str:
    r = rng.below(100)
    if r < 46:
        return _prose(rng, pseudo)
    if r < 60:
        return _cjk_text(rng)
    if r < 68:
        return _foreign_text(rng)
    if r < 78:
        return _code(rng, pseudo)
    if r < 88:
        return _data_line(rng, pseudo)
    if r < 96:
        return _whitespace_text(rng, pseudo)
    return _special_text(rng, pseudo)


_CORPUS_SEED = 0x5052494D41  # "PRIMA"
_CORPUS_CHARS = 800_000


@functools.cache
def build_corpus() -> tuple[str, ...]:
    """The deterministic training corpus: a few thousand short documents."""
    rng = _Rng(_CORPUS_SEED)
    pseudo = _pseudo_words(rng, 30_000)
    docs: list[str] = []
    total = 0
    while total < _CORPUS_CHARS:
        d = _document(rng, pseudo)
        if rng.chance(35):
            d += rng.choice(("\n", "\n\n", " "))
        docs.append(d)
        total += len(d)
    return tuple(docs)
