"""The OpenAPI document (``GET /openapi.json``) held to the server it describes.

The document is written by hand, so everything here compares it with the code or with a live
``prima-node serve``: its structure (OpenAPI 3.2, JSON Schema 2020-12), its routes against the
aiohttp router, its request fields against what ``protocol`` accepts, its ranges against what the
server refuses, and its response schemas against real answers, with every object closed so that
a field the server sends but the document does not name fails the test.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from prima_node.generate import Finished, Timings
from prima_node.server import protocol
from prima_node.server.app import PUBLIC_PATHS, make_app
from prima_node.server.config import ServerConfig
from prima_node.server.openapi import openapi_document
from prima_node.server.responses import Reply
from prima_node.text.sampler import SamplingParams
from prima_node.text.tool_calls import ToolCall

KEY = "openapi-test-key"
DOC = openapi_document()
DOCS_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"
_URI = "urn:prima:openapi"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_CHAT = [{"role": "user", "content": "hi"}]


# -- validating against the document --------------------------------------------------------------


def _closed(node: Any) -> Any:
    """The document with every object schema that names its properties closed to others."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


@functools.cache
def _validator(name: str, *, strict: bool = True) -> Draft202012Validator:
    doc = _closed(copy.deepcopy(DOC)) if strict else DOC
    registry: Registry[Any] = Registry().with_resource(_URI, DRAFT202012.create_resource(doc))
    return Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{name}"},
                                registry=registry)


def _check(name: str, instance: Any) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in _validator(name).iter_errors(instance)]
    assert not errors, f"{name} does not match the server's answer:\n" + "\n".join(errors[:10])


def _pointer(doc: Any, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# A structural check of the parts of OpenAPI 3.2 the document uses (the official meta-schema is
# not available offline); the component schemas are checked as JSON Schema 2020-12 separately.
_EXT = {"^x-": {}}
_STR = {"type": "string"}
_OPENAPI_META: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "properties": {
        "openapi": {"const": "3.2.0"},
        "info": {"type": "object", "required": ["title", "version"],
                 "properties": {"title": _STR, "version": _STR, "description": _STR},
                 "patternProperties": _EXT, "additionalProperties": False},
        "tags": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": _STR, "description": _STR}, "additionalProperties": False}},
        "security": {"$ref": "#/$defs/security"},
        "paths": {"type": "object", "propertyNames": {"pattern": "^/"},
                  "additionalProperties": {"$ref": "#/$defs/pathItem"}},
        "components": {"type": "object", "additionalProperties": False, "properties": {
            "schemas": {"type": "object", "additionalProperties": {"type": ["object", "boolean"]}},
            "responses": {"type": "object", "additionalProperties": {"$ref": "#/$defs/response"}},
            "headers": {"type": "object", "additionalProperties": {"$ref": "#/$defs/header"}},
            "securitySchemes": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["type"],
                "properties": {"type": {"enum": ["apiKey", "http", "mutualTLS", "oauth2",
                                                 "openIdConnect"]},
                               "scheme": _STR, "description": _STR}}}}},
    },
    "patternProperties": _EXT,
    "additionalProperties": False,
    "$defs": {
        "ref": {"type": "object", "required": ["$ref"],
                "properties": {"$ref": {"type": "string", "pattern": "^#/components/"}}},
        "security": {"type": "array", "items": {
            "type": "object", "additionalProperties": {"type": "array", "items": _STR}}},
        "pathItem": {"type": "object", "minProperties": 1, "additionalProperties": False,
                     "properties": {**{m: {"$ref": "#/$defs/operation"} for m in _METHODS},
                                    "summary": _STR, "description": _STR}},
        "operation": {
            "type": "object", "required": ["responses", "operationId"],
            "properties": {
                "operationId": _STR, "summary": _STR, "description": _STR,
                "tags": {"type": "array", "items": _STR},
                "security": {"$ref": "#/$defs/security"},
                "requestBody": {"type": "object", "required": ["content"],
                                "properties": {"description": _STR,
                                               "required": {"type": "boolean"},
                                               "content": {"$ref": "#/$defs/content"}},
                                "additionalProperties": False},
                "responses": {"type": "object", "minProperties": 1,
                              "propertyNames": {"pattern": "^([1-5][0-9]{2}|[1-5]XX|default)$"},
                              "additionalProperties": {"anyOf": [{"$ref": "#/$defs/ref"},
                                                                 {"$ref": "#/$defs/response"}]}}},
            "patternProperties": _EXT, "additionalProperties": False},
        "response": {
            "type": "object", "required": ["description"],
            "properties": {"description": _STR,
                           "headers": {"type": "object", "additionalProperties": {
                               "anyOf": [{"$ref": "#/$defs/ref"}, {"$ref": "#/$defs/header"}]}},
                           "content": {"$ref": "#/$defs/content"}},
            "patternProperties": _EXT, "additionalProperties": False},
        "header": {"type": "object", "required": ["schema"],
                   "properties": {"description": _STR, "schema": {"type": "object"}},
                   "additionalProperties": False},
        "content": {"type": "object", "propertyNames": {"pattern": "^[a-z]+/[a-z0-9.+-]+$"},
                    "additionalProperties": {
                        "type": "object", "minProperties": 1,
                        "properties": {"schema": {"type": ["object", "boolean"]},
                                       "itemSchema": {"type": ["object", "boolean"]}},
                        "patternProperties": _EXT, "additionalProperties": False}},
    },
}


