"""What the conversation agent and the AI Task entity share: a chat log turned into a request
to the head's ``/v1/chat/completions``, streamed back into the chat log, tool calls and all.

Each conversation or AI Task subentry is one entity with its own device (a service under the
cluster hub). The request keeps what the head's prefix cache needs: the system prompt first and
as Home Assistant rendered it, the tools in a fixed order, and the subentry's own cache slot
(``prompt_cache_key``), so a new turn evaluates little more than the newest message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import probatio
from homeassistant.components import conversation
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import llm
from homeassistant.helpers.entity import Entity
from homeassistant.helpers.json import json_dumps

from .api import PrimaAuthError, PrimaConnectionError, PrimaError
from .attachments import read_attachments
from .const import (
    CONF_MAX_HISTORY,
    CONF_MAX_TOKENS,
    CONF_TEMPERATURE,
    CONF_THINK,
    CONF_TOP_P,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_THINK,
    DEFAULT_TOP_P,
    DOMAIN,
    LOGGER,
    MAX_TOOL_ITERATIONS,
)

if TYPE_CHECKING:
    from homeassistant.config_entries import ConfigSubentry

    from . import PrimaConfigEntry

#: the model field of every request: the head serves one model and does not check it
MODEL = "prima"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def llm_error(exc: PrimaError) -> HomeAssistantError:
    """What the user is told (spoken, in Assist) when the head cannot answer."""
    if isinstance(exc, PrimaAuthError):
        return HomeAssistantError(translation_domain=DOMAIN, translation_key="llm_auth")
    if isinstance(exc, PrimaConnectionError):
        return HomeAssistantError(translation_domain=DOMAIN, translation_key="llm_unreachable")
    return HomeAssistantError(translation_domain=DOMAIN, translation_key="llm_refused",
                              translation_placeholders={"message": str(exc)})


# -- requests ------------------------------------------------------------------------------------


def format_tool(tool: llm.Tool, custom_serializer: Callable[[Any], Any] | None
                ) -> dict[str, Any]:
    """One Home Assistant tool as an OpenAI function."""
    function: dict[str, Any] = {
        "name": tool.name,
        "parameters": probatio.to_openapi(tool.parameters, custom_serializer=custom_serializer,
                                          openapi_version="3.1.0"),
    }
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def response_format(name: str, structure: probatio.Schema,
                    custom_serializer: Callable[[Any], Any] | None) -> dict[str, Any]:
    """A structure as a JSON schema the head enforces while it generates."""
    schema = probatio.to_openapi(structure, custom_serializer=custom_serializer,
                                 openapi_version="3.1.0")
    return {"type": "json_schema",
            "json_schema": {"name": name, "strict": True, "schema": schema}}


def convert_content(content: conversation.Content, attached: str = "") -> dict[str, Any]:
    """One chat log entry as an OpenAI chat message; ``attached``: a user message's attachments
    as text (``read_attachments``), which must be read before."""
    if isinstance(content, conversation.SystemContent):
        return {"role": "system", "content": content.content}
    if isinstance(content, conversation.UserContent):
        if content.attachments and not attached:
            raise ValueError("a message with attachments needs them read (read_attachments)")
        text = f"{content.content}\n\n{attached}" if attached else content.content
        return {"role": "user", "content": text}
    if isinstance(content, conversation.AssistantContent):
        message: dict[str, Any] = {"role": "assistant", "content": content.content}
        calls = [c for c in content.tool_calls or () if not c.external]
        if calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.tool_name, "arguments": json_dumps(call.tool_args)}}
                for call in calls]
        elif content.content is None:
            message["content"] = ""  # only a message with calls may go without content
        if content.thinking_content:
            message["reasoning_content"] = content.thinking_content
        return message
    return {"role": "tool", "tool_call_id": content.tool_call_id, "name": content.tool_name,
            "content": json_dumps({"data": content.result.data, "error": content.result.error})}


def trim_history(messages: list[dict[str, Any]], max_history: int) -> list[dict[str, Any]]:
    """The system prompt, at most ``max_history`` earlier user turns, and the current turn.

    A turn is a user message and everything after it (answers, tool calls and results), so a
    cut never separates a tool call from its result.

    The cut moves in steps, not one turn per request: the head's prefix cache reuses what a
    request shares with the one before, and dropping the oldest turn on every request would
    change everything after the system prompt each time. Once more than ``max_history``
    earlier turns exist, the oldest are dropped down to ``max_history // 2``; the turns that
    follow only append, until the limit is passed again. The cut depends only on how many
    turns there are (no state to keep), so the requests of a conversation agree on where it is.
    """
    users = [i for i, m in enumerate(messages) if i > 0 and m["role"] == "user"]
    earlier = len(users) - 1  # the last user message opens the current turn
    if earlier <= max_history:
        return messages
    keep = max_history // 2  # earlier turns right after a cut
    step = max_history + 1 - keep  # turns dropped per cut (at least 1)
    dropped = -(-(earlier - max_history) // step) * step  # whole steps, enough to fit
    return [messages[0], *messages[users[dropped]:]]


# -- answers -------------------------------------------------------------------------------------


def _repair_value(value: Any) -> Any:
    """A string that holds a JSON array or object, as small models write them, decoded."""
    if isinstance(value, str) and ((value.startswith("[") and value.endswith("]"))
                                   or (value.startswith("{") and value.endswith("}"))):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def repair_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Tool arguments without empty values (they fail intent matching), nested JSON decoded."""
    return {k: _repair_value(v) for k, v in arguments.items() if v is not None and v != ""}


