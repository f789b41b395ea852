"""Home Assistant against a real head node: fixtures shared by the integration's tests.

The head is a real ``prima-node serve`` process (from the node's own environment, .venv) on
127.0.0.1 with a tiny synthetic model written by the project's own tool; Home Assistant runs
in this environment (.venv-ha) through pytest-homeassistant-custom-component. Nothing is
mocked that a user has locally.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_socket
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry

# before any hass fixture: the harness's own custom_components package would shadow ours
import custom_components.prima  # noqa: F401
from custom_components.prima.const import (
    CONF_API_KEY,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_PROMPT,
    CONF_URL,
    DOMAIN,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess  # noqa: E402

NODE_PYTHON = ROOT / ".venv" / "bin" / "python"
API_KEY = "ha-test-key-0123456789"


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None, socket_enabled: None
                                    ) -> None:
    """Let Home Assistant load custom_components.prima and reach the head on loopback (the
    harness blocks every socket before each test)."""


@pytest.fixture(autouse=True)
async def setup_homeassistant(hass: HomeAssistant) -> None:
    """Conversation needs the core component (exposed entities) set up first."""
    assert await async_setup_component(hass, "homeassistant", {})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic llama model written by the node's own tool."""
    if not NODE_PYTHON.exists():
        pytest.fail(f"{NODE_PYTHON} is missing: run scripts/setup first")
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    subprocess.run([str(NODE_PYTHON), "-m", "prima_node.cli", "make-model", str(path),
                    "--preset", "tiny", "--quant", "Q8_0"], check=True, capture_output=True)
    return path


def start_head(model: Path, state: Path, *, api_key: str | None = API_KEY,
               extra: tuple[str, ...] = ()) -> ServerProcess:
    """A head node process, answering requests once this returns."""
    # the session's head starts before any function fixture could lift the harness's block
    pytest_socket.enable_socket()
    srv = ServerProcess(model, state, ctx=2048, api_key=api_key, python=str(NODE_PYTHON),
                        extra=("--no-discovery", *extra))
    srv.start()
    srv.wait_ready()
    return srv


@pytest.fixture(scope="session")
def head(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[ServerProcess]:
    """One head node for the whole session (tests that stop a head start their own)."""
    srv = start_head(tiny_model, tmp_path_factory.mktemp("head"))
    try:
        yield srv
    finally:
        srv.stop()


def _node_path(code: str) -> Path:
    """A path the node's environment computes (its packages are not importable here)."""
    found = subprocess.run([str(NODE_PYTHON), "-c", code], capture_output=True, text=True,
                           check=True, timeout=120)
    return Path(found.stdout.strip())


#: real models whose chat format has no tool syntax: SmolLM2 (the default model) and Gemma 3
TOOLLESS = {
    "smollm2": "from prima_node.default_model import default_model; print(default_model())",
    "gemma3": "from prima_node.packaged_models import gemma3_270m; print(gemma3_270m())",
}


@pytest.fixture(scope="session", params=sorted(TOOLLESS))
def toolless_head(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ServerProcess]:
    """A head serving a real model whose chat format has no tool syntax."""
    srv = start_head(_node_path(TOOLLESS[request.param]), tmp_path_factory.mktemp("toolless"))
    try:
        yield srv
    finally:
        srv.stop()


def _synthetic_head(tmp_path_factory: pytest.TempPathFactory, arch: str, quant: str
                    ) -> Iterator[ServerProcess]:
    """A head serving a synthetic model of ``arch`` (tiny preset), stopped afterwards."""
    path = tmp_path_factory.mktemp("models") / f"{arch}.gguf"
    subprocess.run([str(NODE_PYTHON), "-m", "prima_node.cli", "make-model", str(path),
                    "--arch", arch, "--preset", "tiny", "--quant", quant], check=True,
                   capture_output=True)
    srv = start_head(path, tmp_path_factory.mktemp(arch))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def moe_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A head serving a mixture of experts (synthetic qwen3moe) with Qwen's Hermes tool
    syntax, where the session's head has Llama 3's."""
    yield from _synthetic_head(tmp_path_factory, "qwen3moe", "Q8_0")


@pytest.fixture(scope="session")
def oss_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A head serving gpt-oss (synthetic, MXFP4 experts as its files come): harmony's
    channels and its call syntax."""
    yield from _synthetic_head(tmp_path_factory, "gpt-oss", "MXFP4_MOE")


def head_url(srv: ServerProcess) -> str:
    return f"http://127.0.0.1:{srv.port}"


def entry_for(srv: ServerProcess, **subentry: Any) -> MockConfigEntry:
    """A config entry for a head, with one conversation and one AI Task subentry."""
    conversation = {CONF_PROMPT: "You are a helpful home assistant.", CONF_MAX_TOKENS: 24,
                    CONF_LLM_HASS_API: [], **subentry}
    return MockConfigEntry(
        domain=DOMAIN, title="Prima cluster",
        data={CONF_URL: head_url(srv), CONF_API_KEY: srv.api_key},
        subentries_data=[
            {"data": conversation, "subentry_type": "conversation",
             "title": "Prima conversation", "unique_id": None},
            {"data": {CONF_MAX_TOKENS: 48}, "subentry_type": "ai_task_data",
             "title": "Prima AI Task", "unique_id": None},
        ],
    )


@pytest.fixture
async def loaded_entry(hass: HomeAssistant, head: ServerProcess
                       ) -> AsyncIterator[MockConfigEntry]:
    """The integration set up against the session's head."""
    entry = entry_for(head)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    yield entry
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
