"""The config flow against real head nodes: by hand, mDNS, the add-on, reconfigure, reauth and
the conversation / AI Task subentries.

Only the Supervisor is stood in for (the add-on discovery is the HassioServiceInfo it would
send). Setting an entry up is the integration's own business, tested elsewhere: here
``async_setup_entry`` is patched, as Home Assistant's own config-flow tests do, so a flow test
needs no platforms and each created entry shows up as handed to setup.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, patch

import pytest
from aiohttp import web
from conftest import API_KEY, entry_for, head_url, start_head
from freezegun.api import FrozenDateTimeFactory
from homeassistant.config_entries import (
    SOURCE_HASSIO,
    SOURCE_REAUTH,
    SOURCE_USER,
    SOURCE_ZEROCONF,
    ConfigEntryState,
)
from homeassistant.const import STATE_ON, STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResult, FlowResultType
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import llm
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from homeassistant.helpers.translation import async_get_translations
from loopback import serving
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed
from server_process import ServerProcess

from custom_components.prima.const import (
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
    DEFAULT_MAX_TOKENS,
    DOMAIN,
)


@pytest.fixture(autouse=True)
async def setup_entry(hass: HomeAssistant, request: pytest.FixtureRequest
                      ) -> AsyncIterator[AsyncMock | None]:
    """Entries are handed to a stand-in setup (and unload), so only the flow is tested;
    tests that ask for ``real_setup`` set the integration up for real."""
    if "real_setup" in request.fixturenames:
        yield None
        return
    with (patch("custom_components.prima.async_setup_entry", return_value=True) as setup,
          patch("custom_components.prima.async_unload_entry", return_value=True)):
        yield setup
        for entry in hass.config_entries.async_entries(DOMAIN):  # before the patch ends
            if entry.state is ConfigEntryState.LOADED:
                assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.fixture(scope="module")
def open_head(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ServerProcess]:
    """A second head, without an API key and with its own state (so another node id)."""
    srv = start_head(tiny_model, tmp_path_factory.mktemp("open-head"), api_key=None)
    try:
        yield srv
    finally:
        srv.stop()


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def txt(srv: ServerProcess, **override: str) -> dict[str, str]:
    """The TXT properties the node announces (prima_node.cluster.discovery's layout)."""
    doc = srv.status()
    props = {"txtvers": "1", "id": doc["node_id"], "name": "kitchen-pc",
             "version": doc["version"], "role": "standalone", "model": doc["model"]["file"],
             "size": "1234", "hash": "0123456789abcdef0123456789abcdef",
             "api": str(srv.port), "path": "/cluster/ws"}
    props.update(override)
    return props


def zeroconf_info(props: dict[str, str], port: int) -> ZeroconfServiceInfo:
    return ZeroconfServiceInfo(
        ip_address=ip_address("127.0.0.1"), ip_addresses=[ip_address("127.0.0.1")],
        port=port, hostname=f"prima-{props['id']}.local.", type="_prima._tcp.local.",
        name=f"{props['id']}._prima._tcp.local.", properties=props)


def hassio_info(srv: ServerProcess, **config: Any) -> HassioServiceInfo:
    return HassioServiceInfo(config={"host": "127.0.0.1", "port": srv.port, **config},
                             name="Prima node", slug="prima_node", uuid="0123456789abcdef")


async def start_user(hass: HomeAssistant) -> str:
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert not result["errors"]
    return result["flow_id"]


def cluster_entries(hass: HomeAssistant) -> list[Any]:
    return hass.config_entries.async_entries(DOMAIN)


async def abort_message(hass: HomeAssistant, result: FlowResult[Any, Any]) -> str:
    """The text a user reads for an abort, from the translations of the domain the result
    names (Home Assistant's own for its generic reasons), else of this integration."""
    assert result["type"] is FlowResultType.ABORT
    domain = result.get("translation_domain") or DOMAIN
    texts = await async_get_translations(hass, "en", "config", [domain])
    message = texts.get(f"component.{domain}.config.abort.{result['reason']}")
    assert message, f"no text for the abort {result['reason']!r} in {domain}'s translations"
    return message


# -- by hand ---------------------------------------------------------------------------------


async def test_user_creates_entry_with_default_subentries(
        hass: HomeAssistant, head: ServerProcess, setup_entry: AsyncMock) -> None:
    doc = head.status()
    flow_id = await start_user(hass)
    # the way people copy it from an OpenAI client's settings: no scheme, /v1 and a slash
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_URL: f"127.0.0.1:{head.port}/v1/", CONF_API_KEY: f" {API_KEY} "})
    await hass.async_block_till_done()

    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = result["result"]
    assert entry.unique_id == doc["cluster_id"]
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    assert entry.title == f"Prima cluster ({doc['model']['id']})"
    by_type = {s.subentry_type: s for s in entry.subentries.values()}
    assert set(by_type) == {"conversation", "ai_task_data"}
    assert len(entry.subentries) == 2
    conversation, ai_task = by_type["conversation"], by_type["ai_task_data"]
    assert conversation.title == DEFAULT_CONVERSATION_NAME
    assert conversation.data[CONF_LLM_HASS_API] == [llm.LLM_API_ASSIST]
    assert conversation.data[CONF_PROMPT] == llm.DEFAULT_INSTRUCTIONS_PROMPT
    assert conversation.data[CONF_MAX_TOKENS] == DEFAULT_MAX_TOKENS
    assert ai_task.title == DEFAULT_AI_TASK_NAME
    assert CONF_LLM_HASS_API not in ai_task.data and CONF_MAX_HISTORY not in ai_task.data
    assert setup_entry.await_count == 1
    assert entry.state is ConfigEntryState.LOADED


