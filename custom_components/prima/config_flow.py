"""Setting up a Prima cluster in Home Assistant: by hand, from mDNS, or from the add-on.

A config entry is one cluster, reached through its head node's HTTP API; its unique id is the
head's ``cluster_id`` (the head's node id), so a head found again under another address or
port updates the entry instead of adding a second one. Workers have no API of their own and
are never offered. Each entry holds subentries: conversation agents (Assist) and AI Task
entities, each with its own sampling options.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv6Address, ip_address
from typing import Any

import probatio as vol
import yarl
from homeassistant.config_entries import (
    SOURCE_HASSIO,
    SOURCE_RECONFIGURE,
    ConfigEntry,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    ConfigSubentryData,
    ConfigSubentryFlow,
    SubentryFlowResult,
)
from homeassistant.const import CONF_NAME
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import llm
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.selector import (
    BooleanSelector,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    TemplateSelector,
    TextSelector,
    TextSelectorConfig,
    TextSelectorType,
)
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo

from .api import (
    PrimaAuthError,
    PrimaClient,
    PrimaConnectionError,
    PrimaResponseError,
    normalize_url,
)
from .const import (
    CONF_API_KEY,
    CONF_LLM_HASS_API,
    CONF_MAX_HISTORY,
    CONF_MAX_TOKENS,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    CONF_THINK,
    CONF_TOP_P,
    CONF_URL,
    DEFAULT_AI_TASK_NAME,
    DEFAULT_CONVERSATION_NAME,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_THINK,
    DEFAULT_TOP_P,
    DOMAIN,
    LOGGER,
)

SUBENTRY_CONVERSATION = "conversation"
SUBENTRY_AI_TASK = "ai_task_data"

#: the TXT layout this integration reads (prima_node.cluster.discovery)
TXT_VERSION = "1"
#: a node's role in its TXT record that has no API of its own
ROLE_WORKER = "worker"

RECOMMENDED_AI_TASK_OPTIONS: dict[str, Any] = {
    CONF_TEMPERATURE: DEFAULT_TEMPERATURE,
    CONF_TOP_P: DEFAULT_TOP_P,
    CONF_MAX_TOKENS: DEFAULT_MAX_TOKENS,
    CONF_THINK: DEFAULT_THINK,
}
RECOMMENDED_CONVERSATION_OPTIONS: dict[str, Any] = {
    CONF_PROMPT: llm.DEFAULT_INSTRUCTIONS_PROMPT,
    CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
    **RECOMMENDED_AI_TASK_OPTIONS,
    CONF_MAX_HISTORY: DEFAULT_MAX_HISTORY,
}

AUTH_ERRORS = ("invalid_auth", "missing_auth")
_API_KEY_SELECTOR = TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD))


def _connection_schema(url: str | None = None, api_key: str | None = None) -> vol.Schema:
    """The head's address and key, prefilled with what is known."""
    return vol.Schema({
        vol.Required(CONF_URL, description={"suggested_value": url}): TextSelector(
            TextSelectorConfig(type=TextSelectorType.URL)),
        vol.Optional(CONF_API_KEY, description={"suggested_value": api_key}):
            _API_KEY_SELECTOR,
    })


def _key_schema(required: bool) -> vol.Schema:
    marker = vol.Required if required else vol.Optional
    return vol.Schema({marker(CONF_API_KEY): _API_KEY_SELECTOR})


def _clean_key(user_input: Mapping[str, Any]) -> str | None:
    key = str(user_input.get(CONF_API_KEY) or "").strip()
    return key or None


def _valid_url(url: str) -> bool:
    try:
        parsed = yarl.URL(url)
    except ValueError:
        return False
    host = parsed.host or ""
    return parsed.scheme in ("http", "https") and bool(host) and not any(
        c.isspace() for c in host)


