"""Both sides of the add-on's announcement in one test: the add-on's own discovery script
(addon/rootfs/.../discovery/run) posts to a Supervisor, and what it posted goes through the
integration's hassio flow to a loaded entry on the real head it announced.

The Supervisor is the one stand-in (a user of the integration outside Home Assistant OS has
none): a small HTTP server on 127.0.0.1 that records the POST /discovery, as the real one
would before starting the flow.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from conftest import API_KEY, ROOT, head_url
from homeassistant.config_entries import SOURCE_HASSIO, ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from loopback import serving
from server_process import ServerProcess

from custom_components.prima.const import CONF_API_KEY, CONF_URL, DOMAIN

ADDON = ROOT / "addon"
LIB = ADDON / "rootfs" / "usr" / "lib" / "prima"
DISCOVERY = ADDON / "rootfs" / "etc" / "s6-overlay" / "s6-rc.d" / "discovery" / "run"


async def _announce(head: ServerProcess, tmp_path: Path) -> dict[str, Any]:
    """Run the add-on's discovery script for a node on ``head``'s port; the posted body."""
    posted: list[dict[str, Any]] = []

    async def discovery(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer supervisor-token"
        posted.append(await request.json())
        return web.json_response({"result": "ok", "data": {"uuid": "d1"}})

    app = web.Application()
    app.router.add_post("/discovery", discovery)
    options = {**yaml.safe_load((ADDON / "config.yaml").read_text())["options"],
               "port": head.port, "api_key": API_KEY}
    (tmp_path / "options.json").write_text(json.dumps(options))
    async with serving(app) as port:
        proc = await asyncio.create_subprocess_exec(
            "bash", str(DISCOVERY), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "PRIMA_OPTIONS": str(tmp_path / "options.json"),
                 "PRIMA_LIB": str(LIB), "SUPERVISOR_TOKEN": "supervisor-token",
                 "SUPERVISOR_URL": f"http://127.0.0.1:{port}",
                 "PRIMA_DISCOVERY_HOST": "127.0.0.1"})
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
    assert len(posted) == 1
    return posted[0]


async def test_the_add_on_s_announcement_sets_up_the_integration(
        hass: HomeAssistant, head: ServerProcess, tmp_path: Path) -> None:
    body = await _announce(head, tmp_path)
    assert body["service"] == DOMAIN
    info = HassioServiceInfo(config=body["config"], name="Prima node", slug="prima_node",
                             uuid="d1")
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=info)
    assert result["type"] is FlowResultType.FORM and result["step_id"] == "hassio_confirm"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = result["result"]
    assert entry.data == {CONF_URL: head_url(head), CONF_API_KEY: API_KEY}
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED  # the head answered with the announced key
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