async def test_user_errors_then_success(hass: HomeAssistant, head: ServerProcess) -> None:
    """Each failure shows the form again with its error; the same flow then succeeds."""
    flow_id = await start_user(hass)
    attempts = [
        ({CONF_URL: head_url(head), CONF_API_KEY: "not-the-key"}, {"base": "invalid_auth"}),
        ({CONF_URL: head_url(head)}, {"base": "missing_auth"}),  # the head needs a key
        ({CONF_URL: f"http://127.0.0.1:{free_port()}", CONF_API_KEY: API_KEY},
         {"base": "cannot_connect"}),
        ({CONF_URL: "http://exa mple:80", CONF_API_KEY: API_KEY}, {CONF_URL: "invalid_url"}),
        ({CONF_URL: "127.0.0.1:99999", CONF_API_KEY: API_KEY}, {CONF_URL: "invalid_url"}),
        ({CONF_URL: "ftp://127.0.0.1:21", CONF_API_KEY: API_KEY}, {CONF_URL: "invalid_url"}),
    ]
    for user_input, errors in attempts:
        result = await hass.config_entries.flow.async_configure(flow_id, user_input)
        assert result["type"] is FlowResultType.FORM, user_input
        assert result["step_id"] == "user"
        assert result["errors"] == errors, user_input
    assert not cluster_entries(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_URL: head_url(head), CONF_API_KEY: API_KEY})
    assert result["type"] is FlowResultType.CREATE_ENTRY


@pytest.fixture
async def foreign_server(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """Some other HTTP server on the network (a router page, another API)."""
    app = web.Application()
    if request.param == "json":
        async def status(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "version": "2.1"})
        app.router.add_get("/api/status", status)  # 200, but no node_id
    # else: every path answers aiohttp's plain 404
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("foreign_server", ["json", "not_found"], indirect=True)
async def test_user_not_prima(hass: HomeAssistant, foreign_server: str) -> None:
    flow_id = await start_user(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_URL: foreign_server})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "not_prima"}
    assert not cluster_entries(hass)


async def test_user_already_configured_updates_url(hass: HomeAssistant, head: ServerProcess
                                                   ) -> None:
    """The same cluster added again (here under another address) updates the entry."""
    stale = f"http://127.0.0.1:{free_port()}"
    entry = MockConfigEntry(domain=DOMAIN, unique_id=head.status()["cluster_id"],
                            data={CONF_URL: stale, CONF_API_KEY: API_KEY})
    entry.add_to_hass(hass)
    flow_id = await start_user(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_URL: f"127.0.0.1:{head.port}/", CONF_API_KEY: API_KEY})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_URL] == head_url(head)
    assert len(cluster_entries(hass)) == 1


# -- mDNS ------------------------------------------------------------------------------------


async def test_zeroconf_head_with_key(hass: HomeAssistant, head: ServerProcess,
                                      setup_entry: AsyncMock) -> None:
    """A head that wants a key: the confirm form asks for it and checks it."""
    props = txt(head, role="head", cluster="0011223344556677")
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(props, head.port))
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["data_schema"] is not None and CONF_API_KEY in result["data_schema"].schema
    flow = hass.config_entries.flow.async_get(result["flow_id"])
    assert flow["context"]["title_placeholders"]["name"] == "kitchen-pc"

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_KEY: "wrong"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_KEY: API_KEY})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = result["result"]
    assert entry.unique_id == props["id"] == head.status()["cluster_id"]
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    assert {s.subentry_type for s in entry.subentries.values()} == {
        "conversation", "ai_task_data"}
    assert setup_entry.await_count == 1