def test_the_document_is_well_formed_openapi_3_2() -> None:
    meta = Draft202012Validator(_OPENAPI_META)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in meta.iter_errors(DOC)]
    assert not errors, "\n".join(errors)
    for name, schema in DOC["components"]["schemas"].items():
        try:
            Draft202012Validator.check_schema(schema)
        except Exception as exc:
            pytest.fail(f"components.schemas.{name} is not JSON Schema 2020-12: {exc}")
    for node in _walk(DOC):
        if "$ref" in node:
            _pointer(DOC, node["$ref"])
    ops = [op for item in DOC["paths"].values() for m, op in item.items() if m in _METHODS]
    ids = [op["operationId"] for op in ops]
    assert len(ids) == len(set(ids)), f"operationIds repeat: {ids}"
    schemes = set(DOC["components"]["securitySchemes"])
    tags = {t["name"] for t in DOC["tags"]}
    for op in ops:
        for requirement in op.get("security", DOC["security"]):
            assert set(requirement) <= schemes
        assert set(op["tags"]) <= tags
    # openapi_document() hands out a fresh copy: a caller's change does not leak into the next
    doc = openapi_document()
    doc["paths"].clear()
    assert openapi_document() == DOC


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    app = make_app(ServerConfig(model_path=Path("x.gguf"), n_ctx=256))
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.resource is not None}
    gets = {path for method, path in routes if method == "get"}
    # aiohttp adds a HEAD route beside every GET by itself; the document describes the GETs
    assert {path for method, path in routes if method == "head"} <= gets
    served = {(m, p) for m, p in routes if m != "head"}
    documented = {(m, p) for p, item in DOC["paths"].items() for m in item if m in _METHODS}
    assert served == documented
    public = {p for p, item in DOC["paths"].items()
              for m, op in item.items() if m in _METHODS and op.get("security") == []}
    assert public == set(PUBLIC_PATHS)


def _request_schema(name: str) -> dict[str, Any]:
    return DOC["components"]["schemas"][name]  # type: ignore[no-any-return]


