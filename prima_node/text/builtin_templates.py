"""Chat templates for GGUF files that carry none, one per model family.

Each follows the documented prompt format of its family, so that a model whose file lost its
``tokenizer.chat_template`` still sees the turn markers it was trained on:

``llama3``
    Llama 3.x Instruct: ``<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>`` after
    ``bos_token``. Tools go into the system turn (``Environment: ipython``, the function schemas
    as indented JSON) and the model answers with ``{"name": ..., "parameters": {...}}``; tool
    results come back in ``ipython`` turns. This is the layout llama.cpp asks of Llama 3.1
    (``tools_in_user_message = false``).
``chatml``
    ChatML (``<|im_start|>role\\n ... <|im_end|>\\n``) with the Hermes / Qwen 2.5 tool
    convention: function schemas in ``<tools></tools>`` in the system turn, calls as
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, results as
    ``<tool_response>`` blocks in a user turn. ChatML is also llama.cpp's default when a file
    has no template and no family is recognised.
``llama2``
    Llama 2 chat: ``bos_token [INST] user [/INST] answer eos_token`` per exchange, the system
    prompt in ``<<SYS>>`` inside the first user turn. The format has no tool syntax: tool
    messages are refused with ``raise_exception`` rather than rendered in a form the model never
    saw, and so are assistant tool calls.

``gemma``
    Gemma (2, 3): ``bos_token`` then ``<start_of_turn>user\n ... <end_of_turn>\n`` and
    ``<start_of_turn>model\n ... <end_of_turn>\n`` turns, the system prompt at the head of the
    first user turn (Gemma has no system role). No tool syntax: tool messages and calls are
    refused, as for ``llama2``.

``harmony``
    gpt-oss's harmony format: a system message (model identity, knowledge cutoff, today's date,
    ``Reasoning: low|medium|high`` from the ``reasoning_effort`` argument, the valid channels),
    then a developer message with the instructions (the request's system prompt) and the tools
    as a TypeScript ``namespace functions``; turns are
    ``<|start|>role<|message|>...<|end|>``. The model answers in channels: ``analysis`` (its
    reasoning), ``final`` (the answer) and ``commentary`` with ``to=functions.NAME`` for a
    call, whose arguments are the message (JSON). Earlier calls come back as such messages
    ending in ``<|call|>``, their results as ``<|start|>functions.NAME to=assistant`` messages;
    an earlier turn's reasoning is dropped unless the model is still working on the last user
    message (between its calls), as OpenAI's renderer does.

The sources use the Hugging Face conventions (``bos_token``, ``eos_token``, ``tools``,
``add_generation_prompt``, ``raise_exception``, ``strftime_now``, ``tojson`` with ``indent``)
so they render identically under transformers' own renderer.
"""

from __future__ import annotations

__all__ = ["BUILTIN_TEMPLATES", "CHATML", "GEMMA", "HARMONY", "LLAMA2", "LLAMA3"]

# Assistant tool calls accept both the OpenAI shape ({"function": {...}}) and a bare
# {"name", "arguments"} dict, as the Hugging Face templates of these families do.