async def test_zeroconf_open_head_confirm(hass: HomeAssistant, open_head: ServerProcess
                                          ) -> None:
    """A standalone node without a key: confirming is all it takes; the API port comes from
    the TXT ``api`` key, not the SRV port."""
    props = txt(open_head)
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF},
        data=zeroconf_info(props, port=free_port()))
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["data_schema"] is None
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["result"].unique_id == open_head.status()["cluster_id"]
    assert result["result"].data == {CONF_URL: head_url(open_head), CONF_API_KEY: None}


async def test_zeroconf_worker_aborts(hass: HomeAssistant, head: ServerProcess) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF},
        data=zeroconf_info(txt(head, role="worker"), head.port))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_head"


async def test_zeroconf_unknown_txt_version_aborts(hass: HomeAssistant, head: ServerProcess
                                                   ) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF},
        data=zeroconf_info(txt(head, txtvers="2"), head.port))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "invalid_discovery_info"


async def test_zeroconf_unreachable_aborts(hass: HomeAssistant, head: ServerProcess) -> None:
    """An announcement whose API port does not answer (the node went away meanwhile)."""
    port = free_port()
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF},
        data=zeroconf_info(txt(head, api=str(port)), port))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "cannot_connect"


def test_discovered_ipv6_address_in_brackets() -> None:
    from custom_components.prima.config_flow import _host_url

    assert _host_url("fd00::20", 8080) == "http://[fd00::20]:8080"
    assert _host_url("192.168.1.20", 8080) == "http://192.168.1.20:8080"
    assert _host_url("kitchen-pc.local", 8080) == "http://kitchen-pc.local:8080"


async def test_zeroconf_known_node_new_port_updates_entry(
        hass: HomeAssistant, head: ServerProcess) -> None:
    props = txt(head, role="head")
    entry = MockConfigEntry(domain=DOMAIN, unique_id=props["id"],
                            data={CONF_URL: f"http://127.0.0.1:{free_port()}",
                                  CONF_API_KEY: API_KEY})
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(props, head.port))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    assert len(cluster_entries(hass)) == 1


async def test_zeroconf_leaves_addon_entry_alone(hass: HomeAssistant, head: ServerProcess
                                                 ) -> None:
    """An entry the add-on set up keeps the Supervisor's address."""
    props = txt(head, role="head")
    url = "http://local-prima-node:8080"
    entry = MockConfigEntry(domain=DOMAIN, unique_id=props["id"], source=SOURCE_HASSIO,
                            data={CONF_URL: url, CONF_API_KEY: API_KEY})
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(props, head.port))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_URL] == url


@pytest.mark.parametrize(("stored", "expected"), [
    # a URL the user chose keeps its scheme and host; a port it names follows the node's
    ("https://prima.example:8443", "https://prima.example:{port}"),
    ("https://prima.example:{port}", "https://prima.example:{port}"),
    ("https://192.0.2.7:8443", "https://192.0.2.7:{port}"),
    ("http://kitchen-pc.local:8080", "http://kitchen-pc.local:{port}"),
    ("http://kitchen-pc.local:{port}", "http://kitchen-pc.local:{port}"),
    # no port: the node is reached through something else (a reverse proxy)
    ("https://prima.example", "https://prima.example"),
    ("http://prima.example/cluster", "http://prima.example/cluster"),
    # plain HTTP to an address (what discovery stores) follows the node
    ("http://192.0.2.7:8080", "http://127.0.0.1:{port}"),
    ("http://[fd00::20]:{port}", "http://127.0.0.1:{port}"),
    ("192.0.2.7:{port}", "http://127.0.0.1:{port}"),
])
async def test_zeroconf_keeps_a_chosen_url(hass: HomeAssistant, head: ServerProcess,
                                           stored: str, expected: str) -> None:
    """mDNS announces the node's address and API port; it must not overwrite an HTTPS URL or
    a host name the user entered with that address."""
    props = txt(head, role="head")
    port = head.port
    entry = MockConfigEntry(domain=DOMAIN, unique_id=props["id"],
                            data={CONF_URL: stored.format(port=port), CONF_API_KEY: API_KEY})
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(props, port))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == {CONF_URL: expected.format(port=port), CONF_API_KEY: API_KEY}
    assert len(cluster_entries(hass)) == 1