def _host_url(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 literal in brackets."""
    try:
        IPv6Address(host)
    except ValueError:
        return f"http://{host}:{port}"
    return f"http://[{host}]:{port}"


def _is_ip(host: str | None) -> bool:
    try:
        ip_address(host or "")
    except ValueError:
        return False
    return True


def _rediscovered_url(stored: str, host: str, port: int) -> str:
    """The URL an entry keeps when mDNS finds its head at ``host:port``.

    Plain HTTP to an IP address (what discovery itself stores) follows the node. A URL the user
    chose (HTTPS, or a host name) keeps its scheme and host, since the announced address may
    not serve a certificate's name or survive a DHCP lease; only a port it names follows the
    node's. One without a port reaches the node through something else (a proxy): kept as is.
    """
    try:
        url = yarl.URL(normalize_url(stored))
    except ValueError:
        return _host_url(host, port)
    if not url.host or (url.scheme == "http" and _is_ip(url.host)):
        return _host_url(host, port)
    if url.explicit_port is not None and url.explicit_port != port:
        return str(url.with_port(port))
    return stored


def _cluster_id(doc: Mapping[str, Any]) -> str:
    return str(doc.get("cluster_id") or doc["node_id"])


def _model_id(doc: Mapping[str, Any]) -> str | None:
    model = doc.get("model")
    if isinstance(model, dict) and isinstance(model.get("id"), str) and model["id"]:
        return str(model["id"])
    return None


def _title(doc: Mapping[str, Any]) -> str:
    model = _model_id(doc)
    return f"Prima cluster ({model})" if model else "Prima cluster"


def conversation_defaults(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new agent's options: Assist on, as in the default agent, where the model can use it
    (a model that cannot call tools would only be offered tools it cannot use)."""
    if tool_support(doc) is False:
        return {**RECOMMENDED_CONVERSATION_OPTIONS, CONF_LLM_HASS_API: []}
    return dict(RECOMMENDED_CONVERSATION_OPTIONS)


def default_subentries(doc: Mapping[str, Any] | None) -> list[ConfigSubentryData]:
    """What a new cluster starts with: one agent and one AI Task entity."""
    return [
        ConfigSubentryData(subentry_type=SUBENTRY_CONVERSATION,
                           data=conversation_defaults(doc),
                           title=DEFAULT_CONVERSATION_NAME, unique_id=None),
        ConfigSubentryData(subentry_type=SUBENTRY_AI_TASK,
                           data=dict(RECOMMENDED_AI_TASK_OPTIONS),
                           title=DEFAULT_AI_TASK_NAME, unique_id=None),
    ]


class PrimaConfigFlow(ConfigFlow, domain=DOMAIN):
    """One config entry per cluster, keyed by the head's cluster id."""

    VERSION = 1

    def __init__(self) -> None:
        self._url: str | None = None
        self._api_key: str | None = None
        self._doc: dict[str, Any] | None = None
        self._needs_key = False  # the discovered head refused to answer without a key
        self._name: str | None = None

    # -- talking to the head --------------------------------------------------------------------

    async def _async_reach(self, user_input: dict[str, Any], errors: dict[str, str]
                           ) -> tuple[str, str | None, dict[str, Any] | None]:
        """The URL and key a form gave, and the head's status if it answers them (``errors``
        says why not otherwise)."""
        url = normalize_url(str(user_input[CONF_URL]))
        api_key = _clean_key(user_input)
        if not _valid_url(url):
            errors[CONF_URL] = "invalid_url"
            return url, api_key, None
        doc, error = await self._async_probe(url, api_key)
        if doc is None:
            errors["base"] = error or "unknown"
        return url, api_key, doc

    async def _async_probe(self, url: str, api_key: str | None
                           ) -> tuple[dict[str, Any] | None, str | None]:
        """The head's status document, or the error key for the form."""
        client = PrimaClient(async_get_clientsession(self.hass), url, api_key)
        try:
            return await client.status(), None
        except PrimaAuthError:
            # the head tells "no key" from "a wrong key"; so does the form
            return None, "invalid_auth" if api_key else "missing_auth"
        except PrimaConnectionError as exc:
            LOGGER.debug("cannot connect to %s: %s", url, exc)
            return None, "cannot_connect"
        except PrimaResponseError as exc:
            LOGGER.debug("%s is not a Prima head: %s", url, exc)
            return None, "not_prima"
        except Exception:
            LOGGER.exception("unexpected error talking to %s", url)
            return None, "unknown"

    def _abort_if_configured(self, updates: dict[str, Any]) -> None:
        """Abort when this cluster has an entry, after giving it ``updates``.

        An entry that is loaded reloads through its own update listener when its data change;
        one without a listener (not set up, or waiting to retry) is reloaded here.
        """
        entry = self.hass.config_entries.async_entry_for_domain_unique_id(
            DOMAIN, self.unique_id) if self.unique_id else None
        self._abort_if_unique_id_configured(
            updates=updates, reload_on_update=entry is None or not entry.update_listeners)

    def _create(self) -> ConfigFlowResult:
        assert self._url is not None and self._doc is not None
        return self.async_create_entry(
            title=_title(self._doc), data={CONF_URL: self._url, CONF_API_KEY: self._api_key},
            subentries=default_subentries(self._doc))

    def _update_and_abort(self, entry: ConfigEntry, data: dict[str, Any]) -> ConfigFlowResult:
        """Store new connection data and set the entry up again with them.

        A loaded entry reloads through its update listener when its data change. Unchanged
        data fire no listener, yet a reload is still due: after the head refused the key at
        runtime the coordinator has stopped polling, and the same key, accepted again, is all
        a reauth brings.
        """
        if not entry.update_listeners:
            return self.async_update_reload_and_abort(entry, data_updates=data)
        if all(entry.data.get(key) == value for key, value in data.items()):
            self.hass.config_entries.async_schedule_reload(entry.entry_id)
        return self.async_update_and_abort(entry, data_updates=data)

    # -- by hand --------------------------------------------------------------------------------

    async def async_step_user(self, user_input: dict[str, Any] | None = None
                              ) -> ConfigFlowResult:
        errors: dict[str, str] = {}
        if user_input is not None:
            url, api_key, doc = await self._async_reach(user_input, errors)
            if doc is not None:
                await self.async_set_unique_id(_cluster_id(doc))
                self._abort_if_configured({CONF_URL: url, CONF_API_KEY: api_key})
                self._url, self._api_key, self._doc = url, api_key, doc
                return self._create()
        return self.async_show_form(
            step_id="user", errors=errors,
            data_schema=_connection_schema(
                user_input.get(CONF_URL) if user_input else None,
                user_input.get(CONF_API_KEY) if user_input else None))

    # -- mDNS -----------------------------------------------------------------------------------

    async def async_step_zeroconf(self, discovery_info: ZeroconfServiceInfo
                                  ) -> ConfigFlowResult:
        props = {str(k).lower(): v for k, v in discovery_info.properties.items()}
        node_id = props.get("id")
        if props.get("txtvers") != TXT_VERSION or not isinstance(node_id, str) or not node_id:
            return self.async_abort(reason="invalid_discovery_info")
        if props.get("role") == ROLE_WORKER:
            return self.async_abort(reason="not_head")
        api = props.get("api")
        port = int(api) if isinstance(api, str) and api.isdecimal() else discovery_info.port
        if port is None:
            return self.async_abort(reason="invalid_discovery_info")
        url = _host_url(discovery_info.host, port)

        existing = await self.async_set_unique_id(node_id)
        if existing is not None:
            if existing.source == SOURCE_HASSIO:
                # the Supervisor keeps the add-on's address current: mDNS must not flip it
                self._abort_if_unique_id_configured()
            self._abort_if_configured({CONF_URL: _rediscovered_url(
                str(existing.data.get(CONF_URL) or ""), discovery_info.host, port)})

        doc, error = await self._async_probe(url, None)
        if error in AUTH_ERRORS:
            self._needs_key = True
        elif doc is None:
            return self.async_abort(reason=error or "unknown")
        self._url, self._doc = url, doc
        self._name = str(props.get("name") or node_id)
        model = str(props.get("model") or (_model_id(doc) if doc else None) or "")
        self.context["title_placeholders"] = {"name": self._name, "model": model}
        return await self.async_step_zeroconf_confirm()

    async def async_step_zeroconf_confirm(self, user_input: dict[str, Any] | None = None
                                          ) -> ConfigFlowResult:
        assert self._url is not None
        errors: dict[str, str] = {}
        if user_input is not None:
            await self._confirm_key(user_input, errors)
            if not errors:
                return self._create()
        placeholders = dict(self.context.get("title_placeholders") or {})
        placeholders["url"] = self._url
        return self._confirm_form("zeroconf_confirm", errors, placeholders)

    async def _confirm_key(self, user_input: dict[str, Any], errors: dict[str, str]
                           ) -> dict[str, Any] | None:
        """A discovered head's confirm step: test the key asked for, if one was; the head's
        status when it answered it (errors filled otherwise)."""
        if not self._needs_key:
            return None
        self._api_key = _clean_key(user_input)
        assert self._url is not None
        doc, error = await self._async_probe(self._url, self._api_key)
        if doc is None:
            errors["base"] = error or "unknown"
            return None
        self._doc = doc
        return doc

    def _confirm_form(self, step_id: str, errors: dict[str, str],
                      placeholders: dict[str, str]) -> ConfigFlowResult:
        """The confirm form: a plain confirmation, or the API key field when the head asks."""
        if not self._needs_key:
            self._set_confirm_only()
        return self.async_show_form(
            step_id=step_id, errors=errors,
            data_schema=_key_schema(required=True) if self._needs_key else None,
            description_placeholders=placeholders)

    # -- the add-on, through the Supervisor ---------------------------------------------------

    async def async_step_hassio(self, discovery_info: HassioServiceInfo) -> ConfigFlowResult:
        config = discovery_info.config
        try:
            url = _host_url(str(config["host"]), int(config["port"]))
        except (KeyError, TypeError, ValueError):
            return self.async_abort(reason="invalid_discovery_info")
        api_key = _clean_key(config)
        doc, error = await self._async_probe(url, api_key)
        if error in AUTH_ERRORS:
            self._needs_key = True
        elif doc is None:
            return self.async_abort(reason=error or "unknown")
        else:
            await self.async_set_unique_id(_cluster_id(doc))
            updates: dict[str, Any] = {CONF_URL: url}
            if api_key is not None:
                updates[CONF_API_KEY] = api_key
            self._abort_if_configured(updates)
        self._url, self._api_key, self._doc = url, api_key, doc
        self._name = discovery_info.name
        self.context["title_placeholders"] = {"name": discovery_info.name}
        self.context["configuration_url"] = (
            f"homeassistant://hassio/addon/{discovery_info.slug}/info")
        return await self.async_step_hassio_confirm()

    async def async_step_hassio_confirm(self, user_input: dict[str, Any] | None = None
                                        ) -> ConfigFlowResult:
        assert self._url is not None
        errors: dict[str, str] = {}
        if user_input is not None:
            doc = await self._confirm_key(user_input, errors)
            if doc is not None:  # the key opened the head: now its cluster is known
                await self.async_set_unique_id(_cluster_id(doc), raise_on_progress=False)
                self._abort_if_configured({CONF_URL: self._url, CONF_API_KEY: self._api_key})
            if not errors:
                return self._create()
        return self._confirm_form("hassio_confirm", errors,
                                  {"addon": self._name or "", "url": self._url})

    # -- changing an entry ----------------------------------------------------------------------

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None
                                     ) -> ConfigFlowResult:
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            url, api_key, doc = await self._async_reach(user_input, errors)
            if doc is not None:
                await self.async_set_unique_id(_cluster_id(doc))
                self._abort_if_unique_id_mismatch(reason="wrong_cluster")
                return self._update_and_abort(entry, {CONF_URL: url, CONF_API_KEY: api_key})
        current = user_input or entry.data
        return self.async_show_form(
            step_id="reconfigure", errors=errors,
            data_schema=_connection_schema(current.get(CONF_URL), current.get(CONF_API_KEY)))

    async def async_step_reauth(self, entry_data: Mapping[str, Any]) -> ConfigFlowResult:
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(self, user_input: dict[str, Any] | None = None
                                        ) -> ConfigFlowResult:
        entry = self._get_reauth_entry()
        url = str(entry.data[CONF_URL])
        errors: dict[str, str] = {}
        if user_input is not None:
            api_key = _clean_key(user_input)
            doc, error = await self._async_probe(url, api_key)
            if doc is None:
                errors["base"] = error or "unknown"
            else:
                await self.async_set_unique_id(_cluster_id(doc))
                self._abort_if_unique_id_mismatch(reason="wrong_cluster")
                return self._update_and_abort(entry, {CONF_API_KEY: api_key})
        return self.async_show_form(
            step_id="reauth_confirm", errors=errors, data_schema=_key_schema(required=False),
            description_placeholders={"url": url})

    @classmethod
    @callback
    def async_get_supported_subentry_types(cls, config_entry: ConfigEntry
                                           ) -> dict[str, type[ConfigSubentryFlow]]:
        return {SUBENTRY_CONVERSATION: PrimaSubentryFlow, SUBENTRY_AI_TASK: PrimaSubentryFlow}


