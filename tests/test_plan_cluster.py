"""Halda on the shipped clusters: the paper's D1-D4 and two home clusters, through the cluster
file format and ``prima-node plan``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prima_node.planner.cluster_file import (
    LAYER_SCALE_LIMIT,
    cluster_from_json,
    flops_from_bandwidth,
    load_cluster,
)
from prima_node.planner.halda import Options, PlanError, plan
from prima_node.planner.model_profile import PUBLISHED, ModelProfile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAPER = EXAMPLES / "profiles" / "paper-d1-d4.json"


def _model(name: str) -> ModelProfile:
    return ModelProfile.load(EXAMPLES / "models" / PUBLISHED[name].example_name)


def test_a_model_that_fits_one_device_goes_to_the_best_one_alone() -> None:
    cluster = load_cluster(PAPER)
    p = plan(cluster.devices, _model("llama3-8b"), Options(head=cluster.head_index),
             cluster.links, cluster.default_link)
    assert p.ring == ["D3 desktop"] and p.k == 1
    (d3,) = p.devices
    assert d3.window == d3.gpu_layers == 32 and d3.regime == "M4" and p.output_on_gpu
    # every other device is left out with the reason: it would only slow the ring down
    assert set(p.dropped) == {"D1 Mac M1", "D2 laptop", "D4 Mate40Pro"}
    for why in p.dropped.values():
        assert "slower" in why
    # the best single device alone is also what llama.cpp would do
    alone = plan([cluster.devices[cluster.head_index]], _model("llama3-8b"))
    assert alone.latency_s == pytest.approx(p.latency_s)


@pytest.mark.parametrize("name", ["llama3-70b", "deepseek-r1-distill-llama-70b"])
def test_a_70b_model_spreads_over_all_four_with_several_rounds(name: str) -> None:
    cluster = load_cluster(PAPER)
    model = _model(name)
    opts = Options(head=cluster.head_index)
    p = plan(cluster.devices, model, opts, cluster.links, cluster.default_link)
    assert sorted(p.ring) == sorted(d.name for d in cluster.devices) and not p.dropped
    assert p.k > 1 and sum(d.layers for d in p.devices) == model.n_layer
    held = sorted(i for d in p.devices for a, b in d.ranges for i in range(a, b))
    assert held == list(range(model.n_layer))  # every layer once, in ring order per round
    assert any(d.regime != "M4" for d in p.devices)  # 37 GiB of memory for 42.5 GB of weights
    assert all(d.gpu_layers > 0 for d in p.devices if d.name in ("D2 laptop", "D3 desktop"))
    # one round means every device must hold all its layers: impossible here
    with pytest.raises(PlanError, match="k=1"):
        plan(cluster.devices, model, Options(head=cluster.head_index, k=1), cluster.links,
             cluster.default_link)
    # a forced k other than the best is predicted slower
    for k in (4, 10, 16):
        forced = plan(cluster.devices, model, Options(head=cluster.head_index, k=k),
                      cluster.links, cluster.default_link)
        assert forced.latency_s > p.latency_s


def test_the_home_clusters_plan_every_shipped_model() -> None:
    models = sorted((EXAMPLES / "models").glob("*.json"))
    clusters = sorted((EXAMPLES / "profiles").glob("*.json"))
    assert len(models) == len(PUBLISHED) and len(clusters) >= 3
    for cpath in clusters:
        cluster = load_cluster(cpath)
        for mpath in models:
            model = ModelProfile.load(mpath)
            p = plan(cluster.devices, model, Options(head=cluster.head_index), cluster.links,
                     cluster.default_link)
            assert p.ring[0] == cluster.devices[cluster.head_index].name
            assert 0 < p.latency_s < 60, (cpath.name, mpath.name)
    # the desktop with its 12 GB GPU holds a 32B model by itself, most of it on the GPU
    gpu = load_cluster(EXAMPLES / "profiles" / "home-gpu-desktop-minipcs.json")
    p = plan(gpu.devices, _model("qwq-32b"), Options(head=gpu.head_index), gpu.links,
             gpu.default_link)
    assert p.ring == ["desktop"] and p.devices[0].regime == "M4"
    assert p.devices[0].gpu_layers > p.devices[0].window / 2
    # and with the mini PCs it runs a 70B model faster than the GPU-less home cluster does
    home = load_cluster(EXAMPLES / "profiles" / "home-pi-nuc-laptop.json")
    fast = plan(gpu.devices, _model("llama3-70b"), Options(head=gpu.head_index), gpu.links,
                gpu.default_link)
    slow = plan(home.devices, _model("llama3-70b"), Options(head=home.head_index), home.links,
                home.default_link)
    assert fast.latency_s < slow.latency_s and fast.devices[0].gpu_layers > 0


def test_decode_speed_follows_bytes_per_weight() -> None:
    f = flops_from_bandwidth(10)
    assert f["Q8_0"] == pytest.approx(2 * 10e9 / (34 / 32))
    assert f["Q4_K"] / f["Q8_0"] == pytest.approx((34 / 32) / (144 / 256))


@pytest.mark.parametrize("doc, message", [
    ({"format": "x"}, "not a cluster file"),
    ({"format": "prima-cluster/1", "devices": []}, "lists no devices"),
    ({"format": "prima-cluster/1", "devices": [{"name": "a"}]}, "'os'|'cpu' must be"),
    ({"format": "prima-cluster/1", "devices": [
        {"name": "a", "memory_available_gib": 1, "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}, "ram": 3}]}, "unknown field.*ram"),
    ({"format": "prima-cluster/1", "devices": [
        {"name": "a", "memory_available_gib": -1, "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}}]}, "non-negative"),
    ({"format": "prima-cluster/1", "devices": [
        {"name": "a", "memory_available_gib": 1, "disk_read_gbps": 1,
         "cpu": {"gflops": {"Q9_Z": 1}}}]}, "unknown weight type"),
    ({"format": "prima-cluster/1", "head": "b", "devices": [
        {"name": "a", "memory_available_gib": 1, "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}}]}, "head 'b' is not one of"),
    ({"format": "prima-cluster/1", "devices": [
        {"name": "a", "memory_available_gib": 1, "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}}],
      "links": [{"from": "a", "to": "z", "latency_ms": 1, "throughput_mb_s": 1}]},
     "'z' is not one of the devices"),
    ([{"format": "prima-device-profile/1", "name": "p", "os": "Linux", "memory": {},
       "kernels": {}}], "no disk figures"),
    ([{"format": "prima-device-profile/1", "name": "p", "os": "Linux",
       "memory": {"available": "lots"}, "disk": {"sequential_bytes_per_s": 1e9},
       "kernels": {"Q8_0": {"decode_flops": 1e9}}}], "'available' must be a non-negative"),
    ([{"format": "prima-device-profile/1", "name": "p", "os": "Linux",
       "memory": {"available": 1e9}, "disk": {"sequential_bytes_per_s": 1e9},
       "kernels": ["Q8_0"]}], "no kernel speeds"),
    ({"format": "prima-cluster/1", "links": None, "devices": [
        {"name": "a", "memory_available_gib": 1, "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}}]}, "'links' must be a list"),
    ({"format": "prima-cluster/1", "default_link": 3, "devices": [
        {"name": "a", "memory_available_gib": 1, "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}}]}, "'default_link' must be an object"),
    ({"format": "prima-cluster/1", "default_link": {}, "devices": [
        {"name": "a", "memory_available_gib": 1, "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}}]}, "'latency_ms' is missing"),
    ({"format": "prima-cluster/1", "devices": [
        {"name": "a", "memory_available_gib": float("nan"), "disk_read_gbps": 1,
         "cpu": {"decode_read_gbps": 10}}]}, "non-negative number"),
    ({"format": "prima-cluster/1", "devices": [
        {"name": "a", "os": "macOS", "metal": "false", "memory_available_gib": 1,
         "disk_read_gbps": 1, "cpu": {"decode_read_gbps": 10}}]}, "'metal' must be true"),
])
def test_a_bad_cluster_file_says_what_is_wrong(doc: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_from_json(doc)


def test_a_measured_profile_becomes_a_planner_device() -> None:
    doc = {"format": "prima-device-profile/1", "name": "mac", "os": "Darwin",
           "memory": {"available": 6e9}, "disk": {"sequential_bytes_per_s": 3e9,
                                                  "random_bytes_per_s": 0.4e9},
           "kernels": {"Q4_K": {"decode_flops": 5e10, "prefill_flops": 2e11}}}
    (dev,) = cluster_from_json([doc]).devices
    # macOS maps files without read-ahead: random page reads are what streaming gets
    assert dev.os == "macOS" and dev.disk_bytes_per_s == 0.4e9
    assert dev.mem_available == 6e9 and dev.cpu_flops == {"Q4_K": 5e10}
    linux = cluster_from_json([{**doc, "os": "Linux"}]).devices[0]
    assert linux.disk_bytes_per_s == 3e9


def test_a_measured_layer_scales_the_kernels_to_what_the_model_really_costs() -> None:
    """A real layer slower than its kernels price it (smaller matrices, norms, attention,
    the graph) makes every speed slower by the ratio; a ratio beyond the limit (a busy
    device) is held to it."""
    doc = {"format": "prima-device-profile/1", "name": "pc", "os": "Linux",
           "memory": {"available": 6e9}, "disk": {"sequential_bytes_per_s": 3e9},
           "kernels": {"Q4_K": {"decode_flops": 6e10}, "Q6_K": {"decode_flops": 3e10}}}

    def speeds(layer_decode: object) -> dict[str, float]:
        return cluster_from_json([{**doc, "layer_decode": layer_decode}]).devices[0].cpu_flops

    assert speeds(None) == {"Q4_K": 6e10, "Q6_K": 3e10}
    assert speeds({"layer": 0, "measured_s": 3e-3, "kernel_s": 2e-3}) == pytest.approx(
        {"Q4_K": 4e10, "Q6_K": 2e10})
    assert speeds({"layer": 0, "measured_s": 1.0, "kernel_s": 1e-3}) == pytest.approx(
        {"Q4_K": 6e10 / LAYER_SCALE_LIMIT, "Q6_K": 3e10 / LAYER_SCALE_LIMIT})
    for bad, message in [("fast", "layer_decode is not an object"),
                         ({"measured_s": 1e-3, "kernel_s": 0}, "'kernel_s' must be a positive"),
                         ({"kernel_s": 1e-3}, "'measured_s' is missing")]:
        with pytest.raises(ValueError, match=message):
            speeds(bad)


def test_a_cluster_file_with_nan_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{"format": "prima-cluster/1", "devices": [{"name": "a", '
                   '"memory_available_gib": NaN, "disk_read_gbps": 1, '
                   '"cpu": {"decode_read_gbps": 10}}]}')
    with pytest.raises(ValueError, match="NaN is not a number a cluster file may hold"):
        load_cluster(bad)


def test_links_hold_both_ways_unless_the_reverse_is_given() -> None:
    dev = {"memory_available_gib": 8, "disk_read_gbps": 1, "cpu": {"decode_read_gbps": 10}}
    c = cluster_from_json({"format": "prima-cluster/1",
                           "devices": [{"name": n, **dev} for n in "abc"],
                           "links": [{"from": "a", "to": "b", "latency_ms": 1,
                                      "throughput_mb_s": 100},
                                     {"from": "c", "to": "a", "latency_ms": 5,
                                      "throughput_mb_s": 10},
                                     {"from": "a", "to": "c", "latency_ms": 2,
                                      "throughput_mb_s": 20}]})
    assert c.links[("b", "a")] == c.links[("a", "b")]
    assert c.links[("a", "c")].latency_s == pytest.approx(0.002)
    assert c.links[("c", "a")].latency_s == pytest.approx(0.005)
    assert ("b", "c") not in c.links and c.head_index == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prima_node.cli", "plan", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_plan_command_prints_a_table_and_json() -> None:
    model = str(EXAMPLES / "models" / "llama3-70b-q4_k_m.json")
    out = _cli("--profiles", str(PAPER), "--model", model, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["format"] == "prima-plan/1" and doc["n_ctx"] == 4096 and doc["k"] > 1
    for d in doc["devices"]:
        assert {"name", "window", "gpu_layers", "rounds", "ranges", "regime", "memory_bytes",
                "compute_ms", "disk_ms", "network_ms"} <= set(d)
        sizes = [b - a for a, b in d["ranges"]]
        assert d["rounds"] == doc["k"] == len(sizes) and d["layers"] == sum(sizes)
        assert d["window"] == max(sizes) and max(sizes) - min(sizes) <= 1
    table = _cli("--profiles", str(PAPER), "--model", model, "--k", "8")
    assert table.returncode == 0, table.stderr
    assert "k = 8 rounds" in table.stdout and "D4 Mate40Pro" in table.stdout
    assert "ms per token" in table.stdout
    ragged = _cli("--profiles", str(PAPER), "--model", model, "--k", "3", "--json")
    assert ragged.returncode == 0, ragged.stderr  # windows need not divide the layers
    assert json.loads(ragged.stdout)["k"] == 3
    bad = _cli("--profiles", str(PAPER), "--model", model, "--k", "1000")
    assert bad.returncode == 2 and "k is between 1 and" in bad.stderr
    missing = _cli("--profiles", "/no/such.json", "--model", model)
    assert missing.returncode == 2 and "no such cluster file" in missing.stderr