def test_request_fields_are_exactly_the_ones_the_server_accepts() -> None:
    for name, accepted in (("ChatCompletionRequest", protocol._CHAT_FIELDS),
                           ("CompletionRequest", protocol._COMPLETION_FIELDS)):
        schema = _request_schema(name)
        assert set(schema["properties"]) == set(accepted), name
        assert schema["additionalProperties"] is False, name
        for field, prop in schema["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
    chat = _request_schema("ChatCompletionRequest")
    options = chat["properties"]["stream_options"]
    # the server checks stream_options' own fields too
    with pytest.raises(protocol.RequestError) as err:
        protocol.parse_chat_request({"messages": _CHAT, "stream": True,
                                     "stream_options": {"no_such_option": True}})
    assert err.value.code == "unknown_field"
    for option in options["properties"]:
        protocol.parse_chat_request({"messages": _CHAT, "stream": True,
                                     "stream_options": {option: True}})


def test_documented_defaults_are_the_servers() -> None:
    sampling = SamplingParams()
    chat = protocol.parse_chat_request({"messages": _CHAT})
    text = protocol.parse_completion_request({"prompt": "x"})
    streamed = protocol.parse_chat_request({"messages": _CHAT, "stream": True,
                                            "stream_options": {}})
    for req, name in ((chat, "ChatCompletionRequest"), (text, "CompletionRequest")):
        props = _request_schema(name)["properties"]
        actual: dict[str, Any] = {
            "stream": req.stream, "cache_prompt": req.cache_prompt,
            **{f: getattr(req.sampling, f) for f in protocol._SAMPLING_FIELDS
               if f != "logit_bias"}}
        if isinstance(req, protocol.ChatRequest):
            actual["tool_choice"] = req.tool_choice
        for field, value in actual.items():
            assert props[field].get("default") == value, f"{name}.{field}"
        # seed: none documented, a fresh one per request
        assert sampling.seed is None and "default" not in props["seed"]
        assert props["n"]["default"] == 1
        assert props["stream_options"]["properties"]["include_usage"]["default"] \
            == streamed.include_usage
        documented = {f for f, p in props.items() if "default" in p}
        assert documented <= set(actual) | {"n", "max_tokens"}, documented - set(actual)
    assert chat.max_tokens is None
    assert "default" not in _request_schema("ChatCompletionRequest")["properties"]["max_tokens"]
    assert _request_schema("CompletionRequest")["properties"]["max_tokens"]["default"] \
        == text.max_tokens


def test_tool_call_shapes_match() -> None:
    """Tool calls as the server serialises them (a random-weight model rarely makes one)."""
    timings = Timings(prompt_tokens=12, cached_tokens=4, prefill_s=0.01, completion_tokens=7,
                      decode_s=0.02, decode_steps=6, first_token_s=0.012)
    fin = Finished("tool_calls", timings, tokens=(1, 2, 3), seed=7)
    call = ToolCall(id="call_1", name="lights_off", arguments='{"room": "kitchen"}')
    whole = Reply(model="m", chat=True)
    whole.calls.append(call)
    body = whole.whole(fin)
    assert body["choices"][0]["message"]["content"] is None
    _check("ChatCompletion", json.loads(json.dumps(body)))
    stream = Reply(model="m", chat=True, include_usage=True)
    chunks = [stream.first_chunk(), stream.call_chunk(call), *stream.final_chunks(fin)]
    for chunk in chunks:
        _check("ChatCompletionChunk", json.loads(json.dumps(chunk)))



def test_a_stream_that_fails_part_way_ends_with_a_documented_error_event() -> None:
    """What the server writes when a node fails after the headers went out (the live server
    below cannot be made to fail): the chunks so far, then an Error in place of [DONE]."""
    from prima_node.errors import ClusterError
    from prima_node.server.app import _node_failed
    from prima_node.server.responses import sse

    reply = Reply(model="m", chat=True)
    raw = (sse(reply.first_chunk()) + sse(reply.text_chunk("The"))
           + sse(_node_failed(ClusterError("node b stopped answering")).body()))
    taken = _check_stream("/v1/chat/completions", raw)
    assert taken == ["ChatCompletionChunk", "ChatCompletionChunk", "Error"]
    with pytest.raises(AssertionError):  # and the check can fail: a chunk is not an error
        _check_stream("/v1/completions", sse(reply.first_chunk()))


# -- a live server --------------------------------------------------------------------------------


class Live:
    def __init__(self, url: str, proc: subprocess.Popen[str], log: list[str]) -> None:
        self.url, self.proc, self.log = url, proc, log

    def request(self, method: str, path: str, body: Any = None, *, key: str | None = KEY,
                ) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, method: str, path: str, body: Any = None, *, key: str | None = KEY,
             status: int = 200) -> Any:
        code, _, raw = self.request(method, path, body, key=key)
        assert code == status, f"{method} {path}: {code} {raw[:300]!r}"
        return json.loads(raw)


