"""Shared fixtures: synthetic GGUF models written once per test session by the project's tool."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prima_node.synth.writer import write_model

ModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """Write (or reuse within the session) a synthetic model with the given options."""
    root = tmp_path_factory.mktemp("models")
    made: dict[tuple[object, ...], Path] = {}

    def factory(arch: str = "llama", preset: str = "tiny", quant: str = "F16",
                vocab: str = "bpe", seed: int = 0, layers: int | None = None) -> Path:
        key = (arch, preset, quant, vocab, seed, layers)
        if key not in made:
            name = f"{arch}-{preset}-{quant}-{vocab}-s{seed}-l{layers}.gguf"
            made[key] = write_model(root / name, arch=arch, preset=preset, quant=quant,
                                    seed=seed, vocab=vocab, n_layer=layers)
        return made[key]

    return factory


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the measured llama.cpp conformance table after the run (not a test of its own)."""
    module = sys.modules.get("test_conformance")
    lines = module.summary_lines() if module is not None else []
    if lines:
        terminalreporter.section("conformance with llama.cpp (max |logit diff| / max |logit|)")
        for line in lines:
            terminalreporter.write_line(line)