async def test_second_flow_for_a_cluster_in_progress_aborts(
        hass: HomeAssistant, head: ServerProcess) -> None:
    """A head found by mDNS and waiting for confirmation, then entered by hand as well."""
    props = txt(head, role="head")
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(props, head.port))
    assert result["type"] is FlowResultType.FORM
    flow_id = await start_user(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_URL: head_url(head), CONF_API_KEY: API_KEY})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_in_progress"
    assert "already being configured" in await abort_message(hass, result)
    assert not cluster_entries(hass)


def test_no_dead_abort_texts() -> None:
    """Home Assistant words its generic aborts itself (the results name its domain): texts
    for them under this integration's keys would never be shown."""
    import json

    from custom_components import prima

    texts = json.loads((Path(prima.__file__).parent / "translations" / "en.json").read_text())
    generic = {"already_in_progress", "reauth_successful", "reconfigure_successful"}
    assert not generic & set(texts["config"]["abort"])
    for subentry_type, subentry in texts["config_subentries"].items():
        assert not generic & set(subentry.get("abort", {})), subentry_type


# -- the add-on (Supervisor discovery) -------------------------------------------------------


async def test_hassio_confirm_creates_entry(hass: HomeAssistant, head: ServerProcess,
                                            setup_entry: AsyncMock) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=hassio_info(head, api_key=API_KEY))
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "hassio_confirm"
    assert result["data_schema"] is None
    assert result["description_placeholders"] == {"addon": "Prima node",
                                                  "url": head_url(head)}
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = result["result"]
    assert entry.unique_id == head.status()["cluster_id"]
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    assert entry.source == SOURCE_HASSIO
    assert len(entry.subentries) == 2
    assert setup_entry.await_count == 1


