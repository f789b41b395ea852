"""Disk speed on cold data: the model file's own pages are dropped first (and only those), and
the measurement leaves the file as cold as it found it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prima_node.device.disk import measure_disk, resident_fraction
from tests.conftest import ModelFactory


def _filesystem_of(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def test_the_file_is_measured_cold_and_left_cold(make_model: ModelFactory) -> None:
    path = make_model("llama", "small", "Q8_0")
    if _filesystem_of(path) in ("tmpfs", "ramfs"):
        pytest.skip("the test models live on a RAM filesystem, whose pages cannot be dropped")
    path.read_bytes()  # warm it
    assert resident_fraction(path) > 0.9
    speed = measure_disk(path, seq_bytes=16 << 20, random_reads=64)
    assert speed.resident_before < 0.05  # only this file's pages were dropped, and they were
    assert speed.sequential_bytes_per_s > 0 and speed.random_bytes_per_s > 0
    assert speed.bytes_read >= min(16 << 20, os.path.getsize(path))
    assert resident_fraction(path) < 0.05


def test_residency_of_a_byte_range(tmp_path: Path) -> None:
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(64 * 4096))
    f.read_bytes()
    assert resident_fraction(f, 4096 * 10, 4096 * 4) == 1.0


def test_a_tiny_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "tiny.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="too small"):
        measure_disk(f)
