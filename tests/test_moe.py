"""Mixtures of experts: what a token reads is what the planner prices.

A layer of Qwen3-MoE holds all its experts, but a decode step reads only the few its router
picks. The planner's profile says how many bytes that is (``LayerProfile.touched_bytes``);
here the engine runs one decode step on a cold file and the kernel's own page cache
(``mincore``) says which pages it read. Readahead is off for the mapping (``MADV_RANDOM``), so
a page in memory is a page ggml asked for. (Logits against llama.cpp: tests/test_conformance.py;
a ring of them: tests/test_cluster.py.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from prima_node import Model
from prima_node.engine.paging import PAGE, WindowPages
from prima_node.planner.model_profile import from_gguf
from prima_node.synth.writer import write_model

MADV_RANDOM = 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and madvise: Linux")
@pytest.mark.parametrize(("arch", "quant"), [("qwen3moe", "F16"), ("gpt-oss", "MXFP4_MOE")])
def test_a_decode_step_reads_the_experts_it_routes_to_and_no_others(tmp_path: Path, arch: str,
                                                                    quant: str) -> None:
    """gpt-oss's experts also have a bias row each, read for the experts a token uses."""
    # a file of its own: pages another process maps (a test ring's nodes) cannot be evicted
    path = write_model(tmp_path / "moe.gguf", arch=arch, preset="small", quant=quant)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be evicted: the file was written a moment ago
    finally:
        os.close(fd)
    profile = from_gguf(path)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    with Model.open(path, threads=2, n_ctx=64, repack=False) as m:
        cfg = m.config
        names = [n for n in m.file.tensors if n.startswith("blk.0.")]
        n_tensors, n_experts = len(names), sum("_exps." in n for n in names)
        prompt = [int(t) for t in np.random.default_rng(3).integers(3, m.n_vocab, 8)]
        m.forward(prompt, session="s")  # a prefill reads most experts: evicted below
        mapping = m.file._require_reader().data
        base, size = int(mapping.ctypes.data), len(mapping)
        assert libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(size), MADV_RANDOM) == 0
        layers = [WindowPages.of_layers(m.file, [i]) for i in range(cfg.n_layer)]
        for pages in layers:
            pages.release()
        assert sum(p.resident_bytes() or 0 for p in layers) == 0
        m.forward([prompt[-1]], session="s")
        read = [p.resident_bytes() for p in layers]
    expert_share = cfg.n_expert_used / cfg.n_expert
    assert expert_share <= 0.25  # a real test: most of each layer stays on disk
    for i, (got, layer) in enumerate(zip(read, profile.layers, strict=True)):
        assert got is not None
        # each tensor, and each expert's slice of the expert tensors, may share a page with
        # its neighbour at either end
        slack = 2 * PAGE * (len(layer.bytes_by_type) + n_tensors + n_experts * cfg.n_expert_used)
        assert layer.touched_bytes <= got + 2 * PAGE * n_tensors, (i, got, layer.touched_bytes)
        assert got <= layer.touched_bytes + slack, (i, got, layer.touched_bytes)
        assert got < 0.5 * layer.bytes


def test_a_node_leaves_a_mixture_s_experts_to_the_page_cache(tmp_path: Path) -> None:
    """What the pager prefetches and releases of a qwen3moe window is everything but the
    expert tensors (a token reads a few experts, unknown before routing)."""
    from prima_node.engine.paging import is_expert

    path = write_model(tmp_path / "moe.gguf", arch="qwen3moe", preset="tiny", quant="F16")
    with Model.open(path, n_ctx=64, repack=False) as m:
        w = m.window(0, 2)
        experts = {t.byte_range for n, t in m.file.tensors.items() if is_expert(n)}
        assert len(experts) == 6  # gate, up and down of each of the two layers
        pages = WindowPages.of_window(m.file, w)
        held = sum(b - a for a, b in w.byte_ranges())
        shared = held - sum(b - a for a, b in experts)
        assert shared < pages.n_bytes <= shared + 2 * PAGE * 32  # page-rounded ranges
        parts = WindowPages.parts_in_use_order(m.file, range(2))
        # each part is one tensor's pages: none but the shared tensors' (page-rounded)
        assert shared <= sum(p.n_bytes for p in parts) <= shared + 2 * PAGE * len(parts)
        for p in parts:
            for a, b in p.ranges:
                assert all(min(b, eb) - max(a, ea) <= PAGE for ea, eb in experts)
