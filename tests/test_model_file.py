"""Bad model files fail at open with one clear error naming the file and what is wrong."""

from __future__ import annotations

import itertools
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import ModelFactory
from gguf_edit import rewrite

from prima_node import Model, ModelLoadError
from prima_node.model_file import ModelFile


def _open_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        Model.open(path, n_ctx=64)
    msg = str(info.value)
    assert str(path) in msg, "the error must name the file"
    assert "Traceback" not in msg
    return msg


def _copy(src: Path, dst: Path, size: int | None = None) -> Path:
    shutil.copyfile(src, dst)
    if size is not None:
        with open(dst, "r+b") as fh:
            fh.truncate(size)
    return dst


def _record(data: bytes, tensor: str, field: str) -> tuple[int, str]:
    """Where one field of a tensor's header record is: ``dim0`` (its first dimension),
    ``type`` or ``offset`` (relative to the data section), and its struct format."""
    at = data.index(tensor.encode()) + len(tensor)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return {"dim0": (at + 4, "<Q"), "type": (at + 4 + 8 * n_dims, "<I"),
            "offset": (at + 4 + 8 * n_dims + 4, "<Q")}[field]


def _field(path: Path, tensor: str, field: str) -> int:
    data = path.read_bytes()
    at, fmt = _record(data, tensor, field)
    return int(struct.unpack_from(fmt, data, at)[0])


def _patched(src: Path, dst: Path, tensor: str, field: str, value: int) -> Path:
    """A copy of ``src`` with one field of a tensor's header record changed."""
    p = _copy(src, dst)
    data = bytearray(p.read_bytes())
    at, fmt = _record(data, tensor, field)
    struct.pack_into(fmt, data, at, value)
    p.write_bytes(bytes(data))
    return p


@pytest.fixture
def good(make_model: ModelFactory) -> Path:
    return make_model("qwen2", "tiny", "Q8_0")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "no such file" in _open_error(tmp_path / "absent.gguf")
    assert "directory" in _open_error(tmp_path)


