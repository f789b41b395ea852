"""The integration in the newest Home Assistant release, run as users run it.

The harness suite (tests/ha) runs on the newest pytest-homeassistant-custom-component, which may
lag the newest release (it pins 2026.10.4 while 2026.11.0 is out). Here a real ``hass`` process
of the release in requirements/ha-latest.txt (.venv-ha-latest, made by scripts/setup) starts
with the integration in its config folder, is onboarded through its REST API, sets the
integration up through the config-flow REST API against a real head serving the real default
model, has one conversation through ``/api/conversation/process`` and one ``prima.generate``
call, and must log no error, no warning and no blocking call from the integration, and no
deprecation of what it uses.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prima_node.default_model import default_model
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
HASS_PYTHON = ROOT / ".venv-ha-latest" / "bin" / "python"
RELEASE = re.search(r"^homeassistant==(\S+)$",
                    (ROOT / "requirements" / "ha-latest.txt").read_text(), re.M)
API_KEY = "release-smoke-key-0123456789"
CLIENT_ID = "http://127.0.0.1/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hass:
    """A Home Assistant process on loopback and a bearer token for its REST API."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.port = _free_port()
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.config / "custom_components").mkdir(parents=True)
        (self.config / "custom_components" / "prima").symlink_to(
            ROOT / "custom_components" / "prima")
        (self.config / "configuration.yaml").write_text(
            "homeassistant:\n  name: Release smoke\n  time_zone: UTC\n  country: NL\n"
            "  unit_system: metric\n  latitude: 52.0\n  longitude: 4.0\n  elevation: 0\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n"
            "api:\nconfig:\nonboarding:\nconversation:\n"
            "logger:\n  default: warning\n  logs:\n    custom_components.prima: info\n")
        # --skip-pip: nothing is fetched while tests run (setup installed the requirements)
        self.proc = subprocess.Popen(
            [str(HASS_PYTHON), "-m", "homeassistant", "-c", str(self.config), "--skip-pip"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.call("GET", "/api/onboarding", auth=False)
                break
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, f"hass exited:\n{self.log()}"
                assert time.monotonic() < deadline, f"hass did not answer:\n{self.log()}"
                time.sleep(0.5)
        self._onboard()

    def _onboard(self) -> None:
        """The first user, as the onboarding page creates it, and a token for it."""
        code = self.call("POST", "/api/onboarding/users", {
            "client_id": CLIENT_ID, "name": "Smoke", "username": "smoke",
            "password": "smoke-password-1", "language": "en"}, auth=False)["auth_code"]
        form = urllib.parse.urlencode({"grant_type": "authorization_code", "code": code,
                                       "client_id": CLIENT_ID}).encode()
        req = urllib.request.Request(f"{self.url}/auth/token", data=form, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.token = json.loads(resp.read())["access_token"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             auth: bool = True, timeout: float = 120) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            with err:
                raise AssertionError(f"{method} {path}: {err.code} {err.read()!r}\n"
                                     f"{self.log()[-4000:]}") from None
        return json.loads(raw) if raw else None

    def log(self) -> str:
        path = self.config / "home-assistant.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def head(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(default_model(), tmp_path / "head", ctx=2048, api_key=API_KEY,
                        extra=("--no-discovery",))
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_the_newest_release_sets_up_talks_and_generates(head: ServerProcess,
                                                         tmp_path: Path) -> None:
    if not HASS_PYTHON.exists() or RELEASE is None:
        pytest.fail(f"{HASS_PYTHON} is missing: run scripts/setup first")
    hass = Hass(tmp_path / "config")
    try:
        hass.start()
        version = hass.call("GET", "/api/config")["version"]
        assert version == RELEASE.group(1)

        flow = hass.call("POST", "/api/config/config_entries/flow", {"handler": "prima"})
        assert flow["type"] == "form" and flow["step_id"] == "user", flow
        done = hass.call("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                         {"url": f"127.0.0.1:{head.port}", "api_key": API_KEY})
        assert done["type"] == "create_entry", done

        deadline = time.monotonic() + 60
        agents: list[str] = []
        while not agents:
            assert time.monotonic() < deadline, hass.log()[-4000:]
            agents = [s["entity_id"] for s in hass.call("GET", "/api/states")
                      if s["entity_id"].startswith("conversation.prima")]
            time.sleep(0.5)
        said = hass.call("POST", "/api/conversation/process", {
            "text": "What is the capital of France?", "language": "en",
            "agent_id": agents[0]})
        response = said["response"]
        assert response["response_type"] == "action_done", said
        # the agent samples (temperature 0.6): an answer, whatever its words
        assert response["speech"]["plain"]["speech"].strip(), said

        made = hass.call("POST", "/api/services/prima/generate?return_response", {
            "prompt": "What is the capital of France? Answer in one sentence.",
            "max_tokens": 16, "temperature": 0})
        assert "Paris" in made["service_response"]["text"], made
    finally:
        hass.stop()
    log = hass.log()
    ours = [line for line in log.splitlines()
            if re.search(r"(ERROR|WARNING|CRITICAL) \([^)]*\) \[custom_components\.prima", line)
            or ("custom_components/prima" in line and "blocking" in line.lower())
            or ("custom integration 'prima'" in line and "not been tested" not in line)]
    assert not ours, "\n".join(ours)
