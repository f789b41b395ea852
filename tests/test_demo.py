"""``prima-node demo``: three real node processes on loopback answer one chat request."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
from conftest import ModelFactory


def test_the_demo_plans_a_three_node_ring_streams_an_answer_and_stops_every_node(
        make_model: ModelFactory) -> None:
    model = make_model("llama", "small", "Q8_0", seed=3)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    run = subprocess.run([sys.executable, "-m", "prima_node.cli", "demo", "--model", str(model),
                          "--max-tokens", "6", "--prompt", "Hello there"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    # the plan: three nodes, every layer held exactly once, per round
    rows = re.findall(r"^  (head|worker\d)\s+(?:head|worker)\s+layers (.+?)  \(", out, re.M)
    assert sorted(name for name, _ in rows) == ["head", "worker1", "worker2"], out
    held = sorted(i for _, windows in rows
                  for a, b in re.findall(r"\[(\d+), (\d+)\)", windows)
                  for i in range(int(a), int(b)))
    assert held == list(range(6)), out  # the small preset's six layers
    assert re.search(r"predicted [\d.]+ ms/token", out)
    # the answer streamed through the OpenAI API, then the measured timings of each node
    answer = out.split("> Hello there\n", 1)[1].split("\ntimings:", 1)[0]
    assert answer.strip(), out
    assert re.search(r"timings: 6 tokens, first token after [\d.]+ s", out), out
    assert len(re.findall(r"compute [\d.]+ ms/token \(predicted [\d.]+\)", out)) == 3, out
    assert out.rstrip().endswith("stopping the nodes")
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before  # no node left running


def test_a_model_that_cannot_be_read_is_one_line_and_no_node_is_left(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    run = subprocess.run([sys.executable, "-m", "prima_node.cli", "demo", "--model", str(bad),
                          "--nodes", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "prima-node: error:" in run.stderr and "truncated.gguf" in run.stderr
    assert "stopping the nodes" in run.stdout


def test_ctrl_c_mid_answer_stops_every_node(make_model: ModelFactory) -> None:
    """Ctrl-C while the answer streams: exit 130, and no node process outlives the demo."""
    import signal
    import time

    model = make_model("llama", "small", "Q8_0", seed=3)
    demo = subprocess.Popen([sys.executable, "-m", "prima_node.cli", "demo", "--model",
                             str(model), "--max-tokens", "2000", "--prompt", "Tell me a story"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the answer starts after the prompt is echoed
            if line.startswith("> Tell me a story"):
                break
        nodes = psutil.Process(demo.pid).children(recursive=True)
        assert len(nodes) == 3
        time.sleep(0.5)
        demo.send_signal(signal.SIGINT)
        rest = demo.communicate(timeout=60)[0]
        assert demo.returncode == 130, rest
        assert "stopping the nodes" in rest
        _, alive = psutil.wait_procs(nodes, timeout=5)
        assert not alive, [p.pid for p in alive]
    finally:
        if demo.poll() is None:
            demo.kill()
