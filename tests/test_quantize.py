"""Tests for the project's GGUF quantiser and llama.cpp's type mixtures.

Quantised bytes are decoded with ``gguf.quants.dequantize``, an independent
reader of the block layouts, so a wrong layout shows up as a huge error rather
than being hidden by a matching bug in a reader of our own.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from prima_node.quant.ftypes import FTYPES, default_type, tensor_type, use_more_bits
from prima_node.quant.quantize import quantize

Q = GGMLQuantizationType

ROWS, COLS = 16, 1024
STD = 0.02

# Relative RMS error bounds, rms(dequant - x) / rms(x), for N(0, 0.02^2) data.
# A uniform quantiser with step D has error rms D/sqrt(12). The largest of 32
# normal samples is ~2.2 sigma (~2.0 of 16) and the range of 32 is ~4.1 sigma,
# which gives the expected figures below; each bound is ~1.2x that, and always
# well under 2x, so a quantiser that loses one bit of precision (error x2) or
# scrambles the layout (error ~1.4 and more) fails.
NORMAL_BOUND: dict[GGMLQuantizationType, float] = {
    # step amax/127: 2.2/127/3.46 = 0.005
    Q.Q8_0: 0.0065,
    # step amax/8: 2.2/8/3.46 = 0.080 (measured 0.085: rounding of the 8.5 offset)
    Q.Q4_0: 0.100,
    # step range/15: 4.1/15/3.46 = 0.079
    Q.Q4_1: 0.095,
    # step amax/16: 0.040
    Q.Q5_0: 0.050,
    # step range/31: 0.038
    Q.Q5_1: 0.046,
    # Q4_1's grid refined by the make_qkx2_quants search (measured 0.071, and
    # llama.cpp's scalar search gets the same, see test_k_quant_search_...):
    # must beat the plain min/max grid, so the bound sits below Q4_1's 0.079.
    Q.Q4_K: 0.078,
    # same for 5 bits: below Q5_1's 0.038
    Q.Q5_K: 0.0375,
    # symmetric 6 bits on 16 weights: step 2.0/32 -> 0.018 (search gives 0.0176)
    Q.Q6_K: 0.021,
}

BLOCK_TYPES = list(NORMAL_BOUND)
K_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _rel_rms(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.sqrt(np.mean((approx - exact) ** 2)) / np.sqrt(np.mean(exact**2)))


def _roundtrip(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    data = quantize(x, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8
    assert data.shape == (*x.shape[:-1], x.shape[-1] // block * size)
    out = gguf.quants.dequantize(data, qtype).reshape(x.shape)
    assert np.isfinite(out).all()
    return out


@pytest.fixture(scope="module")
def normal() -> np.ndarray:
    return (np.random.default_rng(1234).standard_normal((ROWS, COLS)) * STD).astype(np.float32)


@pytest.fixture(scope="module")
def with_outliers() -> np.ndarray:
    """Normal data; odd rows carry two 20-sigma outliers, row 2 is all zero."""
    x = (np.random.default_rng(99).standard_normal((ROWS, COLS)) * STD).astype(np.float32)
    for r in range(1, ROWS, 2):
        x[r, (97 * r) % COLS] = 20 * STD
        x[r, (331 * r + 5) % COLS] = -20 * STD
    x[2] = 0.0
    return x


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_normal_data_error(qtype: GGMLQuantizationType, normal: np.ndarray) -> None:
    err = _rel_rms(_roundtrip(normal, qtype), normal)
    assert err < NORMAL_BOUND[qtype], f"{qtype.name}: relative rms error {err:.4f}"


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_outliers_and_zero_row(qtype: GGMLQuantizationType, with_outliers: np.ndarray) -> None:
    x = with_outliers
    y = _roundtrip(x, qtype)
    # An all-zero row must decode to exact zeros (ggml special-cases it).
    assert not y[2].any()
    # Rows without outliers are unaffected by the others: blocks are independent.
    clean = [r for r in range(0, ROWS, 2) if r != 2]
    assert _rel_rms(y[clean], x[clean]) < NORMAL_BOUND[qtype]
    # An outlier row: the outlier's block has a ~9x coarser step, which for one
    # 32-weight block in 1024 gives ms error (31 + 81)/32 of a normal row's, i.e.
    # ~1.9x its rms relative to the clean signal; K-quants also lose precision in
    # the 6-bit sub-block scales next to a large one. Bound: 2.5x the normal bound.
    dirty = list(range(1, ROWS, 2))
    mask = np.abs(x[dirty]) < 10 * STD
    err = float(np.sqrt(np.mean((y[dirty] - x[dirty])[mask] ** 2)) / STD)
    assert err < 2.5 * NORMAL_BOUND[qtype], f"{qtype.name}: error {err:.4f} next to outliers"
    # The outliers themselves set their block's scale, so they survive to within
    # a fraction of a step (a 4-bit step is 1/15 of the block range, ~7%).
    big = np.abs(x) > 10 * STD
    np.testing.assert_allclose(y[big], x[big], rtol=0.07)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_constant_rows(qtype: GGMLQuantizationType) -> None:
    """Degenerate blocks (max == min) are stored through the offset or the scale."""
    x = np.empty((3, 256), dtype=np.float32)
    x[0] = -0.01
    x[1] = 0.01
    x[2] = 3.5
    y = _roundtrip(x, qtype)
    # fp16 scales carry 11 bits (5e-4), except that a K-quant super-scale of
    # 0.01/(15*63) = 1.1e-5 is an fp16 subnormal (spacing 6e-8, ~0.6%): same in ggml.
    np.testing.assert_allclose(y, x, rtol=6e-3)


@pytest.mark.parametrize(
    "qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name
)
def test_legacy_types_match_ggml_reference_bits(
    qtype: GGMLQuantizationType, with_outliers: np.ndarray
) -> None:
    # gguf-py's own port of ggml's quantize_row_*_ref: an independent
    # implementation of the same rounding, so the bytes must agree exactly.
    ours = quantize(with_outliers, qtype)
    ref = gguf.quants.quantize(with_outliers, qtype)
    np.testing.assert_array_equal(ours, ref.reshape(ours.shape))


def test_mxfp4_matches_ggml_s_quantiser_bits(with_outliers: np.ndarray,
                                             normal: np.ndarray) -> None:
    """gpt-oss's expert type, against ggml's own quantiser (the one llama.cpp's converter's
    files are checked by): a power-of-two scale per 32 weights, the nearest E2M1 value (the
    first on ties), zero blocks and outliers included."""
    from prima_node import ggml

    g = ggml.load()
    for x in (with_outliers, normal, normal * np.float32(1e-3)):
        x = np.ascontiguousarray(x)
        ours = quantize(x, Q.MXFP4)
        theirs = np.empty_like(ours)
        g.ggml_quantize_chunk(int(Q.MXFP4), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0],
                              x.shape[1], None)
        np.testing.assert_array_equal(ours, theirs)


# --- a straightforward scalar transcription of ggml's K-quant scale searches --
# (make_qkx2_quants and make_qx_quants, one group at a time, float32 like the
# C code), used only to check that the vectorised search is not worse.


def _ref_qkx2(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
              ) -> tuple[float, float]:
    f = np.float32
    w = np.sqrt(f((x * x).sum() / 32)) + np.abs(x)
    lo, hi = min(f(x.min()), f(0)), f(x.max())
    if hi == lo:
        return 0.0, float(-lo)
    sw, sx = f(w.sum()), f((w * x).sum())
    iscale = f(nmax) / (hi - lo)
    scale = 1 / iscale
    lv = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    best = (w * (scale * lv + lo - x) ** 2).sum()
    for step in range(nstep + 1):
        iscale = f(rmin + rdelta * step + nmax) / (hi - lo)
        lv = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
        sl, sl2, sxl = (w * lv).sum(), (w * lv * lv).sum(), (w * lv * x).sum()
        det = sw * sl2 - sl * sl
        if det > 0:
            s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
            if m > 0:
                s, m = sxl / sl2, f(0)
            err = (w * (s * lv + m - x) ** 2).sum()
            if err < best:
                best, scale, lo = err, s, m
    return float(scale), float(-lo)


def _ref_k_affine(block: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                  ) -> np.ndarray:
    groups = block.reshape(8, 32)
    fits = [_ref_qkx2(g, nmax, rmin, rdelta, nstep) for g in groups]
    scales = np.array([s for s, _ in fits], np.float32)
    mins = np.array([m for _, m in fits], np.float32)
    d = np.float32(np.float16(max(scales.max(), 0) / 63))
    dm = np.float32(np.float16(max(mins.max(), 0) / 63))
    ls = np.minimum(63, np.rint(63 / scales.max() * scales)) if scales.max() > 0 else scales * 0
    lm = np.minimum(63, np.rint(63 / mins.max() * mins)) if mins.max() > 0 else mins * 0
    out = []
    for g, a, b in zip(groups, d * ls, dm * lm, strict=True):
        lv = np.clip(np.rint((g + b) / a), 0, nmax) if a else np.zeros(32)
        out.append(a * lv - b)
    return np.concatenate(out)


def _ref_qx(x: np.ndarray, nmax: int) -> float:
    mx = x[np.abs(x).argmax()]
    if abs(mx) < 1e-15:
        return 0.0
    w = x * x

    def sums(iscale: float) -> tuple[float, float]:
        lv = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return float((w * x * lv).sum()), float((w * lv * lv).sum())

    sumlx, suml2 = sums(-nmax / mx)
    scale = sumlx / suml2 if suml2 else 0.0
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        sumlx, suml2 = sums(-(nmax + 0.1 * step) / mx)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


def _ref_q6_k(block: np.ndarray) -> np.ndarray:
    groups = block.reshape(16, 16)
    scales = np.array([_ref_qx(g, 32) for g in groups], np.float32)
    top = scales[np.abs(scales).argmax()]
    iscale = np.float32(-128) / top
    d = np.float32(np.float16(1 / iscale))
    sc = np.minimum(127, np.rint(iscale * scales))
    return np.concatenate(
        [d * s * np.clip(np.rint(g / (d * s)), -32, 31) for g, s in zip(groups, sc, strict=True)]
    )


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_search_matches_scalar_reference(
    qtype: GGMLQuantizationType, with_outliers: np.ndarray
) -> None:
    x = with_outliers[:2, :1024]  # one clean and one outlier row, 8 super-blocks
    ref_fn = {
        Q.Q4_K: lambda b: _ref_k_affine(b, 15, -1.0, 0.1, 20),
        Q.Q5_K: lambda b: _ref_k_affine(b, 31, -0.5, 0.1, 15),
        Q.Q6_K: _ref_q6_k,
    }[qtype]
    ref = np.stack([ref_fn(b) for b in x.reshape(-1, 256)]).reshape(x.shape)
    ours = _roundtrip(x, qtype)
    # Same algorithm up to float summation order: the error level must agree to
    # well within 1% (a grid search that misses candidates is 1-5% worse).
    assert _rel_rms(ours, x) <= 1.005 * _rel_rms(ref, x)


# --- float formats ------------------------------------------------------------


def _bf16_reference(v: float) -> int:
    """Nearest bfloat16 by comparing the two neighbours in exact arithmetic."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return (bits >> 16) | 0x40  # quiet NaN, as ggml

    def value(p: int) -> float:
        if p & 0x7FFF == 0x7F80:  # one past the largest finite: continue the exponent
            return (-1.0 if p & 0x8000 else 1.0) * 2.0**128
        return struct.unpack("<f", struct.pack("<I", p << 16))[0]

    lo = bits >> 16
    if bits & 0xFFFF == 0 or bits & 0x7FFFFFFF == 0x7F800000:
        return lo
    hi = lo + 1
    dlo, dhi = abs(v - value(lo)), abs(value(hi) - v)
    if dlo != dhi:
        return lo if dlo < dhi else hi
    return lo if lo % 2 == 0 else hi


