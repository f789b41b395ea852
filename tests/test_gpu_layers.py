"""GPU layers: a window's first layers on another ggml device, the rest on the CPU.

CI has no GPU, so the split runs here with the CPU standing in for the GPU (``gpu="CPU"``):
the GPU layers' weights and caches are copied into ggml's own buffers and computed by a second
backend, exactly the path a CUDA, Metal or Vulkan device takes, only the kernels differ. Their
products are the same kernels, so the logits must be the CPU-only model's to the bit (decode
steps may differ by rounding where the CPU-only model repacks its matrices). The same checks
on a real GPU, against llama.cpp built for it, are ``scripts/gpu-check``.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import ModelFactory

from prima_node import Model, ggml
from prima_node.engine.backend import ALIGNMENT, ComputeError
from prima_node.engine.gpu import (
    AUTO_KV_SESSIONS,
    AUTO_RESERVE_BYTES,
    GpuUnavailableError,
    SplitWindow,
    auto_gpu_layers,
    find_gpus,
    gpu_unavailable,
    idle_gpu_backends,
    no_gpu_reason,
)
from prima_node.engine.tensors import layer_tensor_infos, output_name

STAND_IN = "CPU"
CASES = [("llama", "Q4_K_M"), ("qwen2", "F16"), ("qwen3", "Q8_0")]


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, vocab, n)]


@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_split_windows_give_the_cpu_logits(make_model: ModelFactory, arch: str,
                                           quant: str) -> None:
    path = make_model(arch, "tiny", quant, layers=4)
    with Model.open(path, n_ctx=64, repack=False) as m:
        ids = _prompt(21, m.config.n_vocab)
        ref = m.logits(ids)
        m.forward(ids[:17], session="d")
        ref_steps = [m.forward([t], session="d") for t in ids[17:]]
    for n in (1, 3, 4):  # the first layer, all but one, every layer (the output too)
        with Model.open(path, n_ctx=64, repack=False, gpu=STAND_IN, gpu_layers=n) as m:
            assert m.gpu_layers == n and m.describe()["gpu_layers"] == n
            assert m.accel is not None and m.accel.has_output == (n == 4)
            np.testing.assert_array_equal(m.logits(ids), ref)
            m.forward(ids[:17], session="d")
            for t, want in zip(ids[17:], ref_steps, strict=True):
                np.testing.assert_array_equal(m.forward([t], session="d"), want)


def test_gpu_layers_compute_from_copies_and_count_their_memory(
        make_model: ModelFactory) -> None:
    path = make_model("llama", "tiny", "Q8_0", layers=4)
    with Model.open(path, n_ctx=64, gpu=STAND_IN) as m:
        assert m.gpu_layers == 0 and m.accel is not None and not m.accel.has_output
        w = m.window(0, 4, gpu_layers=3)
        assert isinstance(w, SplitWindow)
        mapping = (m.buffer.base, m.buffer.base + m.buffer.size)
        gpu_weights = w.gpu.weights.tensors.values()
        # the GPU part reads copies (outside the file mapping), the CPU part the mapping
        g = ggml.load()
        assert all(not mapping[0] <= g.tensor(t).data < mapping[1] for t in gpu_weights)
        assert w.cpu is not None
        assert all(mapping[0] <= g.tensor(t).data < mapping[1]
                   for t in w.cpu.weights.tensors.values())
        # only the CPU layer's bytes are paged; the GPU holds three layers' weights
        assert w.byte_ranges() == m.window(3, 4).byte_ranges()
        layer_bytes = sum(t.n_bytes for i in range(3)
                          for t in layer_tensor_infos(m.file, m.config, i).values())
        assert layer_bytes <= w.device_bytes < layer_bytes + 64 * 64
        before = m.device_bytes
        h = m.embed(_prompt(5, m.config.n_vocab))
        w.forward(h, np.arange(5), "s")
        kv = 3 * 2 * m.config.n_embd_kv * 64 * 2  # three layers' K and V, float16, 64 rows
        assert m.device_bytes == before + kv
        w.drop("s")
        assert m.device_bytes == before


def test_a_gpu_sharing_the_host_s_memory_reads_the_mapping_in_place(
        make_model: ModelFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metal on Apple silicon wraps the file's mapping in its own buffers instead of copying
    the GPU layers (one memory: a copy would hold them twice). The CPU stand-in takes that
    path when told to map as Metal does (ggml's CPU device can wrap host memory too): the
    same logits, the GPU layers' weights read from the mapping through buffers that span only
    their own bytes (Metal keeps what it wraps resident), not paged, and the GPU's memory
    holds only their caches and the small end tensors' copies."""
    from prima_node.engine import gpu

    g = ggml.load()
    assert g.caps(g.cpu_device).buffer_from_host_ptr  # what the stand-in's mapping needs
    path = make_model("qwen3", "tiny", "Q8_0", layers=4)
    with Model.open(path, n_ctx=64, repack=False) as m:
        ids = _prompt(19, m.config.n_vocab)
        ref = m.logits(ids)
    with Model.open(path, n_ctx=64, repack=False, gpu=STAND_IN, gpu_layers=2) as m:
        assert m.accel is not None and m.accel.map_on is None  # the stand-in copies
        copied_ends = m.accel.device_bytes
    monkeypatch.setattr(gpu, "reads_file_mapping",
                        lambda device, info: bool(ggml.load().caps(device).buffer_from_host_ptr))
    for n in (2, 4):  # a split window, and every layer with the output
        with Model.open(path, n_ctx=64, repack=False, gpu=STAND_IN, gpu_layers=n) as m:
            assert m.accel is not None and m.accel.map_on is not None
            np.testing.assert_array_equal(m.logits(ids), ref)
            assert m.accel.device_bytes == copied_ends  # the output projection is mapped
            w = m.window(0, 4, gpu_layers=n)
            assert isinstance(w, SplitWindow)
            mapping = (m.buffer.base, m.buffer.base + m.buffer.size)
            assert all(mapping[0] <= g.tensor(t).data < mapping[1]
                       for t in w.gpu.weights.tensors.values())
            own = [t for i in range(n) for t in layer_tensor_infos(m.file, m.config, i).values()]
            # their own bytes and the alignment padding between them, nothing more
            assert 0 <= w.gpu.weights.mapped_bytes - sum(t.n_bytes for t in own) \
                < ALIGNMENT * (len(own) + 1)
            assert w.byte_ranges() == (m.window(n, 4).byte_ranges() if n < 4 else [])
            assert w.device_bytes == 0
            w.forward(m.embed(ids[:5]), np.arange(5), "s")
            assert w.device_bytes == n * 2 * m.config.n_embd_kv * 64 * 2  # only caches
            w.close()


