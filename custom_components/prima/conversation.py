"""Assist's conversation agent: one per conversation subentry, answered by the cluster's model.

Answers stream (Assist speaks them while they are generated), tools of the selected LLM APIs
run between rounds, and while the user is still speaking ``async_prepare`` puts the agent's
system prompt into the head's prefix cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, override

from homeassistant.components import conversation
from homeassistant.components.conversation.models import AbstractConversationAgent
from homeassistant.const import MATCH_ALL
from homeassistant.exceptions import HomeAssistantError, TemplateError
from homeassistant.helpers import llm, template

from .api import PrimaError
from .const import CONF_LLM_HASS_API, CONF_PROMPT, DOMAIN, LOGGER
from .llm_entity import PrimaLLMBaseEntity, format_tool

if TYPE_CHECKING:
    from homeassistant.config_entries import ConfigSubentry
    from homeassistant.core import HomeAssistant
    from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

    from . import PrimaConfigEntry

PARALLEL_UPDATES = 0


async def async_setup_entry(hass: HomeAssistant, entry: PrimaConfigEntry,
                            async_add_entities: AddConfigEntryEntitiesCallback) -> None:
    """One agent per conversation subentry."""
    for subentry in entry.subentries.values():
        if subentry.subentry_type == "conversation":
            async_add_entities([PrimaConversationEntity(entry, subentry)],
                               config_subentry_id=subentry.subentry_id)


class PrimaConversationEntity(conversation.ConversationEntity, AbstractConversationAgent,
                              PrimaLLMBaseEntity):
    """A conversation agent answered by the cluster."""

    _attr_supports_streaming = True

    def __init__(self, entry: PrimaConfigEntry, subentry: ConfigSubentry) -> None:
        super().__init__(entry, subentry)
        if self.subentry.data.get(CONF_LLM_HASS_API):
            self._attr_supported_features = conversation.ConversationEntityFeature.CONTROL

    @property
    @override
    def supported_languages(self) -> list[str] | Literal["*"]:
        return MATCH_ALL

    @override
    async def _async_handle_message(self, user_input: conversation.ConversationInput,
                                    chat_log: conversation.ChatLog
                                    ) -> conversation.ConversationResult:
        data = self.subentry.data
        try:
            await chat_log.async_provide_llm_data(
                user_input.as_llm_context(DOMAIN), data.get(CONF_LLM_HASS_API) or None,
                data.get(CONF_PROMPT), user_input.extra_system_prompt)
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        await self._async_handle_chat_log(chat_log)
        return conversation.async_get_result_from_chat_log(user_input, chat_log)

    @override
    async def async_prepare(self, language: str | None = None) -> None:
        """Prefill the system prompt (and tools) while the user speaks.

        Assist calls this when speech-to-text starts. The prompt is rendered as the chat log
        renders it (instructions template, the APIs' prompt, the time unless a GetDateTime tool
        is there) without the parts only the request knows (the user's name, the satellite's
        area, an extra prompt), and sent with an empty user turn and ``max_tokens`` 1 to this
        agent's cache slot: the real request then evaluates only what differs from there on.
        """
        try:
            messages, tools = await self._rendered_prompt(language)
        except (HomeAssistantError, TemplateError) as exc:
            LOGGER.debug("%s: no prompt to prefill: %s", self.entity_id, exc)
            return
        payload = self._payload(messages)
        payload["max_tokens"] = 1
        del payload["stream_options"]
        if tools:
            payload["tools"] = tools
        try:
            await self.entry.runtime_data.client.chat(payload)
        except PrimaError as exc:
            LOGGER.debug("%s: prefilling the prompt failed: %s", self.entity_id, exc)

    async def _rendered_prompt(self, language: str | None
                               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        data = self.subentry.data
        llm_context = llm.LLMContext(platform=DOMAIN, context=None, language=language,
                                     assistant=conversation.DOMAIN, device_id=None)
        api: llm.APIInstance | None = None
        if api_ids := data.get(CONF_LLM_HASS_API):
            api = await llm.async_get_api(self.hass, api_ids, llm_context)
        variables = {"ha_name": self.hass.config.location_name, "user_name": None,
                     "llm_context": llm_context}
        parts = [template.Template(data.get(CONF_PROMPT) or llm.DEFAULT_INSTRUCTIONS_PROMPT,
                                   self.hass).async_render(variables, parse_result=False)]
        if api is not None:
            parts.append(api.api_prompt)
        if not any(tool.name.endswith("GetDateTime") for tool in (api.tools if api else ())):
            parts.append(template.Template(llm.DATE_TIME_PROMPT, self.hass).async_render(
                variables, parse_result=False))
        tools = [format_tool(tool, api.custom_serializer) for tool in api.tools] if api else []
        return [{"role": "system", "content": "\n".join(parts)},
                {"role": "user", "content": ""}], tools