def test_bf16_rounds_to_nearest_even() -> None:
    specials = [
        0x3F808000,  # exact tie, even below -> stays
        0x3F818000,  # exact tie, odd below -> rounds up
        0x3F808001,  # just above a tie
        0x3F807FFF,  # just below a tie
        0x7F7FFFFF,  # largest float: rounds to inf as in ggml
        0x00000001,  # smallest subnormal
        0x80000000,  # -0
        0x7F800000,  # inf
        0xFF800000,  # -inf
        0x7FC00000,  # quiet NaN
        0x7F800001,  # signalling NaN -> quieted
        0xFFFFFFFF,  # negative NaN with all bits set (uint32 wrap-around case)
    ]
    rand = np.random.default_rng(5).standard_normal(2000).astype(np.float32) * STD
    x = np.concatenate([np.array(specials, np.uint32).view(np.float32), rand])
    got = quantize(x, Q.BF16)
    assert got.dtype == np.uint8 and got.shape == (x.size * 2,)
    want = np.array([_bf16_reference(float(v)) for v in x], dtype="<u2")
    np.testing.assert_array_equal(got.view("<u2"), want)
    # and it agrees with gguf-py's converter on ordinary 2-D data
    m = rand.reshape(40, 50)
    np.testing.assert_array_equal(quantize(m, Q.BF16), gguf.quants.quantize(m, Q.BF16))