# -- subentries: conversation agents and AI Task entities -------------------------------------


def _llm_api_options(hass: HomeAssistant) -> list[SelectOptionDict]:
    return [SelectOptionDict(label=api.name, value=api.id) for api in llm.async_get_apis(hass)]


def tool_support(doc: Mapping[str, Any] | None) -> bool | None:
    """Whether the served model can call tools (its template has a tool-call syntax); None
    while the head has not said (no model loaded yet)."""
    model = doc.get("model") if doc else None
    if not isinstance(model, dict) or "tool_format" not in model:
        return None
    return model["tool_format"] is not None


def tools_note(doc: Mapping[str, Any] | None) -> str:
    """The agent form's line on tools: what the served model can do with them."""
    model = doc.get("model") if doc else None
    name = str(model.get("id") or "the model") if isinstance(model, dict) else "the model"
    can = tool_support(doc)
    if can is None:
        return (f"Whether {name} can call tools is not known yet: the head has not loaded it.")
    if can:
        assert isinstance(model, dict)
        return (f"{name} can call tools ({model['tool_format']} syntax): choose the APIs it "
                "may use to control Home Assistant.")
    return (f"{name} cannot call tools: its chat template has no tool-call syntax, so it "
            "cannot control Home Assistant, and the head tells it so. Leave \"Control Home "
            "Assistant\" empty; an assistant that prefers handling commands locally still "
            "controls your devices.")


