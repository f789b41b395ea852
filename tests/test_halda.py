"""Halda against brute force: on random small clusters, the plan's predicted latency is the
exact optimum of the same cost model (every subset of devices, k, window split and GPU split)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from prima_node.planner.halda import (
    Device,
    Link,
    Options,
    Plan,
    PlanError,
    brute_force,
    plan,
)
from prima_node.planner.model_profile import ModelProfile, PublishedModel, from_shapes

GB = 1e9


def _model(n_layer: int, quant: str = "Q4_K_M") -> ModelProfile:
    return from_shapes(PublishedModel("test", "llama", n_layer, 2048, 32, 8, 8192, 32000, 8192),
                       quant)


def _device(rng: random.Random, i: int, model_bytes: float) -> Device:
    os_ = rng.choice(["Linux", "Linux", "macOS", "Android"])
    metal = os_ == "macOS" and rng.random() < 0.5
    cpu = rng.uniform(5, 80) * GB
    gpu = None
    vram = 0.0
    if (os_ == "Linux" and rng.random() < 0.35) or metal:
        g = rng.uniform(1.5, 6) * cpu
        gpu = {"Q4_K": g, "Q6_K": g * 0.8, "F32": g}
        vram = rng.uniform(0.05, 0.8) * model_bytes
    return Device(
        name=f"d{i}", os=os_, metal=metal, mem_available=rng.uniform(0.1, 1.2) * model_bytes,
        disk_bytes_per_s=rng.choice([0.05, 0.3, 1.0, 3.0]) * GB,
        cpu_flops={"Q4_K": cpu, "Q6_K": cpu * 0.8, "F32": cpu * 0.5}, gpu_flops=gpu,
        vram_free=vram, compute_buffer=rng.uniform(0.01, 0.05) * model_bytes,
        swap_out=rng.uniform(0, 0.2) * model_bytes if os_ == "Android" else 0.0)


def check_layout(p: Plan) -> None:
    """Every layer once, in order around the ring round after round; each device's windows
    as even as can be; GPU layers in every window."""
    order = [r for rnd in range(p.k) for d in p.devices for r in [d.ranges[rnd]]]
    assert [a for a, _ in order] == [0, *(b for _, b in order[:-1])]
    assert order[-1][1] == p.n_layer == sum(d.layers for d in p.devices)
    for d in p.devices:
        sizes = [b - a for a, b in d.ranges]
        assert len(sizes) == p.k and sum(sizes) == d.layers and min(sizes) >= 1
        assert max(sizes) - min(sizes) <= 1 and d.window == max(sizes)
        assert 0 <= d.gpu_layers <= min(sizes)


def test_halda_finds_the_exhaustive_optimum_on_200_random_clusters() -> None:
    rng = random.Random(20261121)
    checked = infeasible = 0
    for _ in range(200):
        model = _model(rng.choice([4, 6, 8, 12, 16, 24, 32]))
        size = model.mean_layer_bytes * model.n_layer
        devices = [_device(rng, i, size) for i in range(rng.randint(2, 4))]
        links = {(a.name, b.name): Link(rng.uniform(0.0002, 0.01), rng.uniform(5e6, 1e9))
                 for a in devices for b in devices if a is not b}
        # a random head, and now and then a forced number of rounds (any: windows may be ragged)
        opts = Options(n_ctx=rng.choice([512, 2048]), head=rng.randrange(len(devices)),
                       k=rng.randint(1, model.n_layer // 2) if rng.random() < 0.25 else None)
        best = brute_force(devices, model, opts, links)
        try:
            p = plan(devices, model, opts, links)
        except PlanError:
            assert best == float("inf")
            infeasible += 1
            continue
        assert p.latency_s == pytest.approx(best, rel=1e-6), (devices, model.n_layer)
        check_layout(p)
        assert p.ring[0] == devices[opts.head].name and (opts.k is None or p.k == opts.k)
        checked += 1
    # both outcomes are exercised, and most instances compare a plan, not just an error
    assert checked >= 140 and infeasible >= 10


def test_a_model_that_fits_one_fast_device_goes_to_it_alone() -> None:
    model = _model(16)
    size = model.mean_layer_bytes * 16
    big = Device("big", mem_available=4 * size, disk_bytes_per_s=2 * GB,
                 cpu_flops={"Q4_K": 100 * GB, "Q6_K": 80 * GB, "F32": 50 * GB})
    small = Device("small", mem_available=0.5 * size, disk_bytes_per_s=0.3 * GB,
                   cpu_flops={"Q4_K": 10 * GB, "Q6_K": 8 * GB, "F32": 5 * GB},
                   compute_buffer=0.05 * size)
    p = plan([big, small], model)
    assert p.ring == ["big"] and p.k == 1 and p.devices[0].regime == "M4"
    assert "slower" in p.dropped["small"]


def test_forcing_k_and_infeasible_requests_are_explained() -> None:
    model = _model(16)
    dev = Device("a", mem_available=1e12, disk_bytes_per_s=1 * GB,
                 cpu_flops={"Q4_K": 10 * GB, "Q6_K": 8 * GB, "F32": 5 * GB})
    with pytest.raises(PlanError, match="k is between 1 and 16"):
        plan([dev], model, Options(k=17))
    assert plan([dev], model, Options(k=3)).devices[0].layers == 16  # ragged: 6 + 5 + 5
    tiny = Device("t", mem_available=1e6, disk_bytes_per_s=0.01 * GB,
                  cpu_flops={"Q4_K": 10 * GB, "Q6_K": 8 * GB, "F32": 5 * GB})
    with pytest.raises(PlanError, match="the head t cannot hold the embedding row"):
        plan([tiny], model)
    with pytest.raises(PlanError, match="no assignment fits with k=1: with one round"):
        plan([Device("small", mem_available=model.output_bytes + 8 * model.mean_layer_bytes + 4e8,
                     disk_bytes_per_s=1 * GB, cpu_flops=dev.cpu_flops)], model, Options(k=1))
    with pytest.raises(PlanError, match="no measured speed"):
        plan([Device("x", 1e12, 1e9, {"Q8_0": 1e9})], model)


def test_a_memory_poor_device_streams_with_more_rounds_and_k1_is_slower() -> None:
    """The paper's point: windows small enough to prefetch the next one while the token is
    elsewhere let a device hold a share bigger than its memory; one window per device cannot."""
    model = _model(32)
    size = model.mean_layer_bytes * 32
    flops = {"Q4_K": 40 * GB, "Q6_K": 30 * GB, "F32": 20 * GB}
    devices = [Device(f"d{i}", mem_available=0.3 * size, disk_bytes_per_s=2 * GB,
                      cpu_flops=flops, compute_buffer=0.01 * size) for i in range(3)]
    links = {(a.name, b.name): Link(0.0005, 1e9) for a in devices for b in devices if a is not b}
    best = plan(devices, model, Options(n_ctx=512), links)
    assert best.k > 1 and len(best.ring) == 3
    assert any(d.regime == "M3" and d.disk_s > 0 for d in best.devices)
    with pytest.raises(PlanError):  # one window each: 3 x 0.3 of the model cannot hold it
        plan(devices, model, Options(n_ctx=512, k=1), links)
    roomy = [Device(d.name, mem_available=0.45 * size, disk_bytes_per_s=d.disk_bytes_per_s,
                    cpu_flops=flops, compute_buffer=0.01 * size) for d in devices]
    # with room for everything, more rounds only add hops: k = 1 wins, k = 2 is slower by them
    free = plan(roomy, model, Options(n_ctx=512), links)
    k2 = plan(roomy, model, Options(n_ctx=512, k=2), links)
    assert free.k == 1 and len(free.ring) == 3
    assert k2.latency_s == pytest.approx(free.latency_s + 3 * links[("d0", "d1")].hop_s(
        model.activation_bytes()), rel=1e-6)


def test_streamed_bytes_and_the_gpu_output_by_hand() -> None:
    """The cost model's numbers written out, independently of the solver and of brute force."""
    model = _model(12)
    b, kv = model.mean_layer_bytes, model.kv_bytes_per_layer(512)
    flops = {"Q4_K": 40 * GB, "Q6_K": 30 * GB, "F16": 20 * GB, "F32": 20 * GB}
    buf = 0.01 * GB
    # one device, every layer on it, k = 4 forced: windows of 3 layers; memory for 9 layers
    avail = 9 * (b + kv) + buf + model.embedding_row_bytes + model.output_bytes
    dev = Device("a", mem_available=avail, disk_bytes_per_s=1 * GB, cpu_flops=flops,
                 compute_buffer=buf)
    p = plan([dev], model, Options(n_ctx=512, k=4))
    (d,) = p.devices
    room = avail - buf - model.embedding_row_bytes - model.output_bytes - 12 * kv
    budget = 0.9 * room  # the pager keeps a tenth free
    # four heads and the one tail in use fit the budget: 4 (3b - t) + t = budget
    tail = (12 * b - budget) / 3
    assert d.streamed_bytes == pytest.approx(4 * tail, rel=1e-9)
    assert d.disk_s == pytest.approx(d.streamed_bytes / (1 * GB), rel=1e-9)
    # it reads between its rounds, not while it computes
    assert d.regime == "M3" and p.latency_s == pytest.approx(
        max(d.compute_s + p.output_s, d.compute_s + d.disk_s), rel=1e-9)
    # with a GPU that has room for the output matrix, the head projects on it when faster
    gpu = {t: 10 * v for t, v in flops.items()}
    rich = Device("g", mem_available=1e12, disk_bytes_per_s=1 * GB, cpu_flops=flops,
                  gpu_flops=gpu, vram_free=model.output_bytes + 2 * (b + kv) + 0.7 * 2**30,
                  gpu_compute_buffer=0.7 * 2**30)
    q = plan([rich], model, Options(n_ctx=512))
    out_flops = sum(model.output_flops_by_type.values())
    assert q.output_on_gpu
    assert q.output_s == pytest.approx(sum(
        f / gpu[t] for t, f in model.output_flops_by_type.items()), rel=1e-9)
    assert q.output_s < out_flops / max(flops.values())
    # the output took the room of about one layer: two layers' worth of VRAM holds one more
    assert q.devices[0].gpu_layers == 2 and q.devices[0].vram_bytes == pytest.approx(
        2 * (b + kv))