async def test_hassio_without_key_asks_for_it(hass: HomeAssistant, head: ServerProcess
                                              ) -> None:
    """The add-on's discovery lacks the key the head wants: the confirm form asks for it."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=hassio_info(head))
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "hassio_confirm"
    assert result["data_schema"] is not None and CONF_API_KEY in result["data_schema"].schema
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_KEY: "wrong"})
    assert result["errors"] == {"base": "invalid_auth"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_KEY: API_KEY})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["result"].unique_id == head.status()["cluster_id"]
    assert result["result"].data[CONF_API_KEY] == API_KEY


async def test_hassio_updates_existing_entry(hass: HomeAssistant, head: ServerProcess) -> None:
    entry = MockConfigEntry(domain=DOMAIN, unique_id=head.status()["cluster_id"],
                            data={CONF_URL: "http://192.0.2.1:8080", CONF_API_KEY: "old"})
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=hassio_info(head, api_key=API_KEY))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    assert len(cluster_entries(hass)) == 1


async def test_hassio_without_port_aborts(hass: HomeAssistant) -> None:
    info = HassioServiceInfo(config={"host": "127.0.0.1"}, name="Prima node",
                             slug="prima_node", uuid="0123456789abcdef")
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=info)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "invalid_discovery_info"


async def test_hassio_unreachable_aborts(hass: HomeAssistant) -> None:
    info = HassioServiceInfo(config={"host": "127.0.0.1", "port": free_port()},
                             name="Prima node", slug="prima_node", uuid="0123456789abcdef")
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=info)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "cannot_connect"


# -- reconfigure and reauth ------------------------------------------------------------------


async def test_reconfigure_moves_to_new_address(hass: HomeAssistant, head: ServerProcess,
                                                setup_entry: AsyncMock) -> None:
    entry = MockConfigEntry(domain=DOMAIN, unique_id=head.status()["cluster_id"],
                            data={CONF_URL: f"http://127.0.0.1:{free_port()}",
                                  CONF_API_KEY: "old"})
    entry.add_to_hass(hass)
    result = await entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: f"127.0.0.1:{head.port}/", CONF_API_KEY: "still-old"})
    assert result["errors"] == {"base": "invalid_auth"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "http://:8080", CONF_API_KEY: API_KEY})
    assert result["errors"] == {CONF_URL: "invalid_url"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: f"127.0.0.1:{head.port}/", CONF_API_KEY: API_KEY})
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    await abort_message(hass, result)
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    assert setup_entry.await_count == 1  # reloaded with the new data


async def test_reconfigure_other_cluster_refused(
        hass: HomeAssistant, head: ServerProcess, open_head: ServerProcess) -> None:
    assert open_head.status()["cluster_id"] != head.status()["cluster_id"]
    entry = MockConfigEntry(domain=DOMAIN, unique_id=head.status()["cluster_id"],
                            data={CONF_URL: head_url(head), CONF_API_KEY: API_KEY})
    entry.add_to_hass(hass)
    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: head_url(open_head)})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_cluster"
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}


async def test_reauth_new_key(hass: HomeAssistant, head: ServerProcess,
                              setup_entry: AsyncMock) -> None:
    entry = MockConfigEntry(domain=DOMAIN, unique_id=head.status()["cluster_id"],
                            data={CONF_URL: head_url(head), CONF_API_KEY: "revoked"})
    entry.add_to_hass(hass)
    result = await entry.start_reauth_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reauth_confirm"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_KEY: "also-wrong"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_KEY: API_KEY})
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    await abort_message(hass, result)
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    assert setup_entry.await_count == 1


# -- subentries ------------------------------------------------------------------------------


@pytest.fixture
async def set_up_entry(hass: HomeAssistant, head: ServerProcess, real_setup: None
                       ) -> MockConfigEntry:
    entry = entry_for(head)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    return entry


async def test_subentry_conversation_create_and_reconfigure(
        hass: HomeAssistant, set_up_entry: MockConfigEntry) -> None:
    entry = set_up_entry
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, "conversation"), context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "set_options"
    schema = result["data_schema"]
    assert schema is not None
    assert {str(k) for k in schema.schema} == {
        "name", CONF_PROMPT, CONF_LLM_HASS_API, CONF_TEMPERATURE, CONF_TOP_P, CONF_MAX_TOKENS,
        CONF_MAX_HISTORY, CONF_THINK}
    # the model calls tools: the form says so and offers Assist, as the default agent does
    assert "can call tools (llama3 syntax)" in result["description_placeholders"]["tools"]
    assert _suggested(schema, CONF_LLM_HASS_API) == [llm.LLM_API_ASSIST]
    # the entry has a "Prima conversation": a second agent is not offered the same name
    assert _default(schema, "name") == "Prima conversation 2"
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], {
        "name": "Kitchen agent", CONF_PROMPT: "Answer in one sentence.",
        CONF_LLM_HASS_API: [llm.LLM_API_ASSIST], CONF_TEMPERATURE: 0.2, CONF_TOP_P: 0.9,
        CONF_MAX_TOKENS: 64.0, CONF_MAX_HISTORY: 4.0, CONF_THINK: True})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    added = [s for s in entry.subentries.values() if s.title == "Kitchen agent"]
    assert len(added) == 1
    subentry = added[0]
    assert subentry.subentry_type == "conversation"
    assert dict(subentry.data) == {
        CONF_PROMPT: "Answer in one sentence.", CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
        CONF_TEMPERATURE: 0.2, CONF_TOP_P: 0.9, CONF_MAX_TOKENS: 64, CONF_MAX_HISTORY: 4,
        CONF_THINK: True}
    assert isinstance(subentry.data[CONF_MAX_TOKENS], int)

    await hass.async_block_till_done()  # the entry reloads with its new subentry
    result = await entry.start_subentry_reconfigure_flow(hass, subentry.subentry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "set_options"
    schema = result["data_schema"]
    assert schema is not None and "name" not in {str(k) for k in schema.schema}
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], {
        CONF_PROMPT: "Answer briefly.", CONF_LLM_HASS_API: [], CONF_TEMPERATURE: 1.0,
        CONF_TOP_P: 1.0, CONF_MAX_TOKENS: 128, CONF_MAX_HISTORY: 0, CONF_THINK: False})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    subentry = entry.subentries[subentry.subentry_id]
    assert subentry.title == "Kitchen agent"
    assert subentry.data[CONF_PROMPT] == "Answer briefly."
    assert subentry.data[CONF_LLM_HASS_API] == []
    assert subentry.data[CONF_MAX_HISTORY] == 0
    assert subentry.data[CONF_THINK] is False


def suggested(result: Any, key: str) -> Any:
    """The value a form suggests for ``key`` (what the frontend fills in)."""
    schema = result["data_schema"]
    assert schema is not None
    marker = next(k for k in schema.schema if str(k) == key)
    return (marker.description or {}).get("suggested_value")


async def test_subentry_new_conversation_suggests_assist(
        hass: HomeAssistant, set_up_entry: MockConfigEntry) -> None:
    """A new agent starts with Assist selected, like the entry's default one; editing an agent
    shows what it has (here: none)."""
    entry = set_up_entry
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, "conversation"), context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert suggested(result, CONF_LLM_HASS_API) == [llm.LLM_API_ASSIST]
    assert suggested(result, CONF_PROMPT) == llm.DEFAULT_INSTRUCTIONS_PROMPT

    subentry = next(s for s in entry.subentries.values() if s.subentry_type == "conversation")
    assert subentry.data[CONF_LLM_HASS_API] == []
    await hass.async_block_till_done()  # the entry reloads with its new subentry
    result = await entry.start_subentry_reconfigure_flow(hass, subentry.subentry_id)
    assert result["type"] is FlowResultType.FORM
    assert suggested(result, CONF_LLM_HASS_API) == []
    assert suggested(result, CONF_PROMPT) == subentry.data[CONF_PROMPT]


async def test_subentry_ai_task_create_and_reconfigure(
        hass: HomeAssistant, set_up_entry: MockConfigEntry) -> None:
    entry = set_up_entry
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, "ai_task_data"), context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    schema = result["data_schema"]
    assert schema is not None
    assert {str(k) for k in schema.schema} == {
        "name", CONF_TEMPERATURE, CONF_TOP_P, CONF_MAX_TOKENS, CONF_THINK}
    # the defaults fill what the form leaves out
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {"name": "Summaries", CONF_MAX_TOKENS: 200})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    subentry = next(s for s in entry.subentries.values() if s.title == "Summaries")
    assert subentry.subentry_type == "ai_task_data"
    assert subentry.data[CONF_MAX_TOKENS] == 200
    assert CONF_TEMPERATURE in subentry.data and CONF_THINK in subentry.data

    await hass.async_block_till_done()  # the entry reloads with its new subentry
    result = await entry.start_subentry_reconfigure_flow(hass, subentry.subentry_id)
    assert result["type"] is FlowResultType.FORM
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_TEMPERATURE: 0.0, CONF_TOP_P: 0.5, CONF_MAX_TOKENS: 8192,
                            CONF_THINK: True})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert dict(entry.subentries[subentry.subentry_id].data) == {
        CONF_TEMPERATURE: 0.0, CONF_TOP_P: 0.5, CONF_MAX_TOKENS: 8192, CONF_THINK: True}


async def test_subentry_out_of_range_refused(hass: HomeAssistant,
                                             set_up_entry: MockConfigEntry) -> None:
    from homeassistant.data_entry_flow import InvalidData

    result = await hass.config_entries.subentries.async_init(
        (set_up_entry.entry_id, "ai_task_data"), context={"source": SOURCE_USER})
    with pytest.raises(InvalidData):
        await hass.config_entries.subentries.async_configure(
            result["flow_id"], {"name": "x", CONF_TEMPERATURE: 2.5})


@pytest.mark.parametrize("subentry_type", ["conversation", "ai_task_data"])
async def test_subentry_needs_loaded_entry(hass: HomeAssistant, head: ServerProcess,
                                           subentry_type: str) -> None:
    entry = entry_for(head)
    entry.add_to_hass(hass)  # not set up
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, subentry_type), context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "entry_not_loaded"
    subentry_id = next(s.subentry_id for s in entry.subentries.values()
                       if s.subentry_type == subentry_type)
    result = await entry.start_subentry_reconfigure_flow(hass, subentry_id)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "entry_not_loaded"


@pytest.fixture
def real_setup() -> None:
    """Asked for by tests that set the integration up for real (see ``setup_entry``)."""


async def test_reconfigure_loaded_entry_reloads_once(
        hass: HomeAssistant, open_head: ServerProcess, real_setup: None) -> None:
    """A loaded entry (with its update listener) takes new data by being set up again, once
    (the flow must leave the reload to the listener)."""
    import custom_components.prima as integration

    # a head without a key of its own ignores the one sent: the key is dropped here
    entry = MockConfigEntry(domain=DOMAIN, unique_id=open_head.status()["cluster_id"],
                            data={CONF_URL: head_url(open_head), CONF_API_KEY: "unneeded"})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    with patch.object(integration, "async_setup_entry",
                      wraps=integration.async_setup_entry) as setup:
        result = await entry.start_reconfigure_flow(hass)
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_URL: f"127.0.0.1:{open_head.port}/v1"})
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "reconfigure_successful"
        await hass.async_block_till_done()
    assert entry.data == {CONF_URL: head_url(open_head), CONF_API_KEY: None}
    assert entry.state is ConfigEntryState.LOADED
    assert setup.await_count == 1
    assert entry.runtime_data.client.api_key is None
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_zeroconf_update_of_loaded_entry_reloads_once(
        hass: HomeAssistant, open_head: ServerProcess, real_setup: None) -> None:
    """mDNS telling a loaded entry its address: one reload, by the entry's listener."""
    import custom_components.prima as integration

    props = txt(open_head)
    # written by hand without a scheme; it works, and discovery stores the canonical form
    entry = MockConfigEntry(domain=DOMAIN, unique_id=props["id"],
                            data={CONF_URL: f"127.0.0.1:{open_head.port}", CONF_API_KEY: None})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    with patch.object(integration, "async_setup_entry",
                      wraps=integration.async_setup_entry) as setup:
        result = await hass.config_entries.flow.async_init(
            DOMAIN, context={"source": SOURCE_ZEROCONF},
            data=zeroconf_info(props, open_head.port))
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "already_configured"
        await hass.async_block_till_done()
    assert entry.data[CONF_URL] == head_url(open_head)
    assert entry.state is ConfigEntryState.LOADED
    assert setup.await_count == 1
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_user_entry_sets_up_with_its_subentries(
        hass: HomeAssistant, head: ServerProcess, real_setup: None) -> None:
    """The entry the flow creates loads, and each default subentry gets its entity."""
    from homeassistant.helpers import entity_registry as er

    flow_id = await start_user(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_URL: head_url(head), CONF_API_KEY: API_KEY})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    entry = result["result"]
    assert entry.state is ConfigEntryState.LOADED
    registry = er.async_get(hass)
    for subentry in entry.subentries.values():
        domain = "conversation" if subentry.subentry_type == "conversation" else "ai_task"
        entities = [e for e in er.async_entries_for_config_entry(registry, entry.entry_id)
                    if e.config_subentry_id == subentry.subentry_id]
        assert [e.domain for e in entities] == [domain], subentry.subentry_type
        assert hass.states.get(entities[0].entity_id) is not None
    assert await hass.config_entries.async_unload(entry.entry_id)


