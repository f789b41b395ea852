"""The ``prima-node`` command line as a user runs it: a fresh interpreter per command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import ModelFactory
from gguf import GGMLQuantizationType as Q

from prima_node.bench import JSON_FIELDS

MAKE_QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prima_node.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit status 2, no traceback, exactly one error line; returns that line."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def expected_type(quant: str, name: str) -> Q:
    """The type llama.cpp's quantiser gives each tensor of the tiny llama preset.

    Written out by hand from llama.cpp's rules (src/llama-quant.cpp) for this shape: 2 layers,
    widths 256 / 768 (multiples of every block size), tied embeddings. Not derived from
    prima_node.quant.ftypes, so it checks that module rather than repeating it.
    - 1-D tensors (norms, rope_freqs) stay F32;
    - F32 / F16 / BF16 / Q8_0 / Q6_K: every matrix has that type (Q8_0 keeps a Q8_0 output);
    - otherwise the output projection, here the tied token_embd, is promoted to Q6_K;
    - Q4_K_M / Q5_K_M: attn_v and ffn_down of the "more bits" layers become Q6_K;
      use_more_bits(i, n=2) is i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2: layer 1 only.
    """
    if not name.endswith(".weight") or "norm" in name or name == "rope_freqs.weight":
        return Q.F32
    base = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0,
            "Q4_K_M": Q.Q4_K, "Q5_K_M": Q.Q5_K, "Q6_K": Q.Q6_K}[quant]
    if base in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
        return base
    if name == "token_embd.weight":
        return Q.Q6_K
    if quant in ("Q4_K_M", "Q5_K_M") and name in ("blk.1.attn_v.weight",
                                                  "blk.1.ffn_down.weight"):
        return Q.Q6_K
    return base


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ``make-model`` per file type, written by the command line."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for quant in MAKE_QUANTS:
        path = root / f"tiny-{quant}.gguf"
        proc = _ok(cli("make-model", str(path), "--preset", "tiny", "--quant", quant))
        assert str(path) in proc.stdout
        out[quant] = path
    return out


@pytest.mark.parametrize("quant", MAKE_QUANTS)
def test_make_model_writes_the_ftype_mixture(made: dict[str, Path], quant: str) -> None:
    reader = gguf.GGUFReader(made[quant])
    types = {t.name: Q(t.tensor_type) for t in reader.tensors}
    assert "output.weight" not in types  # tiny ties the output to the embedding
    assert "blk.1.ffn_down.weight" in types and "blk.2.attn_q.weight" not in types
    wrong = {n: (t.name, expected_type(quant, n).name) for n, t in types.items()
             if t != expected_type(quant, n)}
    assert not wrong, f"{quant}: (got, expected) {wrong}"
    if quant == "Q4_K_M":  # the point of the mixture, spelled out
        assert types["token_embd.weight"] == Q.Q6_K
        assert {Q.Q4_K, Q.Q6_K, Q.F32} == set(types.values())
    ftype = reader.get_field("general.file_type")
    assert ftype is not None
    assert int(ftype.contents()) == int(
        {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17,
         "Q6_K": 18}[quant])


@pytest.mark.parametrize("quant", MAKE_QUANTS)
def test_make_model_output_loads_in_llama_cpp(made: dict[str, Path], quant: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(made[quant]), n_ctx=64, n_threads=1,
                          vocab_only=False, verbose=False)
    try:
        assert llm.n_vocab() == 2048
    finally:
        llm.close()


def test_make_model_is_reproducible_by_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    for path, seed in ((a, "7"), (b, "7"), (c, "8")):
        _ok(cli("make-model", str(path), "--quant", "Q4_K_M", "--seed", seed))
    assert a.read_bytes() == b.read_bytes()
    ra, rc = gguf.GGUFReader(a), gguf.GGUFReader(c)
    ta = {t.name: np.asarray(t.data) for t in ra.tensors}
    tc = {t.name: np.asarray(t.data) for t in rc.tensors}
    assert ta.keys() == tc.keys()
    for name in ta:
        if name == "rope_freqs.weight":  # derived from the shape, not random
            assert np.array_equal(ta[name], tc[name])
        else:
            assert not np.array_equal(ta[name], tc[name]), f"{name} did not change with the seed"


@pytest.mark.parametrize(("args", "mentions"), [
    (["--quant", "Q3_K"], "Q3_K"),
    (["--layers", "0"], "layer"),
    (["--layers", "two"], "two"),
    (["--preset", "huge"], "huge"),
])
def test_make_model_bad_arguments(tmp_path: Path, args: list[str], mentions: str) -> None:
    out = tmp_path / "bad.gguf"
    line = _one_line_error(cli("make-model", str(out), *args))
    assert mentions in line
    assert not list(tmp_path.iterdir()), "a failed make-model left a file behind"


def test_bad_option_is_a_single_line(tmp_path: Path) -> None:
    proc = cli("make-model", str(tmp_path / "bad.gguf"), "--quant", "Q3_K")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bench_json(make_model: ModelFactory) -> None:
    path = make_model("llama", "tiny", "Q4_K_M")
    proc = _ok(cli("bench", "--model", str(path), "--threads", "1", "--prompt-tokens", "16",
                   "--gen-tokens", "4", "--repeats", "1", "--json"))
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert isinstance(result, dict)
    assert set(JSON_FIELDS) <= set(result), set(JSON_FIELDS) - set(result)
    assert result["model"] == str(path)
    assert (result["threads"], result["prompt_tokens"], result["gen_tokens"]) == (1, 16, 4)
    rounds = ("decode_ratio_rounds", "prefill_ratio_rounds")
    for key in JSON_FIELDS:
        if key not in ("model", *rounds):
            assert isinstance(result[key], int | float), (key, result[key])  # llama_cpp present
    assert result["rounds"] == 1 and all(len(result[k]) == 1 for k in rounds)
    for key in ("engine_prefill_tok_s", "engine_decode_ms", "llama_prefill_tok_s",
                "llama_decode_ms", "memory_bandwidth_gb_s", "weight_bytes_per_token"):
        assert result[key] > 0, key
    assert result["engine_decode_ms_min"] <= result["engine_decode_ms"]
    assert result["llama_decode_ms_min"] <= result["llama_decode_ms"]
    # one round: the median of the rounds' ratios is that round's ratio of the two engines
    assert result["decode_ratio"] == pytest.approx(
        result["engine_decode_ms"] / result["llama_decode_ms"], rel=1e-9)
    assert result["prefill_ratio"] == pytest.approx(
        result["engine_prefill_tok_s"] / result["llama_prefill_tok_s"], rel=1e-9)
    assert result["bandwidth_fraction"] == pytest.approx(
        result["effective_bandwidth_gb_s"] / result["memory_bandwidth_gb_s"], rel=1e-9)
    # tiny ties the output to the embedding: the layers plus the whole embedding matrix
    assert result["weight_bytes_per_token"] < path.stat().st_size


def test_generate_rejects_a_non_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.gguf"
    bogus.write_text("this is not a model\n")
    line = _one_line_error(cli("generate", "--model", str(bogus), "--max-tokens", "2"))
    assert str(bogus) in line and "GGUF" in line


def test_generate_reports_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    line = _one_line_error(cli("generate", "--model", str(missing), "--max-tokens", "2"))
    assert str(missing) in line
