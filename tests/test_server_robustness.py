"""Hostile and unlucky inputs against a live node: each is a 4xx naming the problem, the node
keeps serving, and stopping it never runs the queue to completion first.

Each case here was once a 500, a runaway allocation or a slow shutdown (found in review).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prima_node.text.tokenizer import Tokenizer
from tests.conftest import ModelFactory
from tests.server_process import ServerProcess

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(make_model: ModelFactory, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    srv = ServerProcess(make_model(), tmp_path_factory.mktemp("state"), ctx=1024,
                        cache_slots=2).start()
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def raw_post(srv: ServerProcess, path: str, data: bytes, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(srv.url + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def chat(srv: ServerProcess, **fields: Any) -> tuple[int, dict[str, Any]]:
    status, body = srv.post("/v1/chat/completions", {"messages": USER, "max_tokens": 4,
                                                      "temperature": 0, **fields})
    return status, json.loads(body)


@pytest.mark.parametrize(("data", "headers", "code"), [
    (b"[" * 5000 + b"]" * 5000, {}, "invalid_json"),
    (b'{"seed": ' + b"9" * 5000 + b"}", {}, "invalid_json"),
    (b'{"messages": []}', {"Content-Encoding": "gzip"}, "invalid_body"),
    (b"\xff\xfe not utf-8", {}, "invalid_json"),
])
def test_malformed_bodies_are_400(server: ServerProcess, data: bytes, headers: dict[str, str],
                                  code: str) -> None:
    status, body = raw_post(server, "/v1/chat/completions", data, headers)
    assert status == 400 and body["error"]["code"] == code, body


@pytest.mark.parametrize(("fields", "param"), [
    ({"stop": "x" * 200_000}, "stop"),
    ({"repeat_last_n": 10**30}, "repeat_last_n"),
    ({"tool_choice": {"type": "function", "function": "x"}}, "tool_choice"),
])
def test_oversized_or_odd_fields_are_refused_by_name(server: ServerProcess,
                                                     fields: dict[str, Any], param: str) -> None:
    status, body = chat(server, **fields)
    assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/completions", {"prompt": "x", "echo": 0.0}, "echo"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                               "strict": []}}},
     "response_format.json_schema.strict"),
])
def test_what_the_api_document_refuses_the_server_refuses(
        server: ServerProcess, path: str, fields: dict[str, Any], param: str) -> None:
    """Values /openapi.json does not allow (echo only false, strict a boolean) are 400s,
    not quietly taken."""
    status, raw = server.post(path, {"max_tokens": 2, **fields})
    body = json.loads(raw)
    assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/completions", {"prompt": "x\udc80y"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["ok", "\udfff"]}, "stop[1]"),
])
def test_a_lone_surrogate_is_refused_by_name(server: ServerProcess, path: str,
                                             fields: dict[str, Any], param: str) -> None:
    """JSON can spell text no tokenizer can encode; the answer is a 400 naming where."""
    status, raw = server.post(path, {"max_tokens": 2, **fields})
    body = json.loads(raw)
    assert status == 400 and body["error"]["param"] == param, body
    assert "lone surrogate" in body["error"]["message"]


def test_a_schema_that_compiles_but_admits_nothing_is_a_400(server: ServerProcess) -> None:
    recursive = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    status, body = chat(server, response_format={
        "type": "json_schema", "json_schema": {"name": "r", "schema": recursive}})
    assert status == 400 and body["error"]["param"] == "response_format", body
    assert "admits no document" in body["error"]["message"]
    assert chat(server)[0] == 200  # and the node goes on serving


def test_template_arguments_cannot_collide_with_the_servers_own(server: ServerProcess) -> None:
    status, body = chat(server, chat_template_kwargs={"self": 1, "bos_token": "<s>"})
    assert status == 200, body  # just template variables: no clash with any signature


def test_out_of_vocabulary_prompt_ids_name_the_prompt(server: ServerProcess) -> None:
    status, raw = server.post("/v1/completions", {"prompt": [1, 2, 10**9]})
    body = json.loads(raw)
    assert status == 400 and body["error"]["param"] == "prompt"
    assert str(10**9) in body["error"]["message"]


def test_a_refused_uncached_request_keeps_the_slot_it_would_have_used(
        server: ServerProcess) -> None:
    """cache_prompt: false clears a slot, but only for a request that is going to run."""
    system = {"role": "system", "content": "You run the house. " * 40}
    first = [system, {"role": "user", "content": "kitchen"}]
    status, _ = chat(server, messages=first)
    assert status == 200
    for _ in range(2):  # whichever slot the refused request would take
        status, body = chat(server, messages=[{"role": "user", "content": "x"}],
                            cache_prompt=False, logit_bias={"99999999": 1})
        assert status == 400, body
    status, body = chat(server, messages=[system, {"role": "user", "content": "hall"}])
    assert status == 200
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > body["usage"]["prompt_tokens"] // 2, body["usage"]


def test_sigterm_refuses_the_queue_instead_of_running_it(make_model: ModelFactory,
                                                         tmp_path: Path) -> None:
    path = make_model(preset="small", quant="Q8_0")  # slow enough to keep a queue
    srv = ServerProcess(path, tmp_path, ctx=4096).start()
    try:
        _check_sigterm_with_a_queue(srv, path)
    finally:
        srv.kill()  # no-op once it has exited; a failed check must not leave it running


def _check_sigterm_with_a_queue(srv: ServerProcess, path: Path) -> None:
    srv.wait_ready()
    never_end = {str(t): -100 for t in Tokenizer.open(path).eog_ids}
    results: list[tuple[int, bytes]] = []

    def long_request() -> None:
        results.append(srv.post("/v1/chat/completions", {
            "messages": USER, "max_tokens": 4000, "logit_bias": never_end}, timeout=120))

    workers = [threading.Thread(target=long_request) for _ in range(3)]
    for w in workers:
        w.start()
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while srv.status()["queue"]["waiting"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.status()["queue"] == {"running": 1, "waiting": 2, "limit": 32}
    t0 = time.monotonic()
    rc = srv.stop(timeout=30)
    took = time.monotonic() - t0
    for w in workers:
        w.join(30)
    assert rc == 0 and took < 10, (rc, took, srv.log())
    codes = sorted(code for code, _ in results)
    assert codes == [503, 503, 503], results
    reasons = sorted(json.loads(body)["error"]["code"] for _, body in results)
    assert reasons == ["cancelled", "shutting_down", "shutting_down"], results