async def wait_until(hass: HomeAssistant, condition: Callable[[], bool], what: str,
                     freezer: FrozenDateTimeFactory, timeout: float = 30.0) -> None:
    """Let Home Assistant run until ``condition`` holds. The head is another process and
    takes real time: each pause is a thread's sleep, and the frozen clock moves five times as
    far, so that reconnection delays and the refresh cooldown pass quickly."""
    step = 0.05
    for _ in range(int(timeout / step)):
        await hass.async_block_till_done()
        if condition():
            return
        await hass.async_add_executor_job(time.sleep, step)
        freezer.tick(5 * step)
        async_fire_time_changed(hass)
    raise AssertionError(f"timed out waiting for {what}")


async def test_reauth_same_key_revives_loaded_entry(
        hass: HomeAssistant, tiny_model: Path, tmp_path: Path, freezer: FrozenDateTimeFactory,
        real_setup: None) -> None:
    """The head refused the stored key for a while (started again with another one), then
    takes it again: reauth with the unchanged key sets the entry up again. The refusal stopped
    the coordinator, and unchanged data fire no update listener, so the flow must reload."""
    import custom_components.prima as integration

    state_dir = tmp_path / "head"
    srv = await hass.async_add_executor_job(start_head, tiny_model, state_dir)
    port = srv.port
    assert port is not None

    async def restart(api_key: str) -> ServerProcess:
        assert await hass.async_add_executor_job(srv.stop) == 0
        return await hass.async_add_executor_job(
            lambda: start_head(tiny_model, state_dir, api_key=api_key,
                               extra=("--port", str(port))))

    try:
        cluster = srv.status()["cluster_id"]
        entry = entry_for(srv)
        entry.add_to_hass(hass)
        hass.config_entries.async_update_entry(entry, unique_id=cluster)  # as the flow makes it
        assert await hass.config_entries.async_setup(entry.entry_id)
        await hass.async_block_till_done()
        state = er.async_get(hass).async_get_entity_id("sensor", DOMAIN, f"{cluster}-state")
        assert state is not None

        def shown() -> str:
            current = hass.states.get(str(state))
            assert current is not None
            return current.state

        def reauth_flows() -> list[Any]:
            return list(entry.async_get_active_flows(hass, {SOURCE_REAUTH}))

        assert shown() == "ready"

        # another key on the head: the stored one is refused, Home Assistant asks for one
        srv = await restart("another-key")
        await wait_until(hass, lambda: bool(reauth_flows()), "the reauth flow", freezer)
        assert shown() == STATE_UNAVAILABLE
        assert entry.state is ConfigEntryState.LOADED

        # the head's key is set back; the user confirms the key the entry already holds
        srv = await restart(API_KEY)
        (flow,) = reauth_flows()
        with patch.object(integration, "async_setup_entry",
                          wraps=integration.async_setup_entry) as setup:
            result = await hass.config_entries.flow.async_configure(
                flow["flow_id"], {CONF_API_KEY: API_KEY})
            assert result["type"] is FlowResultType.ABORT
            assert result["reason"] == "reauth_successful"
            assert entry.data[CONF_API_KEY] == API_KEY
            await wait_until(hass, lambda: shown() != STATE_UNAVAILABLE,
                             "the entry set up again", freezer, timeout=10)
        assert setup.await_count == 1
        assert entry.state is ConfigEntryState.LOADED
        assert entry.runtime_data.coordinator.last_update_success
        online = er.async_get(hass).async_get_entity_id("binary_sensor", DOMAIN,
                                                        f"{srv.status()['node_id']}-online")
        online_state = hass.states.get(str(online))
        assert online_state is not None and online_state.state == STATE_ON
        assert not reauth_flows()
        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
    finally:
        await hass.async_add_executor_job(srv.stop)


