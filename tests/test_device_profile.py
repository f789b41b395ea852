"""The device profile: measured with the engine's own kernels for the model's weight types,
cached per device and model file (memory read afresh), exchanged as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prima_node.device.profile import DeviceProfile, profile_device
from prima_node.planner.model_profile import from_gguf
from tests.conftest import ModelFactory


def test_a_profile_measures_what_the_model_uses_and_is_cached(make_model: ModelFactory,
                                                              tmp_path: Path) -> None:
    path = make_model("llama", "small", "Q4_K_M")
    steps: list[tuple[int, int]] = []
    prof = profile_device(path, threads=1, cache_dir=tmp_path,
                          progress=lambda d, t: steps.append((d, t)))
    mp = from_gguf(path)
    used = {t for layer in mp.layers for t in layer.flops_by_type} | set(mp.output_flops_by_type)
    assert set(prof.kernels) == used - {"F32"}
    for k in prof.kernels.values():
        # a batch reuses each weight many times, so the prefill path must beat the matvec
        assert 0 < k["decode_flops"] < k["prefill_flops"]
    assert prof.memory_read_gbps > 0 and prof.disk is not None
    assert prof.disk["resident_before"] < 0.05
    assert 0 < prof.memory["available"] <= prof.memory["total"]
    assert steps[-1][0] == steps[-1][1] and len(steps) == steps[-1][1]
    assert prof.threads == 1 and prof.gpu == {"backend": None, "devices": []}
    # a real layer decoding here, beside what the kernels price it at
    assert prof.layer_decode is not None and prof.layer_decode["layer"] == 0
    assert prof.layer_decode["measured_s"] > 0
    kernel_s = sum(f / prof.kernels[t]["decode_flops"]
                   for t, f in mp.layers[0].flops_by_type.items() if t in prof.kernels)
    assert prof.layer_decode["kernel_s"] == pytest.approx(kernel_s)

    again = profile_device(path, threads=1, cache_dir=tmp_path)
    assert again.kernels == prof.kernels and again.measured_at == prof.measured_at
    fresh = profile_device(path, threads=1, cache_dir=tmp_path, refresh=True)
    assert fresh.kernels.keys() == prof.kernels.keys()
    assert DeviceProfile.from_json(json.loads(json.dumps(fresh.to_json()))) == fresh

    # a profile cached before profiles timed a real layer is measured again
    (cached,) = tmp_path.glob("device-*.json")
    doc = json.loads(cached.read_text())
    del doc["layer_decode"]
    cached.write_text(json.dumps(doc))
    remeasured = profile_device(path, threads=1, cache_dir=tmp_path)
    assert remeasured.layer_decode is not None
    assert "layer_decode" in json.loads(cached.read_text())


def test_a_malformed_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="not a device profile"):
        DeviceProfile.from_json({"format": "x"})
    with pytest.raises(ValueError, match="incomplete"):
        DeviceProfile.from_json({"format": "prima-device-profile/1", "name": "a"})


def test_the_cli_prints_the_exchange_format(make_model: ModelFactory, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "prima_node.cli", "profile", "--model",
                          str(make_model()), "--threads", "1", "--json"], capture_output=True,
                         text=True, timeout=120, check=True,
                         env={**os.environ, "PRIMA_PROFILE_CACHE": str(tmp_path)})
    prof = DeviceProfile.from_json(json.loads(out.stdout))
    assert prof.kernels and prof.disk is not None
    assert len(list(tmp_path.glob("device-*.json"))) == 1


def test_a_measured_profile_plans_the_model_it_was_measured_with(make_model: ModelFactory,
                                                                 tmp_path: Path) -> None:
    model = make_model()
    prof = profile_device(model, threads=1, cache_dir=tmp_path)
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps([prof.to_json()]))  # what a head gathers from its nodes
    out = subprocess.run([sys.executable, "-m", "prima_node.cli", "plan", "--profiles",
                          str(cluster), "--model", str(model), "--ctx", "512", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    mp = from_gguf(model)
    (dev,) = doc["devices"]
    assert doc["ring"] == [prof.name] and dev["window"] == mp.n_layer and dev["regime"] == "M4"
    # the compute term is the model's FLOPs at the speeds measured here, scaled by what a real
    # layer cost beside its kernels' price
    assert prof.layer_decode is not None
    scale = min(max(prof.layer_decode["measured_s"] / prof.layer_decode["kernel_s"], 1 / 3), 3)
    flops = sum(f for layer in mp.layers for t, f in layer.flops_by_type.items())
    measured = min(k["decode_flops"] for k in prof.kernels.values())
    fastest = max(k["decode_flops"] for k in prof.kernels.values())
    assert scale * flops / fastest <= dev["compute_ms"] / 1e3 <= 1.5 * scale * flops / measured


def test_the_bandwidth_buffer_fits_in_what_the_device_can_spare() -> None:
    """The first profile of a node in a 300 MiB container was killed for its 256 MiB buffer:
    the buffer is at most an eighth of the available memory, and 256 MiB where there is room."""
    from prima_node.device.profile import bandwidth_buffer_mib

    mib = 2**20
    for available in (300 * mib, 1024 * mib, 2047 * mib):
        assert 16 <= bandwidth_buffer_mib(available) <= available // 8 // mib
    assert bandwidth_buffer_mib(64 * 2**30) == 256
    assert bandwidth_buffer_mib(0) == 16  # never nothing: the figure would mean nothing