def test_wrong_magic(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(b'{"__metadata__": {}}' + b"\0" * 100)
    msg = _open_error(p)
    assert "not a GGUF file" in msg and "GGUF" in msg


def test_unsupported_version(good: Path, tmp_path: Path) -> None:
    p = _copy(good, tmp_path / "v9.gguf")
    with open(p, "r+b") as fh:
        fh.seek(4)
        fh.write(struct.pack("<I", 9))
    msg = _open_error(p)
    assert "version 9" in msg and "supported: 2, 3" in msg


@pytest.mark.parametrize("where", ["header", "metadata", "tensor data"])
def test_truncated(good: Path, tmp_path: Path, where: str) -> None:
    size = good.stat().st_size
    cut = {"header": 10, "metadata": 2000, "tensor data": size - 1000}[where]
    msg = _open_error(_copy(good, tmp_path / "cut.gguf", cut))
    assert "truncated" in msg
    if where == "tensor data":
        assert "output" in msg or "blk." in msg, "names the tensor whose data is missing"


def test_unsupported_architecture(good: Path, tmp_path: Path) -> None:
    p = rewrite(good, tmp_path / "arch.gguf")
    # rename the architecture key in place: same length keeps the layout valid
    data = bytearray(p.read_bytes())
    i = data.index(b"qwen2", data.index(b"general.architecture"))
    data[i:i + 5] = b"gemma"
    p.write_bytes(bytes(data))
    msg = _open_error(p)
    assert "'gemma'" in msg and "llama" in msg and "qwen3" in msg


def test_unsupported_tensor_type(good: Path, tmp_path: Path) -> None:
    # Q8_K is an activation format: ggml has no kernel that multiplies with Q8_K weights
    p = rewrite(good, tmp_path / "q8k.gguf",
                 retype=("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q8_K))
    msg = _open_error(p)
    assert "blk.0.ffn_up.weight" in msg and "Q8_K" in msg and "Q4_K" in msg


def test_every_weight_type_ggml_runs_loads(good: Path, tmp_path: Path) -> None:
    """A type the engine did not have kernels for before ggml (Q2_K, IQ4_XS, ...) loads and
    runs; the file's zero blocks give finite logits."""
    for qtype in (gguf.GGMLQuantizationType.Q2_K, gguf.GGMLQuantizationType.IQ4_XS):
        p = rewrite(good, tmp_path / f"{qtype.name}.gguf", retype=("blk.0.ffn_up.weight", qtype))
        with Model.open(p, n_ctx=16, threads=1) as m:
            assert np.isfinite(m.logits([1, 2, 3])).all()


@pytest.mark.parametrize(("key", "value", "mentions"), [
    ("qwen2.block_count", 0, "block_count"),
    ("qwen2.embedding_length", 0, "embedding_length"),
    ("qwen2.rope.freq_base", float("nan"), "freq_base"),
    ("qwen2.attention.layer_norm_rms_epsilon", float("inf"), "layer_norm_rms_epsilon"),
    ("qwen2.attention.layer_norm_rms_epsilon", -1e-6, "layer_norm_rms_epsilon"),
    ("qwen2.attention.head_count", 0, "head_count"),
])
def test_impossible_hyperparameters(good: Path, tmp_path: Path, key: str, value: float,
                                    mentions: str) -> None:
    """Values ggml would abort on, divide by zero with, or turn every logit into NaN with are
    refused at open, naming the key (a NaN RoPE base used to load and fail every request)."""
    msg = _open_error(rewrite(good, tmp_path / "h.gguf", set_key=(key, value)))
    assert mentions in msg


def test_a_tensor_the_graph_has_no_place_for(good: Path, tmp_path: Path) -> None:
    """A fused QKV projection (or any tensor this architecture's graph does not use) would be
    silently ignored and every answer computed without it: refused, naming it."""
    p = rewrite(good, tmp_path / "qkv.gguf",
                add={"blk.1.attn_qkv.weight": np.zeros((3 * 256, 256), np.float32)})
    msg = _open_error(p)
    assert "blk.1.attn_qkv.weight" in msg and "no place" in msg
    # a bias qwen2's graph has no place for (llama's has): refused, as llama.cpp does
    p = rewrite(good, tmp_path / "bias.gguf",
                add={"blk.0.ffn_down.bias": np.zeros(256, np.float32)})
    assert "blk.0.ffn_down.bias" in _open_error(p)


def test_zero_sized_tensor(good: Path, tmp_path: Path) -> None:
    msg = _open_error(_patched(good, tmp_path / "zero.gguf", "output_norm.weight", "dim0", 0))
    assert "output_norm.weight" in msg and "zero" in msg


def test_zero_width_embedding(good: Path, tmp_path: Path) -> None:
    msg = _open_error(_patched(good, tmp_path / "width.gguf", "token_embd.weight", "dim0", 0))
    assert "token_embd.weight" in msg


def test_overlapping_tensors(good: Path, tmp_path: Path) -> None:
    """Two tensors declared over the same bytes (a size the header got wrong) are refused
    before ggml would read one as the other."""
    mf = ModelFile.open(good)
    try:
        first, second = sorted(mf.tensors.values(), key=lambda t: t.offset)[:2]
        data_start = first.offset - _field(good, first.name, "offset")
    finally:
        mf.close()
    # the second now starts where the first does
    p = _patched(good, tmp_path / "overlap.gguf", second.name, "offset",
                 first.offset - data_start)
    msg = _open_error(p)
    assert "overlap" in msg and first.name in msg and second.name in msg


def test_unknown_tensor_type_code(good: Path, tmp_path: Path) -> None:
    p = _patched(good, tmp_path / "code.gguf", "blk.0.attn_q.weight", "type", 250)
    msg = _open_error(p)
    assert "blk.0.attn_q.weight" in msg and "unknown type 250" in msg


def test_offset_beyond_file(good: Path, tmp_path: Path) -> None:
    p = _patched(good, tmp_path / "offset.gguf", "blk.1.ffn_down.weight", "offset", 1 << 40)
    msg = _open_error(p)
    assert "blk.1.ffn_down.weight" in msg and "ends at byte" in msg


def test_missing_tensor(good: Path, tmp_path: Path) -> None:
    msg = _open_error(rewrite(good, tmp_path / "t.gguf", drop_tensor="blk.1.attn_k.weight"))
    assert "'blk.1.attn_k.weight'" in msg and "missing" in msg


def test_missing_key(good: Path, tmp_path: Path) -> None:
    msg = _open_error(rewrite(good, tmp_path / "k.gguf", drop_key="qwen2.block_count"))
    assert "'qwen2.block_count'" in msg and "missing" in msg


def test_unsupported_rope_scaling(good: Path, tmp_path: Path) -> None:
    msg = _open_error(rewrite(good, tmp_path / "longrope.gguf",
                               set_key=("qwen2.rope.scaling.type", "longrope")))
    assert "longrope" in msg and "linear" in msg and "yarn" in msg
    # YaRN is supported (gpt-oss), but not without its factor
    msg = _open_error(rewrite(good, tmp_path / "yarn.gguf",
                               set_key=("qwen2.rope.scaling.type", "yarn")))
    assert "qwen2.rope.scaling.factor" in msg


def test_failed_open_leaves_nothing_open(good: Path, tmp_path: Path) -> None:
    import psutil

    p = rewrite(good, tmp_path / "t.gguf", drop_tensor="output_norm.weight")
    proc = psutil.Process()
    before = {m.path for m in proc.memory_maps()}
    for _ in range(3):
        _open_error(p)
    import gc

    gc.collect()
    assert str(p) not in {m.path for m in proc.memory_maps()} - before


def test_tensor_byte_ranges_inside_file(good: Path) -> None:
    mf = ModelFile.open(good)
    try:
        ranges = sorted(t.byte_range for t in mf.tensors.values())
        assert all(0 < a < b <= mf.size for a, b in ranges)
        assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(ranges))
    finally:
        mf.close()


def _vocab_only_file(path: Path, n_tokens: int) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_token_list([f"tok{i}-\u00e9\u4e2d" for i in range(n_tokens)])
    w.add_token_types([1 + i % 3 for i in range(n_tokens)])
    w.add_token_merges([f"a{i} b{i}" for i in range(2 * n_tokens)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_large_vocabulary_stays_in_the_file(tmp_path: Path) -> None:
    """A Llama-3-sized vocabulary must not be copied into the heap at open (gguf-py's reader
    alone holds ~600 MB for one), and must decode exactly like gguf-py when asked for."""
    import re

    def rss_anon_mib() -> float:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"RssAnon:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    p = _vocab_only_file(tmp_path / "vocab.gguf", 128_000)
    before = rss_anon_mib()
    mf = ModelFile.open(p)
    grown = rss_anon_mib() - before
    try:
        assert grown < 16, f"opening grew the heap by {grown:.0f} MiB"
        assert mf.array_length("tokenizer.ggml.tokens") == 128_000
        ref = gguf.GGUFReader(p)
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            assert mf.get(key) == ref.fields[key].contents(), key
    finally:
        mf.close()


def test_truncated_inside_vocabulary(tmp_path: Path) -> None:
    p = _vocab_only_file(tmp_path / "vocab.gguf", 5000)
    with open(p, "r+b") as fh:
        fh.truncate(30_000)
    with pytest.raises(ModelLoadError, match="truncated"):
        ModelFile.open(p)


def test_a_phi3_file_with_longrope_factors_is_refused_naming_them(make_model: ModelFactory,
                                                                   tmp_path: Path) -> None:
    """Phi-3's 128k variants rotate with LongRoPE factors, which this engine does not apply:
    such a file is refused by name rather than run with the wrong positions."""
    path = make_model("phi3", "tiny", "F16")
    mf = ModelFile.open(path)
    try:
        assert "blk.0.attn_qkv.weight" in mf.tensors  # the fused projection phi3 files have
        hd = int(mf.get("phi3.rope.dimension_count"))
    finally:
        mf.close()
    p = rewrite(path, tmp_path / "longrope.gguf",
                add={"rope_factors_long.weight": np.ones(hd // 2, np.float32)})
    msg = _open_error(p)
    assert "rope_factors_long.weight" in msg and "phi3" in msg


def test_a_damaged_gpt_oss_file_names_what_is_wrong(make_model: ModelFactory,
                                                    tmp_path: Path) -> None:
    """gpt-oss's own tensors and keys are checked before ggml sees them: its attention sinks,
    its experts' biases (F32, a row per expert), its sliding-window pattern."""
    oss = make_model("gpt-oss", "tiny", "MXFP4_MOE")
    msg = _open_error(rewrite(oss, tmp_path / "no-sinks.gguf",
                              drop_tensor="blk.0.attn_sinks.weight"))
    assert "blk.0.attn_sinks.weight" in msg
    msg = _open_error(rewrite(oss, tmp_path / "bias.gguf",
                              retype=("blk.1.ffn_up_exps.bias", gguf.GGMLQuantizationType.F16)))
    assert "blk.1.ffn_up_exps.bias" in msg and "F32" in msg
    msg = _open_error(rewrite(oss, tmp_path / "pattern.gguf",
                              set_key=("gpt-oss.attention.sliding_window_pattern", [1, 0])))
    assert "sliding_window_pattern" in msg and "per-layer" in msg