def _decode_arguments(text: str) -> dict[str, Any] | None:
    """A call's arguments once they are a whole JSON object; None while they are not."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class _PendingCall:
    """A tool call while its streamed pieces arrive."""

    id: str | None = None
    name: str = ""
    arguments: str = ""
    done: bool = False


@dataclass
class ThinkSplitter:
    """Splits the thinking at the start of an answer off into thinking content.

    The head passes the model's text on as it is; a reasoning model opens its answer with its
    thoughts, which must never be spoken. They come in one of two shapes:

    * ``<think>...</think>`` at the start of the answer;
    * only ``...</think>``: with thinking enabled, templates in DeepSeek-R1's style end the
      prompt with ``<think>\\n`` themselves. With ``implicit_open`` (thinking enabled), text up
      to the first ``</think>`` is thinking, and an answer that ends without one was plain
      content. Until it is known which, the text is held back (it cannot be taken back once
      spoken): the answer then streams from the end of the thinking on, and an answer without
      any (a model whose template ignores ``enable_thinking``) arrives whole at its end.
    """

    implicit_open: bool = False
    state: str = "start"  # start -> think | maybe -> after -> text, or start -> text
    buffer: str = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """The pieces of ``text`` as (``content`` or ``thinking_content``, text) pairs."""
        out: list[tuple[str, str]] = []
        self.buffer += text
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buffer = "think", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):
                return out  # not decided yet
            else:
                self.state = "maybe" if self.implicit_open else "text"
        if self.state == "maybe":
            end = self.buffer.find(THINK_CLOSE)
            if end < 0:
                return out  # thinking if a closing tag comes, content if none does
            if thinking := self.buffer[:end].strip():
                out.append(("thinking_content", thinking))
            self.state, self.buffer = "after", self.buffer[end + len(THINK_CLOSE):]
        if self.state == "think":
            end = self.buffer.find(THINK_CLOSE)
            if end < 0:
                # keep what could be the start of the closing tag
                keep = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1)
                             if self.buffer.endswith(THINK_CLOSE[:n])), 0)
                if len(self.buffer) > keep:
                    out.append(("thinking_content", self.buffer[:len(self.buffer) - keep]))
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            if end:
                out.append(("thinking_content", self.buffer[:end]))
            self.state, self.buffer = "after", self.buffer[end + len(THINK_CLOSE):]
        if self.state == "after":
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return out
            self.state = "text"
        if self.state == "text" and self.buffer:
            out.append(("content", self.buffer))
            self.buffer = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        """Whatever is still held back when the answer ends."""
        rest, self.buffer = self.buffer, ""
        if not rest:
            return []
        return [("thinking_content" if self.state == "think" else "content", rest)]


@dataclass
class RoundStats:
    """What the head said about one request besides the answer."""

    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None


def _tool_input(call: _PendingCall, arguments: dict[str, Any]) -> llm.ToolInput:
    args = repair_arguments(arguments)
    if call.id:
        return llm.ToolInput(id=call.id, tool_name=call.name, tool_args=args)
    return llm.ToolInput(tool_name=call.name, tool_args=args)


async def transform_stream(chunks: AsyncIterator[dict[str, Any]], stats: RoundStats,
                           tools_offered: bool = True, think: bool = False
                           ) -> AsyncGenerator[conversation.AssistantContentDeltaDict]:
    """The head's chat chunks as chat log deltas: one message per request.

    Tool calls are gathered from OpenAI's streamed pieces (the head sends each call whole, other
    servers in pieces) and handed on as soon as their arguments are a whole JSON object, so Home
    Assistant starts running them before the answer ends. Calls in an answer to a request
    without tools (the chat log could not run them) are left out. With ``think`` (thinking
    enabled) the thinking may come without its opening tag (``ThinkSplitter.implicit_open``).
    Reasoning the head already separated (``reasoning_content``: gpt-oss's analysis channel)
    is thinking content as it stands: never spoken.
    """
    started = False
    calls: dict[int, _PendingCall] = {}
    splitter = ThinkSplitter(implicit_open=think)
    async for chunk in chunks:
        if isinstance(chunk.get("usage"), dict):
            stats.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            stats.timings = chunk["timings"]
        choices = chunk.get("choices") or []
        if not choices:
            continue
        if not started:
            started = True
            yield {"role": "assistant"}
        choice = choices[0]
        delta = choice.get("delta") or {}
        if reasoning := delta.get("reasoning_content"):  # a harmony model's analysis channel
            yield {"thinking_content": reasoning}
        if content := delta.get("content"):
            for key, text in splitter.feed(content):
                yield {"content": text} if key == "content" else {"thinking_content": text}
        pieces = delta.get("tool_calls") or []
        if pieces and not tools_offered:
            LOGGER.warning("the model called a tool, but none was offered: %s", pieces)
            pieces = []
        for position, piece in enumerate(pieces):
            call = calls.setdefault(int(piece.get("index", position)), _PendingCall())
            function = piece.get("function") or {}
            call.id = call.id or piece.get("id")
            call.name = call.name or function.get("name") or ""
            call.arguments += function.get("arguments") or ""
            if not call.done and (arguments := _decode_arguments(call.arguments)) is not None:
                call.done = True
                yield {"tool_calls": [_tool_input(call, arguments)]}
        if choice.get("finish_reason"):
            stats.finish_reason = choice["finish_reason"]
    for key, text in splitter.flush():
        yield {"content": text} if key == "content" else {"thinking_content": text}
    for call in calls.values():
        if call.done:
            continue
        if not call.arguments.strip():  # a function without parameters
            yield {"tool_calls": [_tool_input(call, {})]}
            continue
        raise HomeAssistantError(
            translation_domain=DOMAIN, translation_key="bad_tool_call",
            translation_placeholders={"tool": call.name,
                                      "reason": str(stats.finish_reason or "malformed")})


# -- the entity ----------------------------------------------------------------------------------


class PrimaLLMBaseEntity(Entity):
    """A conversation or AI Task subentry: its device and its requests to the head."""

    _attr_has_entity_name = True
    _attr_name = None

    def __init__(self, entry: PrimaConfigEntry, subentry: ConfigSubentry) -> None:
        self.entry = entry
        self.subentry = subentry
        self._warned_no_tools = False  # said once that the model cannot use its tools
        self._attr_unique_id = subentry.subentry_id
        coordinator = entry.runtime_data.coordinator
        model = coordinator.data.get("model")
        self._attr_device_info = dr.DeviceInfo(
            identifiers={(DOMAIN, subentry.subentry_id)},
            name=subentry.title,
            manufacturer="Prima Home Cluster",
            model=str(model.get("id") or "language model") if isinstance(model, dict)
            else "language model",
            entry_type=dr.DeviceEntryType.SERVICE,
            via_device_id=coordinator.hub_device_id,  # registered at setup
        )

    @property
    def available(self) -> bool:
        """Unavailable while the head does not answer: an assistant that would only say
        "cannot reach the cluster" is shown as such."""
        return self.entry.runtime_data.coordinator.last_update_success

    async def async_added_to_hass(self) -> None:
        await super().async_added_to_hass()
        # the coordinator's updates carry availability: write the state when they come
        self.async_on_remove(self.entry.runtime_data.coordinator.async_add_listener(
            self.async_write_ha_state))

    def _payload(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """A request with the subentry's sampling settings."""
        data = self.subentry.data
        return {
            "model": MODEL,
            "messages": messages,
            "temperature": float(data.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE)),
            "top_p": float(data.get(CONF_TOP_P, DEFAULT_TOP_P)),
            "max_tokens": int(data.get(CONF_MAX_TOKENS, DEFAULT_MAX_TOKENS)),
            # the head accepts llama.cpp's chat_template_kwargs (docs/api.md, request
            # fields): a reasoning model's template reads enable_thinking (Qwen 3) or
            # reasoning_effort (gpt-oss, which always reasons: the least of it when thinking
            # is off, so that a voice answer comes soon); others ignore both
            "chat_template_kwargs": {"enable_thinking": self._think,
                                     "reasoning_effort": "medium" if self._think else "low"},
            # this agent's own cache slot, as docs/api.md advises for Home Assistant
            "prompt_cache_key": self.subentry.subentry_id,
            "stream_options": {"include_usage": True},
        }

    @property
    def _think(self) -> bool:
        """Whether the subentry asks the model to think first."""
        return bool(self.subentry.data.get(CONF_THINK, DEFAULT_THINK))

    async def _attachments(self, chat_log: conversation.ChatLog) -> dict[int, str]:
        """The chat log's attachments as text, by the id of the message that carries them:
        read once per answer (in the executor), not again in every round of tool calls."""
        attached = {}
        for content in chat_log.content:
            if isinstance(content, conversation.UserContent) and content.attachments:
                attached[id(content)] = await self.hass.async_add_executor_job(
                    read_attachments, content.attachments)
        return attached

    def _messages(self, chat_log: conversation.ChatLog, attached: dict[int, str]
                  ) -> list[dict[str, Any]]:
        messages = [convert_content(content, attached.get(id(content), ""))
                    for content in chat_log.content]
        max_history = int(self.subentry.data.get(CONF_MAX_HISTORY, DEFAULT_MAX_HISTORY))
        return trim_history(messages, max(max_history, 0))

    async def _async_handle_chat_log(self, chat_log: conversation.ChatLog,
                                     structure: probatio.Schema | None = None,
                                     structure_name: str = "result") -> RoundStats:
        """Answer the chat log: stream the head's answer into it, running tools in between.

        Returns what the head said about the last request (why it stopped, its timings).
        """
        client = self.entry.runtime_data.client
        serializer = chat_log.llm_api.custom_serializer if chat_log.llm_api else None
        tools = [format_tool(tool, serializer) for tool in chat_log.llm_api.tools
                 ] if chat_log.llm_api else []
        fmt = response_format(structure_name, structure, serializer or llm.selector_serializer
                              ) if structure is not None else None
        if tools and not self._warned_no_tools and self.entry.runtime_data.coordinator.data.get(
                "model", {}).get("can_call_tools") is False:
            self._warned_no_tools = True
            LOGGER.warning("%s: the served model cannot call tools (its chat template has no "
                           "tool-call syntax), so it cannot act through %s; the head tells it "
                           "so. Remove \"Control Home Assistant\" from the agent or serve a "
                           "model with tool calls", self.entity_id, chat_log.llm_api.api.name
                           if chat_log.llm_api else "the selected APIs")
        stats = RoundStats()
        attached = await self._attachments(chat_log)
        for _iteration in range(MAX_TOOL_ITERATIONS):
            payload = self._payload(self._messages(chat_log, attached))
            if tools:
                payload["tools"] = tools
            if fmt is not None:
                payload["response_format"] = fmt
            stats = RoundStats()
            try:
                async for _content in chat_log.async_add_delta_content_stream(
                        self.entity_id,
                        transform_stream(client.chat_stream(payload), stats, bool(tools),
                                         self._think)):
                    pass
            except PrimaError as exc:
                # raised, not logged: the user gets the message; the coordinator logs the
                # head's absence once
                LOGGER.debug("%s: the head could not answer: %s", self.entity_id, exc)
                raise llm_error(exc) from exc
            chat_log.async_trace({"stats": {"finish_reason": stats.finish_reason,
                                            "usage": stats.usage, "timings": stats.timings}})
            if not chat_log.unresponded_tool_results:
                break
        return stats