def test_many_devices_leave_out_one_that_cannot_hold_a_layer() -> None:
    model = _model(32)
    size = model.mean_layer_bytes * 32
    flops = {"Q4_K": 40 * GB, "Q6_K": 30 * GB, "F32": 20 * GB}
    good = [Device(f"d{i}", mem_available=0.4 * size, disk_bytes_per_s=2 * GB, cpu_flops=flops,
                   compute_buffer=0.01 * size) for i in range(6)]
    crumb = Device("crumb", mem_available=1e6, disk_bytes_per_s=2 * GB, cpu_flops=flops)
    p = plan([*good, crumb], model, Options(n_ctx=512))
    assert "crumb" not in p.ring and "cannot hold even one layer" in p.dropped["crumb"]
    assert p.latency_s == pytest.approx(plan(good, model, Options(n_ctx=512)).latency_s)


def test_measured_devices_reserve_the_engine_s_scratch_so_the_paper_s_scenario_plans() -> None:
    """The paper's scenario: a model of the 1b's widths (24 layers, so that three nodes can
    each take one layer a round) across three nodes whose memory holds 40 % of their
    share. A measured profile's free memory is already net of the node process, so
    Halda reserves only the engine's prefill scratch (tens of MiB for these shapes);
    llama.cpp's fixed 300 MiB on top left no room to stream through."""
    model = from_shapes(PublishedModel("1b", "llama", 24, 2048, 32, 8, 8192, 32000, 131072),
                        "F16")
    share = model.mean_layer_bytes * model.n_layer / 3
    scratch = model.scratch_bytes(Options().batch, 512)
    assert scratch < 100 * 2**20
    flops = {"F16": 20 * GB, "F32": 10 * GB}
    devices = [Device(f"d{i}", mem_available=0.4 * share + scratch
                      + (model.output_bytes if i == 0 else 0), disk_bytes_per_s=1 * GB,
                      cpu_flops=flops) for i in range(3)]
    links = {(a.name, b.name): Link(0.0005, 1e9) for a in devices for b in devices if a is not b}
    p = plan(devices, model, Options(n_ctx=512, use_all=True), links)
    assert p.k > 2 and len(p.ring) == 3
    assert all(d.streamed_bytes > 0 for d in p.devices)  # each streams its windows' tails
    llama_reserve = [Device(d.name, mem_available=d.mem_available,
                            disk_bytes_per_s=d.disk_bytes_per_s, cpu_flops=flops,
                            compute_buffer=300 * 2**20) for d in devices]
    with pytest.raises(PlanError, match=r"cannot hold one layer|needs room for two windows"):
        plan(llama_reserve, model, Options(n_ctx=512, use_all=True), links)