LLAMA3 = r"""{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = none %}
{%- endif %}
{%- if tools or system_message is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
    {%- if tools %}
        {{- 'Environment: ipython\n' }}
        {{- 'Cutting Knowledge Date: December 2023\n' }}
        {%- if date_string is defined %}
            {{- 'Today Date: ' + date_string + '\n\n' }}
        {%- else %}
            {{- 'Today Date: ' + strftime_now('%d %b %Y') + '\n\n' }}
        {%- endif %}
        {{- 'You have access to the following functions. To call a function, respond with JSON for a function call. ' }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. ' }}
        {{- 'Do not use variables.\n\n' }}
        {%- for tool in tools %}
            {{- tool | tojson(indent=4) }}
            {{- '\n\n' }}
        {%- endfor %}
    {%- endif %}
    {%- if system_message is string %}
        {{- system_message | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' and message['tool_calls'] %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- for tool_call in message['tool_calls'] %}
            {%- if tool_call['function'] is defined %}
                {%- set tool_call = tool_call['function'] %}
            {%- endif %}
            {%- if not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '{"name": ' + tool_call['name'] | tojson + ', "parameters": ' + tool_call['arguments'] | tojson + '}' }}
        {%- endfor %}
        {{- '<|eot_id|>' }}
    {%- elif message['role'] == 'tool' or message['role'] == 'ipython' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {{- message['content'] | tojson }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] | trim }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501

CHATML = r"""{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if system_message is string and system_message %}
        {{- system_message + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n' }}
    {{- '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif system_message is string %}
    {{- '<|im_start|>system\n' + system_message + '<|im_end|>\n' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['content'] is string %}
        {%- set content = message['content'] %}
    {%- elif message['content'] is none or message['content'] is not defined %}
        {%- set content = '' %}
    {%- else %}
        {%- set content = message['content'] | tojson %}
    {%- endif %}
    {%- if message['role'] == 'tool' %}
        {%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
        {{- '<|im_start|>assistant' }}
        {%- if content %}
            {{- '\n' + content }}
        {%- endif %}
        {%- for tool_call in message['tool_calls'] %}
            {%- if tool_call['function'] is defined %}
                {%- set tool_call = tool_call['function'] %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": ' + tool_call['name'] | tojson + ', "arguments": ' + tool_call['arguments'] | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

LLAMA2 = r"""{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] != 'user' and message['role'] != 'assistant' %}
        {{- raise_exception('The Llama 2 [INST] chat format has no place for "' + message['role'] + '" messages: send one optional system message, then alternating user and assistant messages') }}
    {%- endif %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['tool_calls'] %}
        {{- raise_exception('The Llama 2 [INST] chat format has no tool-call syntax: this model cannot be given tool calls') }}
    {%- endif %}
    {%- if message['content'] is string %}
        {%- set content = message['content'] %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if loop.first and system_message is string %}
        {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + content %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}
    {%- else %}
        {{- ' ' + content | trim + ' ' + eos_token }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

GEMMA = r"""{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] != 'user' and message['role'] != 'assistant' %}
        {{- raise_exception('The Gemma chat format has no place for "' + message['role'] + '" messages: send one optional system message, then user and assistant messages') }}
    {%- endif %}
    {%- if message['tool_calls'] %}
        {{- raise_exception('The Gemma chat format has no tool-call syntax: this model cannot be given tool calls') }}
    {%- endif %}
    {%- if message['content'] is string %}
        {%- set content = message['content'] %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else 'user' %}
    {{- '<start_of_turn>' + role + '\n' }}
    {%- if loop.first %}
        {{- system_prefix }}
    {%- endif %}
    {{- content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""  # noqa: E501

HARMONY = r"""{%- macro ts_type(schema) -%}
    {%- if schema['enum'] is defined -%}
        {{- schema['enum'] | map('tojson') | join(' | ') -}}
    {%- elif schema['type'] == 'string' -%}string
    {%- elif schema['type'] in ['number', 'integer'] -%}number
    {%- elif schema['type'] == 'boolean' -%}boolean
    {%- elif schema['type'] == 'array' -%}
        {{- (ts_type(schema['items']) if schema['items'] is defined else 'any') + '[]' -}}
    {%- elif schema['type'] == 'object' -%}object
    {%- else -%}any
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] in ['system', 'developer'] %}
    {%- set instructions = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set instructions = none %}
{%- endif %}
{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
' }}
{{- 'Knowledge cutoff: 2024-06
Current date: ' + strftime_now('%Y-%m-%d') + '

' }}
{{- 'Reasoning: ' + (reasoning_effort if reasoning_effort is defined else 'medium') + '

' }}
{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' }}
{%- if tools %}
    {{- "
Calls to these tools must go to the commentary channel: 'functions'." }}
{%- endif %}
{{- '<|end|>' }}
{%- if instructions or tools %}
    {{- '<|start|>developer<|message|>' }}
    {%- if instructions %}
        {{- '# Instructions

' + instructions }}
    {%- endif %}
    {%- if tools %}
        {{- '

' if instructions else '' }}
        {{- '# Tools

## functions

namespace functions {

' }}
        {%- for tool in tools %}
            {%- set f = tool['function'] if tool['function'] is defined else tool %}
            {%- if f['description'] %}
                {{- '// ' + f['description'] + '
' }}
            {%- endif %}
            {%- set params = f['parameters'] if f['parameters'] is defined else {} %}
            {%- if params['properties'] %}
                {{- 'type ' + f['name'] + ' = (_: {
' }}
                {%- for name, prop in params['properties'] | items %}
                    {%- if prop['description'] %}
                        {{- '// ' + prop['description'] + '
' }}
                    {%- endif %}
                    {%- set optional = '' if name in (params['required'] or []) else '?' %}
                    {{- name + optional + ': ' + ts_type(prop) + ',
' }}
                {%- endfor %}
                {{- '}) => any;

' }}
            {%- else %}
                {{- 'type ' + f['name'] + ' = () => any;

' }}
            {%- endif %}
        {%- endfor %}
        {{- '} // namespace functions' }}
    {%- endif %}
    {{- '<|end|>' }}
{%- endif %}
{%- set ns = namespace(last_user=-1, tool='') %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message['content'] if message['content'] is string else '' %}
    {%- if message['role'] == 'user' %}
        {{- '<|start|>user<|message|>' + content + '<|end|>' }}
    {%- elif message['role'] == 'assistant' %}
        {%- set thinking = message['thinking'] if message['thinking'] is string else '' %}
        {%- if thinking and loop.index0 > ns.last_user %}
            {{- '<|start|>assistant<|channel|>analysis<|message|>' + thinking + '<|end|>' }}
        {%- endif %}
        {%- if content %}
            {{- '<|start|>assistant<|channel|>final<|message|>' + content + '<|end|>' }}
        {%- endif %}
        {%- for call in message['tool_calls'] or [] %}
            {%- set fn = call['function'] if call['function'] is defined else call %}
            {%- set ns.tool = fn['name'] %}
            {%- set args = fn['arguments'] %}
            {{- '<|start|>assistant<|channel|>commentary to=functions.' + fn['name'] }}
            {{- ' <|constrain|>json<|message|>' }}
            {{- (args if args is string else args | tojson) + '<|call|>' }}
        {%- endfor %}
    {%- elif message['role'] == 'tool' %}
        {%- set name = message['name'] if message['name'] is string else ns.tool %}
        {{- '<|start|>functions.' + name + ' to=assistant<|channel|>commentary<|message|>' }}
        {{- content + '<|end|>' }}
    {%- else %}
        {{- raise_exception('harmony has no role ' + message['role'] | tojson) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start|>assistant' }}
{%- endif %}
"""

#: Built-in template sources by short name (``ChatTemplate.name`` is ``"builtin:" + name``).
BUILTIN_TEMPLATES: dict[str, str] = {"llama3": LLAMA3, "chatml": CHATML, "llama2": LLAMA2,
                                     "gemma": GEMMA, "harmony": HARMONY}