def _suggested(schema: Any, key: str) -> Any:
    (marker,) = [k for k in schema.schema if str(k) == key]
    return (marker.description or {}).get("suggested_value")


def _default(schema: Any, key: str) -> Any:
    (marker,) = [k for k in schema.schema if str(k) == key]
    return marker.default()


async def test_a_model_that_cannot_call_tools_is_said_so_and_assist_is_not_preselected(
        hass: HomeAssistant, toolless_head: ServerProcess, real_setup: None) -> None:
    # the entry's first agent is made without Assist
    flow_id = await start_user(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_URL: head_url(toolless_head), CONF_API_KEY: API_KEY})
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = result["result"]
    (agent,) = [s for s in entry.subentries.values() if s.subentry_type == "conversation"]
    assert agent.data[CONF_LLM_HASS_API] == []
    assert entry.state is ConfigEntryState.LOADED
    # and so is any agent added later
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, "conversation"), context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    note = result["description_placeholders"]["tools"]
    assert "cannot call tools" in note and toolless_head.status()["model"]["id"] in note, note
    assert _suggested(result["data_schema"], CONF_LLM_HASS_API) == []


async def test_an_announcement_without_any_port_is_refused(hass: HomeAssistant,
                                                           head: ServerProcess) -> None:
    props = txt(head)
    del props["api"]
    info = zeroconf_info(props, head.port)
    info = ZeroconfServiceInfo(ip_address=info.ip_address, ip_addresses=info.ip_addresses,
                               port=None, hostname=info.hostname, type=info.type,
                               name=info.name, properties=props)
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=info)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "invalid_discovery_info"