def test_the_nodes_handling_of_a_hop_is_priced_on_every_hop() -> None:
    model = _model(12)
    flops = {"Q4_K": 40 * GB, "Q6_K": 30 * GB, "F32": 20 * GB}
    size = model.mean_layer_bytes * 12
    devices = [Device(f"d{i}", mem_available=size, disk_bytes_per_s=2 * GB, cpu_flops=flops)
               for i in range(3)]
    links = {(a.name, b.name): Link(0.0005, 1e9) for a in devices for b in devices if a is not b}
    for k in (1, 2, 4):
        bare = plan(devices, model, Options(n_ctx=512, k=k, use_all=True), links)
        priced = plan(devices, model, Options(n_ctx=512, k=k, use_all=True,
                                              hop_overhead_s=0.004), links)
        assert priced.latency_s == pytest.approx(bare.latency_s + 3 * k * 0.004, rel=1e-6)
    # a device with less memory: the ring is worth its hops at their link price, not once
    # each hop also costs the nodes' handling of it
    small = [replace(d, mem_available=0.7 * size) if d.name == "d0" else d for d in devices]
    unpriced = plan(small, model, Options(n_ctx=512), links)
    priced = plan(small, model, Options(n_ctx=512, hop_overhead_s=0.5), links)
    assert len(unpriced.ring) > 1 and len(priced.ring) < len(unpriced.ring)
    with pytest.raises(PlanError, match="negative"):
        plan(devices, model, Options(n_ctx=512, hop_overhead_s=-1e-3), links)


