"""A greedy continuation by this engine, with each step's logits: the shape of llama.cpp's
(``prima_node.reference.LlamaCpp.greedy``), for conformance checks here and on a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prima_node import Model


def engine_greedy(path: Path, prompt: list[int], n: int, **open_args: Any
                  ) -> tuple[list[int], list[np.ndarray]]:
    """Tokens and the logits each was chosen from (plus those after the last token)."""
    with Model.open(path, **open_args) as m:
        logits = [m.forward(prompt, session="g")]
        tokens: list[int] = []
        for _ in range(n):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(m.forward([tokens[-1]], session="g"))
    return tokens, logits
