"""The ggml binding: its signatures and struct layouts against the library itself.

A wrong ctypes signature corrupts the stack or the heap, often silently, so every function the
engine uses is exercised here on values whose right answer numpy knows, and the struct the
binding reads (``ggml_tensor``) is checked field by field against ggml's own accessors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from prima_node import ggml
from prima_node.engine.backend import Backend, Compute, FileBuffer, aligned_bytes, set_input
from prima_node.engine.graph import Builder
from prima_node.quant.quantize import quantize

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def g() -> ggml.Ggml:
    return ggml.load()


def _run(builder: Builder, out: int, inputs: dict[int, np.ndarray], shape: tuple[int, ...],
         threads: int = 2) -> np.ndarray:
    backend = Backend(threads)
    compute = Compute(backend)
    try:
        builder.g.ggml_set_output(out)
        builder.expand(out)
        compute.allocate(builder.graph)
        for t, values in inputs.items():
            set_input(builder.g, t, np.ascontiguousarray(values))
        backend.compute(builder.graph)
        result = np.empty(shape, np.float32)
        builder.g.ggml_backend_tensor_get(out, result.ctypes.data, 0, result.nbytes)
        return result
    finally:
        compute.close()
        backend.close()
        builder.free()


def test_the_pinned_version_from_llama_cpp_python_s_directory(g: ggml.Ggml) -> None:
    assert g.version == ggml.PINNED_VERSION
    assert g.directory == ggml.library_dir()
    assert g.directory.parent.name == "llama_cpp"
    assert g.cpu_description  # the CPU backend was found through the registry


def test_one_copy_of_ggml_per_process(g: ggml.Ggml) -> None:
    """llama.cpp, loaded beside the engine, uses the same ggml: one mapping of each library."""
    import llama_cpp  # noqa: F401  (loads libllama, which links libggml-base)

    maps = Path("/proc/self/maps").read_text().splitlines()
    files = {line.split()[-1] for line in maps if "libggml-base" in line}
    inodes = {line.split()[4] for line in maps if "libggml-base" in line}
    assert len(files) == 1 and len(inodes) == 1, files


def test_tensor_struct_layout(g: ggml.Ggml) -> None:
    b = Builder(8)
    try:
        t = g.ggml_new_tensor_3d(b.ctx, int(Q.Q4_K), 512, 3, 2)
        g.ggml_set_name(t, b"probe")
        fields = g.tensor(t)
        assert fields.type == int(Q.Q4_K)
        assert tuple(fields.ne) == (512, 3, 2, 1) == g.shape(t)
        row = g.ggml_row_size(int(Q.Q4_K), 512)
        assert tuple(fields.nb) == (g.ggml_type_size(int(Q.Q4_K)), row, row * 3, row * 6)
        assert g.ggml_nbytes(t) == row * 6 and g.ggml_nelements(t) == 512 * 6
        assert fields.name == b"probe" and fields.data is None and fields.buffer is None
        assert ctypes_sizeof_matches(g)
    finally:
        b.free()


def ctypes_sizeof_matches(g: ggml.Ggml) -> bool:
    """ggml_tensor_overhead() = sizeof(ggml_object) (32) + sizeof(ggml_tensor)."""
    import ctypes

    return bool(g.ggml_tensor_overhead() == 32 + ctypes.sizeof(ggml.TensorStruct))


def test_elementwise_ops_norm_and_rows(g: ggml.Ggml) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    y = rng.standard_normal((3, 64)).astype(np.float32)
    b = Builder(16)
    tx = b.input("x", ggml.TYPE_F32, 64, 3)
    tw = b.input("w", ggml.TYPE_F32, 64)
    ty = b.input("y", ggml.TYPE_F32, 64, 3)
    ids = b.input("ids", ggml.TYPE_I32, 2)
    normed = g.ggml_mul(b.ctx, g.ggml_rms_norm(b.ctx, tx, 1e-5), tw)
    summed = g.ggml_add(b.ctx, normed, ty)
    picked = g.ggml_get_rows(b.ctx, summed, ids)
    got = _run(b, picked, {tx: x, tw: w, ty: y, ids: np.array([2, 0], np.int32)}, (2, 64))
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w + y
    np.testing.assert_allclose(got, ref[[2, 0]], rtol=1e-5, atol=1e-5)


def test_matrix_product_on_quantized_bytes(g: ggml.Ggml) -> None:
    """A Q8_0 matrix placed in a foreign buffer (as weights in the file mapping are) times
    float32 activations; and ggml's own quantiser writes the same bytes as the project's."""
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((64, 256)) * 0.1).astype(np.float32)
    ours = quantize(values, Q.Q8_0).reshape(-1)
    theirs = np.empty(64 * g.ggml_row_size(int(Q.Q8_0), 256), np.uint8)
    g.ggml_quantize_chunk(int(Q.Q8_0), values.ctypes.data, theirs.ctypes.data, 0, 64, 256, None)
    assert np.array_equal(ours.view(np.uint8), theirs)
    data = aligned_bytes(theirs.nbytes)
    data[:] = theirs
    buffer = FileBuffer(data)
    b = Builder(8)
    try:
        wt = g.ggml_new_tensor_2d(b.ctx, int(Q.Q8_0), 256, 64)
        buffer.place(wt, 0)
        x = rng.standard_normal((5, 256)).astype(np.float32)
        tx = b.input("x", ggml.TYPE_F32, 256, 5)
        got = _run(b, g.ggml_mul_mat(b.ctx, wt, tx), {tx: x}, (5, 64))
    finally:
        buffer.close()
    from gguf.quants import dequantize

    deq = dequantize(theirs.reshape(64, -1), Q.Q8_0).astype(np.float64)
    ref = x.astype(np.float64) @ deq.T
    # ggml rounds the activations to Q8_0 too: 8-bit relative precision
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()


def test_rope_set_rows_and_flash_attention(g: ggml.Ggml) -> None:
    """One head of attention over a float16 cache written with set_rows, against numpy."""
    rng = np.random.default_rng(2)
    hd, T, n_kv = 64, 3, 256
    q = rng.standard_normal((T, hd)).astype(np.float32)
    k = rng.standard_normal((T, hd)).astype(np.float32)
    v = rng.standard_normal((T, hd)).astype(np.float32)
    b = Builder(32)
    cache_k = g.ggml_new_tensor_2d(b.ctx, ggml.TYPE_F16, hd, n_kv)
    cache_v = g.ggml_new_tensor_2d(b.ctx, ggml.TYPE_F16, hd, n_kv)
    tq = b.input("q", ggml.TYPE_F32, hd, T)
    tk = b.input("k", ggml.TYPE_F32, hd, T)
    tv = b.input("v", ggml.TYPE_F32, hd, T)
    pos = b.input("pos", ggml.TYPE_I32, T)
    rows = b.input("rows", ggml.TYPE_I64, T)
    mask = b.input("mask", ggml.TYPE_F16, n_kv, T)
    rq = g.ggml_rope_ext(b.ctx, g.ggml_reshape_3d(b.ctx, tq, hd, 1, T), pos, None, hd,
                         ggml.ROPE_NEOX, 4096, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0)
    rk = g.ggml_rope_ext(b.ctx, g.ggml_reshape_3d(b.ctx, tk, hd, 1, T), pos, None, hd,
                         ggml.ROPE_NEOX, 4096, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0)
    b.expand(g.ggml_set_rows(b.ctx, cache_k, g.ggml_reshape_2d(b.ctx, rk, hd, T), rows))
    b.expand(g.ggml_set_rows(b.ctx, cache_v, tv, rows))
    f16 = ggml.TYPE_F16

    def view(c: int) -> int:
        return g.ggml_permute(b.ctx, g.ggml_view_4d(
            b.ctx, c, hd, 1, n_kv, 1, g.ggml_row_size(f16, hd), g.ggml_row_size(f16, hd),
            g.ggml_row_size(f16, hd * n_kv), 0), 0, 2, 1, 3)

    out = g.ggml_flash_attn_ext(b.ctx, g.ggml_permute(b.ctx, rq, 0, 2, 1, 3), view(cache_k),
                                view(cache_v), mask, 1 / 8, 0.0, 0.0)
    g.ggml_prec_set_acc(out, ggml.PREC_F32)
    out = g.ggml_reshape_2d(b.ctx, out, hd, T)
    cache_buffer = aligned_bytes(2 * hd * n_kv * 2)
    buffer = FileBuffer(cache_buffer)
    try:
        buffer.place(cache_k, 0)
        buffer.place(cache_v, hd * n_kv * 2)
        m = np.full((T, n_kv), -np.inf, np.float16)
        for t in range(T):
            m[t, :t + 1] = 0
        got = _run(b, out, {tq: q, tk: k, tv: v, pos: np.arange(T, dtype=np.int32),
                            rows: np.arange(T, dtype=np.int64), mask: m}, (T, hd))
    finally:
        buffer.close()

    def rope(x: np.ndarray) -> np.ndarray:
        inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None] * inv[None, :]
        a, c = x[:, :hd // 2], x[:, hd // 2:]
        return np.concatenate([a * np.cos(ang) - c * np.sin(ang),
                               a * np.sin(ang) + c * np.cos(ang)], axis=1)

    rq64, rk64 = rope(q.astype(np.float64)), rope(k.astype(np.float64))
    s = rq64 @ rk64.T / 8 + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)
    # float16 queries, keys and values: three decimal digits
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3 * np.abs(ref).max())


def test_repacking_is_offered_and_probed(g: ggml.Ggml) -> None:
    from prima_node.engine.weights import REPACK_BUFFER, Repacker
    from prima_node.model_file import TensorInfo

    assert REPACK_BUFFER in g.extra_buffer_types()
    r = Repacker()
    try:
        def info(qtype: Q, rows: int) -> TensorInfo:
            return TensorInfo("w", qtype, (rows, 256), 0, 0, np.empty(0))

        assert r.can_repack(info(Q.Q4_K, 64))  # AVX2 and up: 8-row interleaving
        assert not r.can_repack(info(Q.Q4_K, 63))  # rows not a multiple of 8
        assert not r.can_repack(info(Q.F32, 64))
    finally:
        r.close()


def test_a_missing_or_foreign_library_is_a_clear_error(tmp_path: Path) -> None:
    code = "import prima_node.ggml as g; g.load()"
    env = {**os.environ, ggml.LIB_DIR_ENV: str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    assert "GgmlUnavailableError" in run.stderr and "scripts/setup" in run.stderr
    assert "core dumped" not in run.stderr.lower()