def test_equal_devices_share_the_layers_evenly_for_the_pipelined_prefill() -> None:
    """Every split of a model that fits costs a decode step the same on equal devices; the
    prompt's micro-batches go at the pace of the busiest one, so the plan is the even split."""
    model = _model(16)
    size = model.mean_layer_bytes * 16
    same = {"Q4_K": 20 * GB, "Q6_K": 16 * GB, "F32": 10 * GB}
    devices = [Device(f"d{i}", mem_available=2 * size, disk_bytes_per_s=1 * GB,
                      cpu_flops=same) for i in range(3)]
    links = {(a.name, b.name): Link(0.0005, 1e9) for a in devices for b in devices
             if a is not b}
    p = plan(devices, model, Options(n_ctx=512, k=1, use_all=True), links)
    windows = sorted(d.window for d in p.devices)
    assert windows == [5, 5, 6], windows


def _moe(n_layer: int) -> ModelProfile:
    """A mixture of experts: 16 experts of width 1024, 2 read per token."""
    return from_shapes(PublishedModel("test-moe", "qwen3moe", n_layer, 2048, 32, 4, 8192, 32000,
                                      8192, experts=(16, 2, 1024)), "Q4_K_M")


def test_a_mixture_s_shortfall_costs_what_tokens_read_of_the_experts() -> None:
    """A node's pager leaves the experts to the page cache: memory short by X bytes (less
    than the experts) costs the expert share of X a token, not the k / (k - 1) tails."""
    model = _moe(12)
    b, kv = model.mean_layer_bytes, model.kv_bytes_per_layer(512)
    e, share = model.mean_expert_bytes, model.expert_share
    assert share == 2 / 16 and 0.8 * b < e < b
    flops = {"Q4_K": 40 * GB, "Q6_K": 30 * GB, "F16": 20 * GB, "F32": 20 * GB}
    buf = 0.01 * GB
    avail = 9 * (b + kv) + buf + model.embedding_row_bytes + model.output_bytes
    dev = Device("a", mem_available=avail, disk_bytes_per_s=1 * GB, cpu_flops=flops,
                 compute_buffer=buf)
    (d,) = plan([dev], model, Options(n_ctx=512, k=4)).devices
    room = avail - buf - model.embedding_row_bytes - model.output_bytes - 12 * kv
    short = 12 * b - 0.9 * room  # the weights beyond the pager's budget: within the experts
    assert 0 < short < 12 * e
    assert d.streamed_bytes == pytest.approx(share * short, rel=1e-9)
    # a dense model's pager would stream tails of k / (k - 1) = 4 / 3 of the shortfall
    assert d.streamed_bytes < short * 4 / 3 / 5


def test_halda_finds_the_exhaustive_optimum_for_mixtures_of_experts() -> None:
    rng = random.Random(20261206)
    checked = 0
    for _ in range(60):
        model = _moe(rng.choice([4, 6, 8, 12]))
        size = model.mean_layer_bytes * model.n_layer
        devices = [_device(rng, i, size) for i in range(rng.randint(2, 3))]
        links = {(a.name, b.name): Link(rng.uniform(0.0002, 0.01), rng.uniform(5e6, 1e9))
                 for a in devices for b in devices if a is not b}
        opts = Options(n_ctx=rng.choice([512, 2048]), head=rng.randrange(len(devices)))
        best = brute_force(devices, model, opts, links)
        try:
            p = plan(devices, model, opts, links)
        except PlanError:
            assert best == float("inf")
            continue
        assert p.latency_s == pytest.approx(best, rel=1e-6), (devices, model.n_layer)
        check_layout(p)
        checked += 1
    assert checked >= 30