def test_gpu_layers_metal_maps_leave_less_room_for_repacked_copies(
        make_model: ModelFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring node repacks its CPU layers only when they take at most half the memory
    available; GPU layers Metal maps stay resident in that same memory, so they count
    against it (copies to a discrete GPU do not)."""
    from prima_node.cluster.node import resident_fits
    from prima_node.engine import gpu

    path = make_model("llama", "tiny", "Q8_0", layers=4)

    def matrices(m: Model, layers: range) -> int:
        return sum(t.n_bytes for i in layers
                   for t in layer_tensor_infos(m.file, m.config, i).values() if len(t.shape) >= 2)

    with Model.open(path, n_ctx=64, gpu=STAND_IN) as m:  # the stand-in copies
        room = 2 * matrices(m, range(2, 4))  # just enough for the CPU layers' copies
        gpu_part = matrices(m, range(2))
        assert resident_fits(m, [(0, 4)], 2, available=room)
        assert not resident_fits(m, [(0, 4)], 2, available=room - 2)
    monkeypatch.setattr(gpu, "reads_file_mapping", lambda device, info: True)
    with Model.open(path, n_ctx=64, gpu=STAND_IN) as m:  # mapped, as on Metal
        assert m.accel is not None and m.accel.map_on is not None
        assert not resident_fits(m, [(0, 4)], 2, available=room)
        assert resident_fits(m, [(0, 4)], 2, available=room + gpu_part)


def test_a_failing_cpu_part_leaves_both_parts_at_the_same_position(
        make_model: ModelFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU part runs first; if the CPU part then fails (its compute buffer cannot be
    allocated, say: injected here), the GPU part's cache is cut back, so the window still
    holds one consistent prefix and the next step continues it."""
    path = make_model("llama", "tiny", "F16", layers=4)
    with Model.open(path, n_ctx=64, gpu=STAND_IN) as m:
        w = m.window(0, 4, gpu_layers=2)
        assert isinstance(w, SplitWindow) and w.cpu is not None
        w.forward(m.embed([5, 6, 7]), np.arange(3), "s")
        with monkeypatch.context() as patch:
            patch.setattr(w.cpu, "run", lambda *a, **k: (_ for _ in ()).throw(
                ComputeError("not enough memory for the compute buffer")))
            with pytest.raises(ComputeError):
                w.forward(m.embed([8]), np.arange(3, 4), "s")
        assert w.gpu.n_cached("s") == w.cpu.n_cached("s") == w.n_cached("s") == 3
        w.forward(m.embed([8]), np.arange(3, 4), "s")
        assert w.n_cached("s") == 4


def test_ring_windows_with_gpu_layers_compose(make_model: ModelFactory) -> None:
    path = make_model("qwen3", "small", "Q8_0")
    with Model.open(path, n_ctx=64, gpu=STAND_IN) as m:
        ids = _prompt(12, m.config.n_vocab)
        full = m.logits(ids)
        cuts = [0, 2, 3, m.config.n_layer]
        windows = [m.window(a, b, gpu_layers=n)
                   for (a, b), n in zip(itertools.pairwise(cuts), (2, 0, 1), strict=True)]
        h = m.embed(ids)
        for w in windows:
            h = w.forward(h, np.arange(len(ids)), session="s")
        np.testing.assert_allclose(m.output(h[-1:])[0], full, rtol=0, atol=1e-4 * full.std())


def test_gpu_layers_out_of_range_and_unknown_gpus_are_clear_errors(
        make_model: ModelFactory) -> None:
    path = make_model("llama", "tiny", "F16")
    with pytest.raises(ValueError, match="a number from 0 to 2"):
        Model.open(path, n_ctx=64, gpu=STAND_IN, gpu_layers=3)
    with pytest.raises(ValueError, match="all or auto"):
        Model.open(path, n_ctx=64, gpu=STAND_IN, gpu_layers="most")
    with pytest.raises(GpuUnavailableError, match="no GPU named 'CUDA7'"):
        Model.open(path, n_ctx=64, gpu="CUDA7")
    with pytest.raises(ValueError, match="--gpu none keeps every layer on the CPU"):
        Model.open(path, n_ctx=64, gpu="none", gpu_layers=1)
    with Model.open(path, n_ctx=64, gpu="none", gpu_layers="auto") as m:
        assert m.accel is None and m.gpu_layers == 0
    with Model.open(path, n_ctx=64) as m, pytest.raises(GpuUnavailableError,
                                                        match="opened without a GPU"):
        m.window(0, 2, gpu_layers=1)
    with Model.open(path, n_ctx=64, gpu=STAND_IN) as m, pytest.raises(ValueError,
                                                                      match="do not fit"):
        m.window(0, 1, gpu_layers=2)


@pytest.mark.skipif(bool(find_gpus()), reason="this build has a GPU backend")
def test_a_build_without_a_gpu_says_how_to_get_one(make_model: ModelFactory) -> None:
    path = make_model("llama", "tiny", "F16")
    backends = ggml.load().backends()
    assert backends["CPU"] >= 1
    with pytest.raises(GpuUnavailableError) as err:
        Model.open(path, n_ctx=64, gpu_layers=1)
    assert no_gpu_reason(backends) in str(err.value)
    with Model.open(path, n_ctx=64, gpu_layers="auto") as m:  # auto: none, and no error
        assert m.gpu_layers == 0 and m.accel is None


def test_why_there_is_no_gpu_names_the_build_or_the_driver() -> None:
    """A CPU-only build is told how to get a GPU backend; a build whose GPU backend found no
    device (a driver missing or too old: a CUDA build on this machine says "CUDA driver
    version is insufficient") is told that, not to rebuild."""
    assert "PRIMA_GPU=cuda, metal or vulkan" in no_gpu_reason({"CPU": 1})
    assert "PRIMA_GPU" in no_gpu_reason({"CPU": 1, "BLAS": 1, "RPC": 0})
    assert idle_gpu_backends({"CPU": 1, "RPC": 0}) == []
    for backends in ({"CUDA": 0, "CPU": 1}, {"CPU": 1, "Vulkan": 0, "CUDA": 1}):
        reason = no_gpu_reason(backends)
        idle = idle_gpu_backends(backends)
        assert len(idle) == 1 and f"this build's {idle[0]} backend found no GPU" in reason
        assert "driver" in reason and "PRIMA_GPU" not in reason


def test_auto_fits_layers_and_their_caches_in_free_memory(make_model: ModelFactory) -> None:
    path = make_model("llama", "small", "Q8_0")
    with Model.open(path, n_ctx=128) as m:
        cfg, mf = m.config, m.file
        kv = AUTO_KV_SESSIONS * 2 * cfg.n_embd_kv * 128 * 2  # the caches of two sessions
        per_layer = [sum(t.n_bytes for t in layer_tensor_infos(mf, cfg, i).values()) + kv
                     for i in range(cfg.n_layer)]
        out = mf.tensor(output_name(cfg)).n_bytes
        for n in range(cfg.n_layer):
            free = AUTO_RESERVE_BYTES + sum(per_layer[:n])
            assert auto_gpu_layers(mf, cfg, 128, free) == n
            assert auto_gpu_layers(mf, cfg, 128, free + per_layer[n] - 1) == n
        everything = AUTO_RESERVE_BYTES + sum(per_layer)
        assert auto_gpu_layers(mf, cfg, 128, everything) == cfg.n_layer - 1  # no room: output
        assert auto_gpu_layers(mf, cfg, 128, everything + out) == cfg.n_layer
        assert auto_gpu_layers(mf, cfg, 128, 0) == 0


def test_a_profiled_gpu_is_planned_from_its_measurements(make_model: ModelFactory) -> None:
    from prima_node.device.profile import measure_gpu
    from prima_node.planner.cluster_file import GPU_RESERVE_BYTES, device_from_profile

    measured = measure_gpu(STAND_IN, ["Q8_0"], 256)
    assert measured["name"] == STAND_IN and measured["backend"] == "CPU"
    assert measured["kernels"]["Q8_0"]["decode_flops"] > 0
    assert measured["kernels"]["Q8_0"]["prefill_flops"] > 0
    assert 0 < measured["copy_s_per_token"] < 0.1
    assert 0 < measured["vram_free"] <= measured["vram_total"]
    doc = {"name": "pc", "os": "Linux", "disk": {"sequential_bytes_per_s": 5e8},
           "memory": {"available": 8e9},
           "kernels": {"Q8_0": {"decode_flops": 1e10, "prefill_flops": 5e10}},
           "gpu": {"backend": "CPU", "devices": [measured]}}
    dev = device_from_profile(doc)
    assert dev.has_gpu and dev.gpu_flops == {"Q8_0": measured["kernels"]["Q8_0"]["decode_flops"]}
    assert dev.vram_free == measured["vram_free"]
    assert dev.gpu_compute_buffer == GPU_RESERVE_BYTES
    assert not device_from_profile({**doc, "gpu": {"backend": None, "devices": []}}).has_gpu
    with pytest.raises(ValueError, match="no kernel speeds"):
        device_from_profile({**doc, "gpu": {"devices": [{"name": "x"}]}})


def test_a_node_serving_alone_with_gpu_layers_answers_as_the_cpu_does_and_says_so(
        make_model: ModelFactory, tmp_path_factory: pytest.TempPathFactory) -> None:
    from server_process import ServerProcess

    path = make_model("llama", "tiny", "F16", layers=4)
    body = {"model": path.stem, "messages": [{"role": "user", "content": "the lights"}],
            "max_tokens": 12, "temperature": 0}
    answers, docs = [], []
    for extra in ((), ("--gpu", STAND_IN, "--gpu-layers", "all")):
        srv = ServerProcess(path, tmp_path_factory.mktemp("state"), ctx=256, extra=extra)
        srv.start()
        try:
            srv.wait_ready()
            status, raw = srv.post("/v1/chat/completions", body)
            assert status == 200, raw
            answers.append(json.loads(raw)["choices"][0]["message"]["content"])
            docs.append(srv.status())
        finally:
            assert srv.stop() == 0, srv.log()
    assert answers[0] == answers[1]
    cpu, gpu = docs
    assert cpu["model"]["gpu"] is None and cpu["cluster"]["nodes"][0]["gpu"] is None
    # what this build says of its GPU (a CPU-only one: nothing; a driverless CUDA one: why)
    assert cpu["cluster"]["nodes"][0]["gpu_unavailable"] == gpu_unavailable()
    if not idle_gpu_backends(ggml.load().backends()):
        assert gpu_unavailable() is None
    assert gpu["model"]["gpu_layers"] == gpu["cluster"]["nodes"][0]["gpu_layers"] == 4
    assert gpu["model"]["gpu"] == gpu["cluster"]["nodes"][0]["gpu"]  # both read afresh
    node_gpu = gpu["cluster"]["nodes"][0]["gpu"]
    assert node_gpu["name"] == STAND_IN and node_gpu["memory_total"] > 0
    assert node_gpu["used_by_model"] >= path.stat().st_size // 2  # layers and output copied


def test_a_ring_head_s_output_moves_to_its_gpu_and_back(make_model: ModelFactory) -> None:
    """Halda may put the head's output projection on its GPU; the head then computes the
    logits from a copy there, the same logits, and frees the copy when a plan moves it back."""
    path = make_model("qwen2", "small", "Q8_0")
    with Model.open(path, n_ctx=64, gpu=STAND_IN) as m:
        h = m.embed(_prompt(3, m.config.n_vocab))
        on_cpu = m.output(h)
        before = m.device_bytes
        m.output_on_gpu(True)
        assert m.accel is not None and m.accel.has_output
        assert m.device_bytes - before >= m.file.tensor(output_name(m.config)).n_bytes
        np.testing.assert_array_equal(m.output(h), on_cpu)
        np.testing.assert_array_equal(m.output(h[-1:]), on_cpu[-1:])  # a kept decode graph
        m.output_on_gpu(False)
        assert m.device_bytes == before and not m.accel.has_output
        np.testing.assert_array_equal(m.output(h[-1:]), on_cpu[-1:])
    with Model.open(path, n_ctx=64) as m, pytest.raises(GpuUnavailableError,
                                                        match="opened without one"):
        m.output_on_gpu(True)