async def test_an_unexpected_failure_is_logged_and_shown_as_unknown(
        hass: HomeAssistant, head: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    """A bug, not a head's answer: the form says 'unknown' and the log has the traceback.
    (No head produces this: the client itself is made to fail.)"""
    flow_id = await start_user(hass)
    with patch("custom_components.prima.config_flow.PrimaClient.status",
               side_effect=RuntimeError("a bug")):
        result = await hass.config_entries.flow.async_configure(
            flow_id, {CONF_URL: head_url(head), CONF_API_KEY: API_KEY})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "unknown"}
    assert "unexpected error talking to" in caplog.text and "a bug" in caplog.text


def test_the_form_helpers_on_documents_without_a_model() -> None:
    """Before the head has loaded its model: no model id, tool support unknown (and said)."""
    from custom_components.prima.config_flow import (
        _model_id,
        _rediscovered_url,
        tool_support,
        tools_note,
        unused_name,
    )

    loading = {"node_id": "n", "state": "loading", "model": {"file": "m.gguf"}}
    assert _model_id(loading) is None
    assert tool_support(loading) is None and tool_support(None) is None
    assert "not known yet" in tools_note(loading)
    assert unused_name("Agent", set()) == "Agent"
    assert unused_name("Agent", {"Agent", "Agent 2"}) == "Agent 3"
    # a stored URL that cannot be parsed follows the node's announced address
    assert _rediscovered_url("http://[::1", "192.168.1.20", 8080) == "http://192.168.1.20:8080"
