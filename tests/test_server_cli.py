"""``prima-node serve`` as a user starts it: bad options and files are one clear line, a model
that cannot be loaded leaves the server up saying why, and SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ModelFactory
from tests.server_process import ServerProcess

SERVE = [sys.executable, "-m", "prima_node.cli", "serve"]


def run_serve(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVE, *args, "--state-dir", str(tmp)], capture_output=True,
                          text=True, timeout=60)


def test_help_explains_every_option() -> None:
    out = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=60).stdout
    for option in ("--model", "--host", "--port", "--api-key", "--api-key-file", "--ctx",
                   "--threads", "--queue-limit", "--cache-slots", "--state-dir", "--log-level",
                   "--cluster-secret", "--cluster-secret-file", "--head", "--peer", "--rounds",
                   "--all-nodes", "--link-dtype", "--prefill-pipeline", "--prefetch",
                   "--no-discovery", "--tls-cert", "--tls-key", "--tls-ca", "--advertise",
                   "--name"):
        assert option in out


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--ctx", "4"], "--ctx must be between"),
    (["--cache-slots", "0"], "--cache-slots must be between"),
    (["--api-key-file", "/nonexistent/key"], "cannot read the API key file"),
    (["--tls-cert", "/nonexistent/node.pem", "--tls-key", "/nonexistent/node.key"],
     "cannot read the TLS certificate or key /nonexistent/node.pem"),
    (["--tls-cert", "/tmp", "--tls-key", "/tmp"], "Is a directory"),
    (["--tls-cert", "/etc/hostname"], "TLS needs both --tls-cert and --tls-key"),
    (["--tls-ca", "/etc/hostname"], "--tls-ca needs --tls-cert and --tls-key"),
    (["--name", " "], "--name must be 1 to 64 printable characters"),
    (["--name", "a\nb"], "--name must be 1 to 64 printable characters"),
    (["--gpu-layers", "most"], "--gpu-layers takes a number, all or auto"),
    (["--gpu-layers", "-1"], "--gpu-layers cannot be negative"),
])
def test_bad_options_are_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path,
                                            make_model: ModelFactory) -> None:
    if "--model" not in args:
        args = [*args, "--model", str(make_model())]
    res = run_serve(*args, tmp=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_a_truncated_model_is_refused_before_listening(tmp_path: Path,
                                                       make_model: ModelFactory) -> None:
    data = make_model().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 2])
    res = run_serve("--model", str(bad), "--port", "0", tmp=tmp_path)
    assert res.returncode == 2 and "cut.gguf" in res.stderr and "Traceback" not in res.stderr


def test_a_busy_port_is_a_clear_error(tmp_path: Path, make_model: ModelFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_serve("--model", str(make_model()), "--port", str(port), tmp=tmp_path)
    assert res.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_model_that_fails_to_load_leaves_the_server_up_saying_why(
        tmp_path: Path, make_model: ModelFactory) -> None:
    """The header is fine, the architecture is not: the failure is only found while loading,
    and Home Assistant must still be able to show it rather than see a dead node."""
    data = make_model().read_bytes()
    i = data.index(b"general.architecture")
    j = data.index(b"llama", i)
    bad = tmp_path / "odd-arch.gguf"
    bad.write_bytes(data[:j] + b"lxama" + data[j + 5:])
    proc = subprocess.Popen([*SERVE, "--model", str(bad), "--port", "0", "--state-dir",
                             str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            code, body = _get(f"{base}/health")
            if body.get("status") != "loading" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert code == 503 and body["status"] == "failed"
        assert "lxama" in str(body["error"]) and "not supported" in str(body["error"])
        code, status = _get(f"{base}/api/status")
        assert code == 200 and status["state"] == "failed"
        req = urllib.request.Request(f"{base}/v1/chat/completions", method="POST", data=json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        err = json.loads(info.value.read())["error"]
        assert info.value.code == 503 and err["code"] == "model_failed"
        assert "lxama" in err["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_two_nodes_on_one_state_directory_do_not_collapse(tmp_path: Path,
                                                          make_model: ModelFactory) -> None:
    """The state directory holds the node's identity: a second node on the same directory
    would be the first one to the ring and to Home Assistant, so it is refused with a line
    that says which option to change; another directory gives another identity; and the
    directory is free again once the first node stops, however it stops."""
    model = make_model()
    state = tmp_path / "node"
    first = ServerProcess(model, state).start()
    try:
        res = run_serve("--model", str(model), "--port", "0", tmp=state)
        assert res.returncode == 2, res.stderr
        assert "--state-dir" in res.stderr and str(state) in res.stderr
        assert "Traceback" not in res.stderr
        second = ServerProcess(model, tmp_path / "other").start()
        try:
            ids = {node.wait_ready().status()["node_id"] for node in (first, second)}
            assert len(ids) == 2
        finally:
            second.stop()
    finally:
        first.kill()
    again = ServerProcess(model, state).start()  # the kernel dropped the killed node's hold
    try:
        assert again.wait_ready().status()["node_id"] == (state / "node-id").read_text().strip()
    finally:
        again.stop()


def test_a_node_is_known_by_the_name_it_is_given(tmp_path: Path,
                                                 make_model: ModelFactory) -> None:
    """Three nodes on one box are three names, not the host's name three times."""
    node = ServerProcess(make_model(), tmp_path / "state", extra=("--name", "Kitchen PC"))
    try:
        (me,) = node.start().wait_ready().status()["cluster"]["nodes"]
        assert me["name"] == "Kitchen PC"
    finally:
        node.stop()
    unnamed = ServerProcess(make_model(), tmp_path / "state")
    try:
        (me,) = unnamed.start().wait_ready().status()["cluster"]["nodes"]
        assert me["name"] == socket.gethostname()
    finally:
        unnamed.stop()