@pytest.fixture(scope="module")
def live(make_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    model = make_model()
    state = tmp_path_factory.mktemp("openapi-state")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prima_node.cli", "serve", "--model", str(model), "--port", "0",
         "--ctx", "256", "--api-key", KEY, "--state-dir", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    listening = threading.Event()
    url: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url.append(m.group(1))
                listening.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert listening.wait(60), "the server did not start:\n" + "".join(log)
        server = Live(url[0], proc, log)
        deadline = time.monotonic() + 120
        while server.request("GET", "/health", key=None)[0] != 200:
            assert proc.poll() is None, "the server exited:\n" + "".join(log)
            assert time.monotonic() < deadline, "the model did not load:\n" + "".join(log)
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _sse(raw: bytes) -> list[Any]:
    events = [line[len("data: "):] for line in raw.decode().split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def _sse_events(raw: bytes) -> list[dict[str, str]]:
    """The events of a stream as OpenAPI 3.2 models them: an object of its fields."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        event: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            event[name] = value[1:] if value.startswith(" ") else value
        out.append(event)
    return out


def _check_stream(path: str, raw: bytes) -> list[str]:
    """Every event of ``raw`` against the itemSchema the document gives ``path``'s stream, with
    the JSON in ``data`` decoded and held to the ``contentSchema`` of exactly one branch (which
    JSON Schema only annotates). The names of the branches taken, in order."""
    media = DOC["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
    name = media["itemSchema"]["$ref"].rsplit("/", 1)[1]
    branches = DOC["components"]["schemas"][name]["properties"]["data"]["anyOf"]
    taken = []
    for event in _sse_events(raw):
        _check(name, event)
        fits = []
        for branch in branches:
            if "const" in branch:
                if event["data"] == branch["const"]:
                    fits.append(branch["const"])
                continue
            assert branch["contentMediaType"] == "application/json"
            target = branch["contentSchema"]["$ref"].rsplit("/", 1)[1]
            try:
                data = json.loads(event["data"])
            except json.JSONDecodeError:
                continue
            if not list(_validator(target).iter_errors(data)):
                fits.append(target)
        assert len(fits) == 1, (event, fits)
        taken += fits
    return taken


def test_real_answers_match_the_response_schemas(live: Live) -> None:
    chat = live.json("POST", "/v1/chat/completions",
                     {"messages": _CHAT, "max_tokens": 4, "seed": 1})
    _check("ChatCompletion", chat)

    code, headers, raw = live.request("POST", "/v1/chat/completions", {
        "messages": _CHAT, "max_tokens": 4, "seed": 1, "stream": True,
        "stream_options": {"include_usage": True}})
    assert code == 200 and headers["Content-Type"].startswith("text/event-stream")
    chunks = _sse(raw)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    assert any("timings" in c for c in chunks)
    for chunk in chunks:
        _check("ChatCompletionChunk", chunk)
    taken = _check_stream("/v1/chat/completions", raw)
    assert taken == ["ChatCompletionChunk"] * len(chunks) + ["[DONE]"]

    text = live.json("POST", "/v1/completions", {"prompt": "Once upon", "max_tokens": 3})
    _check("Completion", text)
    code, _, raw = live.request("POST", "/v1/completions", {
        "prompt": [1, 2, 3], "max_tokens": 3, "stream": True})
    assert code == 200
    for chunk in _sse(raw):
        _check("CompletionChunk", chunk)
    assert _check_stream("/v1/completions", raw)[-1] == "[DONE]"

    _check("ModelList", live.json("GET", "/v1/models"))
    status = live.json("GET", "/api/status")
    assert status["last_request"] is not None  # the generations above were recorded
    _check("StatusDocument", status)
    for stamp in (status["started_at"], status["last_request"]["at"]):
        datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")  # date-time, as documented
    _check("Health", live.json("GET", "/health", key=None))


def test_real_errors_match_the_error_schema(live: Live) -> None:
    cases = [
        ("POST", "/v1/chat/completions", {"messages": _CHAT, "max_token": 3}, KEY, 400),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user",
                                                        "content": "word " * 400}]}, KEY, 400),
        ("POST", "/v1/completions", {"prompt": "x", "temperature": 9}, KEY, 400),
        ("GET", "/api/status", None, "wrong", 401),
        ("GET", "/v1/models", None, None, 401),
        ("GET", "/no/such/path", None, KEY, 404),
        ("DELETE", "/health", None, KEY, 405),
        ("GET", "/api/events", None, KEY, 400),  # not a websocket handshake
        ("GET", "/api/link", None, KEY, 400),
        ("GET", "/api/link", None, None, 401),
        ("POST", "/v1/completions", "x" * (17 << 20), KEY, 413),  # over the 16 MiB limit
    ]
    for method, path, body, key, status in cases:
        error = live.json(method, path, body, key=key, status=status)
        _check("Error", error)
        documented = DOC["paths"].get(path, {}).get(method.lower(), {}).get("responses", {})
        assert status in (404, 405) or str(status) in documented, (method, path, status)
    code, _, raw = live.request("POST", "/v1/completions", None)  # no body: not JSON
    assert code == 400
    _check("Error", json.loads(raw))


def test_the_events_websocket_sends_documented_messages(live: Live) -> None:
    async def first_message() -> Any:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                live.url + "/api/events", headers={"Authorization": f"Bearer {KEY}"}) as ws:
            return await ws.receive_json(timeout=10)

    _check("StatusEvent", asyncio.run(first_message()))


def test_security_is_what_the_server_enforces(live: Live) -> None:
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            body = {} if method == "post" else None
            code, _, raw = live.request(method.upper(), path, body, key=None)
            if path == "/cluster/ws":  # admitted by the cluster secret; this node is alone
                assert code == 404 and json.loads(raw)["error"]["code"] == "not_a_cluster_node"
            elif op.get("security") == []:
                assert code == 200, f"{method} {path} is documented as public: {code}"
            else:
                assert code == 401, f"{method} {path} is documented as needing the key: {code}"
                assert json.loads(raw)["error"]["code"] == "invalid_api_key"


def test_the_server_publishes_this_document(live: Live) -> None:
    assert live.json("GET", "/openapi.json", key=None) == DOC


def test_documented_metrics_are_the_ones_served(live: Live) -> None:
    code, headers, raw = live.request("GET", "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", raw.decode(), re.M))
    described = DOC["paths"]["/metrics"]["get"]["description"]
    documented = dict(re.findall(r"^- `(prima_\w+)` \((\w+)\)", described, re.M))
    assert served == documented


# -- the documented ranges against the server's refusals ------------------------------------------


def _json_types(value: Any) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"integer", "number"} if value.is_integer() else {"number"}
    return {str: {"string"}, list: {"array"}, dict: {"object"}}[type(value)]


def _probes(prop: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Values the schema allows at its limits, and values just beyond them."""
    allowed: list[Any] = []
    beyond: list[Any] = []
    for key, step in (("minimum", -1), ("maximum", 1)):
        if key in prop:
            allowed.append(prop[key])
            beyond.append(prop[key] + step)
    if "exclusiveMinimum" in prop:
        beyond.append(prop["exclusiveMinimum"])
    if "enum" in prop:
        allowed += [v for v in prop["enum"] if v is not None]
        beyond.append("x")
    elif "type" in prop:
        types = {prop["type"]} if isinstance(prop["type"], str) else set(prop["type"])
        beyond.append(next(v for v in ("x", 1.5, {}) if not _json_types(v) & types))
    elif "anyOf" in prop:
        beyond.append({})
    return allowed, beyond


@pytest.mark.parametrize("schema_name,path,base", [
    ("ChatCompletionRequest", "/v1/chat/completions", {"messages": _CHAT, "max_tokens": 1}),
    ("CompletionRequest", "/v1/completions", {"prompt": "Once", "max_tokens": 1}),
])
def test_documented_limits_are_the_servers(live: Live, schema_name: str, path: str,
                                           base: dict[str, Any]) -> None:
    request_schema = _validator(schema_name, strict=False)
    probed = 0
    for field, prop in _request_schema(schema_name)["properties"].items():
        allowed, beyond = _probes(prop)
        for value in beyond:
            body = {**base, field: value}
            assert not request_schema.is_valid(body), f"{field}={value!r} is documented valid"
            err = live.json("POST", path, body, status=400)["error"]
            assert re.match(rf"{field}\b", err["param"] or ""), (field, value, err)
            probed += 1
        for value in allowed:
            body = {**base, field: value}
            if field == "max_tokens" and "max_completion_tokens" in body:
                continue
            assert request_schema.is_valid(body), f"{field}={value!r} is documented invalid"
            live.json("POST", path, body)
            probed += 1
    ignored = {f: {"any": ["thing"]} for f, p in _request_schema(schema_name)["properties"].items()
               if set(p) == {"description"}}
    assert ignored, "the OpenAI fields without effect should be documented as such"
    live.json("POST", path, {**base, **ignored})
    assert probed > 20
    code, _, raw = live.request("POST", path, {**base, "no_such_field": 1})
    assert code == 400 and json.loads(raw)["error"]["code"] == "unknown_field"


# -- a node still loading -------------------------------------------------------------------------


def test_a_loading_node_answers_as_documented() -> None:
    async def run() -> None:
        app = make_app(ServerConfig(model_path=Path("absent.gguf"), n_ctx=256))
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/health")
            assert resp.status == 503
            _check("Health", await resp.json())
            resp = await client.post("/v1/chat/completions", json={"messages": _CHAT})
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            body = await resp.json()
            assert body["error"]["code"] == "model_loading"
            _check("Error", body)
            documented = DOC["paths"]["/v1/chat/completions"]["post"]["responses"]["503"]
            assert "Retry-After" in _pointer(DOC, documented["$ref"])["headers"]
            status = await (await client.get("/api/status")).json()
            assert status["state"] == "loading"
            _check("StatusDocument", status)
            _check("ModelList", await (await client.get("/v1/models")).json())

    asyncio.run(run())


# -- docs/api.md ----------------------------------------------------------------------------------


def test_the_reference_covers_every_field_path_metric_and_error_code() -> None:
    text = DOCS_MD.read_text(encoding="utf-8")
    names = set(protocol._CHAT_FIELDS | protocol._COMPLETION_FIELDS)
    names |= {f"{m.upper()} {p}" for p, item in DOC["paths"].items() for m in item
              if m in _METHODS}
    described = DOC["paths"]["/metrics"]["get"]["description"]
    names |= set(re.findall(r"`(prima_\w+)`", described))
    server = Path(protocol.__file__).parent
    for source in server.glob("*.py"):
        names |= set(re.findall(r'code="(\w+)"', source.read_text(encoding="utf-8")))
    names |= set(DOC["components"]["schemas"]["StatusDocument"]["properties"])
    names |= set(DOC["components"]["schemas"]["Timings"]["properties"])
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/api.md does not mention: {missing}"