def unused_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base 2``, ``base 3``... whichever no other subentry carries."""
    if base not in taken:
        return base
    return next(f"{base} {i}" for i in range(2, len(taken) + 3) if f"{base} {i}" not in taken)


def subentry_schema(hass: HomeAssistant, subentry_type: str, options: Mapping[str, Any],
                    *, new: bool, name: str | None = None) -> vol.Schema:
    """The options form of a conversation agent or an AI Task entity."""
    conversation = subentry_type == SUBENTRY_CONVERSATION
    schema: dict[Any, Any] = {}
    if new:
        name = name or (DEFAULT_CONVERSATION_NAME if conversation else DEFAULT_AI_TASK_NAME)
        schema[vol.Required(CONF_NAME, default=name)] = str
    if conversation:
        known = {api.id for api in llm.async_get_apis(hass)}
        apis = [api for api in options.get(CONF_LLM_HASS_API) or [] if api in known]
        schema[vol.Optional(CONF_PROMPT, description={
            "suggested_value": options.get(CONF_PROMPT, llm.DEFAULT_INSTRUCTIONS_PROMPT)})
        ] = TemplateSelector()
        schema[vol.Optional(CONF_LLM_HASS_API, description={"suggested_value": apis})
               ] = SelectSelector(SelectSelectorConfig(options=_llm_api_options(hass),
                                                       multiple=True))
    schema[vol.Required(CONF_TEMPERATURE,
                        default=options.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE))
           ] = NumberSelector(NumberSelectorConfig(min=0, max=2, step=0.05,
                                                   mode=NumberSelectorMode.SLIDER))
    schema[vol.Required(CONF_TOP_P, default=options.get(CONF_TOP_P, DEFAULT_TOP_P))
           ] = NumberSelector(NumberSelectorConfig(min=0, max=1, step=0.05,
                                                   mode=NumberSelectorMode.SLIDER))
    schema[vol.Required(CONF_MAX_TOKENS, default=options.get(CONF_MAX_TOKENS, DEFAULT_MAX_TOKENS))
           ] = NumberSelector(NumberSelectorConfig(min=1, max=8192, step=1,
                                                   mode=NumberSelectorMode.BOX))
    if conversation:
        schema[vol.Required(CONF_MAX_HISTORY,
                            default=options.get(CONF_MAX_HISTORY, DEFAULT_MAX_HISTORY))
               ] = NumberSelector(NumberSelectorConfig(min=0, max=100, step=1,
                                                       mode=NumberSelectorMode.BOX))
    schema[vol.Required(CONF_THINK, default=options.get(CONF_THINK, DEFAULT_THINK))
           ] = BooleanSelector()
    return vol.Schema(schema)


def _clean_options(user_input: Mapping[str, Any]) -> dict[str, Any]:
    """The form's answer as stored: counts as integers, the name left out."""
    data = {k: v for k, v in user_input.items() if k != CONF_NAME}
    for key in (CONF_MAX_TOKENS, CONF_MAX_HISTORY):
        if key in data:
            data[key] = int(data[key])
    return data