def test_f16_and_f32(normal: np.ndarray) -> None:
    h = quantize(normal, Q.F16)
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h, normal.astype(np.float16))
    f = quantize(normal.astype(np.float64), Q.F32)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, normal)


def test_one_dimensional_input_stays_one_dimensional() -> None:
    v = np.linspace(-1, 1, 512, dtype=np.float32)
    assert quantize(v, Q.F32).shape == (512,)
    assert quantize(v, Q.Q8_0).shape == (512 // 32 * 34,)
    assert quantize(v, Q.Q6_K).shape == (2 * 210,)


def test_rejects_bad_rows_and_types() -> None:
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        quantize(np.zeros((2, 384), np.float32), Q.Q4_K)
    with pytest.raises(ValueError, match="multiple of the Q8_0 block size 32"):
        quantize(np.zeros((2, 100), np.float32), Q.Q8_0)
    with pytest.raises(ValueError, match="not supported"):
        quantize(np.zeros((2, 256), np.float32), Q.Q2_K)
    bad = np.zeros((2, 256), np.float32)
    bad[1, 7] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        quantize(bad, Q.Q4_K)
    assert np.isnan(quantize(bad, Q.F16)[1, 7])  # float formats carry NaN as is


def test_gguf_writer_roundtrip(tmp_path: Path, normal: np.ndarray) -> None:
    """The arrays go straight into GGUFWriter and read back with their types."""
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    types = [Q.F32, Q.F16, Q.BF16, *BLOCK_TYPES]
    arrays = {}
    for t in types:
        arrays[t] = quantize(normal[:4, :512], t)
        writer.add_tensor(f"t_{t.name}", arrays[t], raw_dtype=t)
    writer.add_tensor("norm", quantize(normal[0, :512], Q.F32), raw_dtype=Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    for t in types:
        rt = by_name[f"t_{t.name}"]
        assert rt.tensor_type == t
        assert [int(n) for n in rt.shape] == [512, 4]  # ggml order: row length first
        np.testing.assert_array_equal(
            np.asarray(rt.data).view(np.uint8).reshape(-1), arrays[t].view(np.uint8).reshape(-1)
        )
    assert [int(n) for n in by_name["norm"].shape] == [512]


# --- llama.cpp type mixtures --------------------------------------------------

D, FF = 4096, 11008


def _layer_types(ftype: str, kind: str, n_layer: int, **kw: object) -> list[GGMLQuantizationType]:
    shape = (D, FF) if kind == "ffn_down" else (D // 4, D)
    return [
        tensor_type(ftype, f"blk.{i}.{kind}.weight", shape, n_layer=n_layer, has_output=True, **kw)
        for i in range(n_layer)
    ]


def test_ftype_table() -> None:
    assert FTYPES["Q4_K_M"] == LlamaFileType.MOSTLY_Q4_K_M
    assert FTYPES["Q5_K_M"] == LlamaFileType.MOSTLY_Q5_K_M
    assert FTYPES["F16"] == LlamaFileType.MOSTLY_F16
    assert FTYPES["F32"] == LlamaFileType.ALL_F32
    assert default_type("Q4_K_M") == Q.Q4_K
    with pytest.raises(ValueError, match="unknown file type"):
        default_type("Q4_K_X")


def test_use_more_bits_layers() -> None:
    # n/8 = 2 and 7n/8 = 14 for 16 layers: 0,1, 14,15 and every third from 4
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    # 2 layers: n/8 = 0, 7n/8 = 1 -> only the last layer
    assert [i for i in range(2) if use_more_bits(i, 2)] == [1]


@pytest.mark.parametrize(("ftype", "base"), [("Q4_K_M", Q.Q4_K), ("Q5_K_M", Q.Q5_K)])
@pytest.mark.parametrize("kind", ["attn_v", "ffn_down"])
def test_m_mixtures_promote_use_more_bits_layers(
    ftype: str, base: GGMLQuantizationType, kind: str
) -> None:
    more16 = {0, 1, 4, 7, 10, 13, 14, 15}
    assert _layer_types(ftype, kind, 16) == [
        Q.Q6_K if i in more16 else base for i in range(16)
    ]
    assert _layer_types(ftype, kind, 2) == [base, Q.Q6_K]
    for other in ("attn_q", "attn_k", "attn_output", "ffn_up", "ffn_gate"):
        assert set(_layer_types(ftype, other, 16)) == {base}


def test_s_mixtures() -> None:
    assert _layer_types("Q4_K_S", "attn_v", 16) == [Q.Q5_K] * 4 + [Q.Q4_K] * 12
    assert _layer_types("Q4_K_S", "ffn_down", 16) == [Q.Q5_K] * 2 + [Q.Q4_K] * 14
    assert set(_layer_types("Q5_K_S", "attn_v", 16)) == {Q.Q5_K}
    assert set(_layer_types("Q5_K_S", "ffn_down", 16)) == {Q.Q5_K}


def test_70b_label_lifts_q4_k_attn_v() -> None:
    v = _layer_types("Q4_K_M", "attn_v", 80, n_gqa=8)
    assert {v[i] for i in range(80) if use_more_bits(i, 80)} == {Q.Q6_K}
    assert {v[i] for i in range(80) if not use_more_bits(i, 80)} == {Q.Q5_K}
    # without GQA an 80-layer llama is the 65B: no lift; ffn_down is never lifted
    assert Q.Q4_K in _layer_types("Q4_K_M", "attn_v", 80, n_gqa=1)
    assert Q.Q4_K in _layer_types("Q4_K_M", "ffn_down", 80, n_gqa=8)
    assert Q.Q4_K in _layer_types("Q4_K_M", "attn_v", 80, n_gqa=8, arch="qwen3")


@pytest.mark.parametrize(
    ("ftype", "expected"),
    [
        ("Q4_K_M", Q.Q6_K), ("Q5_K_M", Q.Q6_K), ("Q4_K_S", Q.Q6_K), ("Q6_K", Q.Q6_K),
        ("Q4_0", Q.Q6_K), ("Q5_1", Q.Q6_K), ("Q8_0", Q.Q8_0), ("F16", Q.F16),
        ("BF16", Q.BF16), ("F32", Q.F32),
    ],
)
def test_output_and_embeddings(ftype: str, expected: GGMLQuantizationType) -> None:
    vocab = 32000
    out = tensor_type(ftype, "output.weight", (vocab, D), n_layer=16, has_output=True)
    assert out == expected
    # tied embeddings: token_embd is the output projection and is typed like it
    tied = tensor_type(ftype, "token_embd.weight", (vocab, D), n_layer=16, has_output=False)
    assert tied == expected
    # untied: token_embd keeps the file's default type
    untied = tensor_type(ftype, "token_embd.weight", (vocab, D), n_layer=16, has_output=True)
    assert untied == default_type(ftype)


def test_one_dimensional_tensors_stay_f32() -> None:
    for ftype in ("Q4_K_M", "Q8_0", "F16", "BF16"):
        for name in ("blk.3.attn_norm.weight", "output_norm.weight", "rope_freqs.weight",
                     "blk.0.attn_q.bias"):
            assert tensor_type(ftype, name, (D,), n_layer=16, has_output=True) == Q.F32
        # 2-D but a norm (qwen3's per-head q/k norms are 1-D; this guards the name rule)
        assert tensor_type(ftype, "blk.0.attn_q_norm.weight", (2, 128), n_layer=16,
                           has_output=True) == Q.F32


def test_rows_not_multiple_of_256_fall_back() -> None:
    def t(ftype: str, name: str, cols: int = 384) -> GGMLQuantizationType:
        return tensor_type(ftype, name, (D, cols), n_layer=16, has_output=True)

    assert t("Q4_K_M", "blk.2.attn_q.weight") == Q.Q5_0
    assert t("Q4_K_M", "blk.0.attn_v.weight") == Q.Q8_0  # Q6_K layer -> Q8_0
    assert t("Q4_K_M", "blk.2.attn_v.weight") == Q.Q5_0
    assert t("Q5_K_M", "blk.2.ffn_down.weight") == Q.Q5_1
    assert t("Q6_K", "blk.2.ffn_up.weight") == Q.Q8_0
    assert t("Q4_K_M", "output.weight") == Q.Q8_0  # row not a multiple of 256
    assert t("Q4_K_M", "token_embd.weight") == Q.Q5_0
    assert t("Q4_0", "blk.2.ffn_up.weight") == Q.Q4_0  # 384 is a multiple of 32
    # 48 is a multiple of neither 256 nor 32: llama.cpp falls back to F16
    assert t("Q4_K_M", "blk.2.attn_q.weight", 48) == Q.F16
    with pytest.raises(ValueError, match="no fallback"):
        t("Q8_0", "blk.2.attn_q.weight", 48)