class PrimaSubentryFlow(ConfigSubentryFlow):
    """Add (``user``) or edit (``reconfigure``) a conversation agent or an AI Task entity."""

    async def async_step_set_options(self, user_input: dict[str, Any] | None = None
                                     ) -> SubentryFlowResult:
        if self._get_entry().state is not ConfigEntryState.LOADED:
            return self.async_abort(reason="entry_not_loaded")
        new = self.source != SOURCE_RECONFIGURE
        if user_input is not None:
            data = _clean_options(user_input)
            if new:
                return self.async_create_entry(title=str(user_input[CONF_NAME]), data=data)
            return self.async_update_and_abort(self._get_entry(),
                                               self._get_reconfigure_subentry(), data=data)
        entry = self._get_entry()
        doc = entry.runtime_data.coordinator.data
        conversation = self._subentry_type == SUBENTRY_CONVERSATION
        options: Mapping[str, Any]
        if not new:
            options = self._get_reconfigure_subentry().data
        elif conversation:
            options = conversation_defaults(doc)
        else:
            options = RECOMMENDED_AI_TASK_OPTIONS
        default = DEFAULT_CONVERSATION_NAME if conversation else DEFAULT_AI_TASK_NAME
        name = unused_name(default, {sub.title for sub in entry.subentries.values()
                                     if sub.subentry_type == self._subentry_type})
        return self.async_show_form(
            step_id="set_options",
            data_schema=subentry_schema(self.hass, self._subentry_type, options, new=new,
                                        name=name),
            description_placeholders={"tools": tools_note(doc)} if conversation else None)

    async_step_user = async_step_set_options
    async_step_reconfigure = async_step_set_options
