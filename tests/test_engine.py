"""The executor against the float64 numpy reference, and the window/session API a ring node
relies on (windows compose, sessions are independent, KV truncation, context limits).

The reference is written from the architectures' published definitions and shares nothing with
the engine but the file reader. ggml computes as llama.cpp does, so the engine differs from it
by llama.cpp's rounding: the attention runs on float16 queries and a float16 cache, and each
matrix product first rounds the activations to the weight's companion type (float16 for F16,
bfloat16 for BF16, Q8_0 blocks for the 32-wide quants, Q8_K blocks of 256 for the K-quants).
Measured as max |logit diff| / std at the last of 33 positions, tiny preset, seed 0
(llama / qwen2 / qwen3):

    F32    0.0035 0.0038 0.0043      Q4_1   0.062 0.064 0.061
    F16    0.0043 0.0034 0.0054      Q5_0   0.058 0.059 0.063
    BF16   0.017  0.013  0.021       Q5_1   0.051 0.061 0.066
    Q8_0   0.056  0.064  0.068       Q4_K_M 0.081 0.085 0.107
    Q4_0   0.053  0.055  0.063       Q5_K_M 0.074 0.083 0.102
                                     Q6_K   0.077 0.083 0.114

The bounds below are about twice the worst of each kind. Errors in the operations every type
shares (RoPE layout or base, the causal mask, the attention scale, norm epsilon: 0.018 to 2.5
on this metric, measured against the previous engine) stand out in the F32 and F16 rows, held
to 0.01; the quantised rows only catch gross errors here, which is why
tests/test_conformance.py holds every type to llama.cpp's own logits, exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import ModelFactory
from reference_model import ReferenceModel

from prima_node import ContextOverflowError, Model

ARCHS = ["llama", "qwen2", "qwen3"]
QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"]


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, vocab, n)]


#: max |diff| / std allowed against the float64 reference (module docstring).
TOLERANCE = {"F32": 0.01, "F16": 0.01, "BF16": 0.04, "Q8_0": 0.14, "Q4_0": 0.14, "Q4_1": 0.14,
             "Q5_0": 0.14, "Q5_1": 0.14, "Q4_K_M": 0.23, "Q5_K_M": 0.23, "Q6_K": 0.23}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", QUANTS)
def test_logits_match_numpy_reference(make_model: ModelFactory, arch: str, quant: str) -> None:
    path = make_model(arch, "tiny", quant)
    with Model.open(path, n_ctx=128, threads=2, repack=False) as m:
        ids = _prompt(33, m.config.n_vocab)
        got = m.logits(ids)
    ref = ReferenceModel(str(path)).logits(ids)
    rel = np.abs(got - ref).max() / ref.std()
    assert rel < TOLERANCE[quant], f"{arch} {quant}: max |diff| / std = {rel:.4f}"


def test_llama_spm_vocab_and_untied_head(make_model: ModelFactory) -> None:
    path = make_model("llama", "small", "Q4_K_M", vocab="spm", layers=2)
    with Model.open(path, n_ctx=64, repack=False) as m:
        assert not m.config.tied_embeddings and m.config.rope_factors is None
        ids = _prompt(20, m.config.n_vocab)
        got = m.logits(ids)
    ref = ReferenceModel(str(path)).logits(ids)
    assert np.abs(got - ref).max() / ref.std() < TOLERANCE["Q4_K_M"]


@pytest.mark.parametrize("arch", ["qwen3", "qwen3moe", "gemma3", "phi3", "gpt-oss"])
def test_windows_compose_to_full_forward(make_model: ModelFactory, arch: str) -> None:
    """Windows cut anywhere give the whole model's logits: a mixture's expert layers, and
    Gemma's and gpt-oss's sliding-window layers (each keeps its kind wherever its window
    starts; gpt-oss's last window picks its rows after its last layer)."""
    with Model.open(make_model(arch, "small", "Q8_0"), n_ctx=64) as m:
        ids = _prompt(12, m.config.n_vocab)
        full = m.logits(ids)
        cuts = [0, 2, 3, m.config.n_layer]
        windows = [m.window(a, b) for a, b in itertools.pairwise(cuts)]
        pos = np.arange(len(ids))
        h = m.embed(ids)
        for w in windows:
            h = w.forward(h, pos, session="s")
        np.testing.assert_allclose(m.output(h[-1:])[0], full, rtol=0, atol=1e-4 * full.std())


def test_incremental_decode_equals_full_prompt(make_model: ModelFactory) -> None:
    with Model.open(make_model("llama", "tiny", "Q4_K_M"), n_ctx=64) as m:
        ids = _prompt(30, m.config.n_vocab)
        full = m.logits(ids)
        m.forward(ids[:10], session="a")
        m.forward(ids[10:29], session="a")
        step = m.forward(ids[29:], session="a")
        np.testing.assert_allclose(step, full, rtol=0, atol=1e-4 * full.std())


def test_sessions_are_independent_and_truncation_reuses_prefix(make_model: ModelFactory) -> None:
    with Model.open(make_model("qwen2", "tiny", "Q8_0"), n_ctx=64) as m:
        a, b = _prompt(20, m.config.n_vocab, 1), _prompt(20, m.config.n_vocab, 2)
        ref_b = m.logits(b)
        m.forward(a, session="a")
        out_b = m.forward(b, session="b")
        np.testing.assert_allclose(out_b, ref_b, rtol=0, atol=1e-4 * ref_b.std())
        # prefix reuse: keep the 12 shared positions of session a and evaluate a new tail
        tail = _prompt(5, m.config.n_vocab, 3)
        m.truncate("a", 12)
        assert m.n_cached("a") == 12
        reused = m.forward(tail, session="a")
        fresh = m.logits(a[:12] + tail)
        np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-4 * fresh.std())


def test_context_limit_is_a_clear_error(make_model: ModelFactory) -> None:
    with Model.open(make_model("llama", "tiny", "F16"), n_ctx=16) as m:
        with pytest.raises(ContextOverflowError, match="beyond the context of 16"):
            m.logits(list(range(1, 18)))
        m.forward(list(range(1, 16)), session="x")
        with pytest.raises(ContextOverflowError):
            m.forward([1, 2], session="x")
        # the failed call lost nothing: the session still continues from position 15
        assert m.n_cached("x") == 15
        m.forward([3], session="x")
        # a prompt over the limit fails before anything runs: no partial cache
        with pytest.raises(ContextOverflowError, match="beyond the context of 16"):
            m.forward(list(range(1, 21)), session="y")
        assert m.n_cached("y") == 0


def test_bad_positions_and_tokens_are_rejected(make_model: ModelFactory) -> None:
    with Model.open(make_model("llama", "tiny", "F16"), n_ctx=32) as m:
        w = m.window(0, 1)
        h = m.embed([1, 2, 3])
        with pytest.raises(ValueError, match="consecutive"):
            w.forward(h, np.array([0, 2, 3]))
        with pytest.raises(ValueError, match="truncate"):
            w.forward(h, np.array([5, 6, 7]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m.embed([m.config.n_vocab])
        with pytest.raises(ValueError, match="outside the model"):
            m.window(0, m.config.n_layer + 1)


def test_layer_byte_ranges_cover_exactly_the_layer(make_model: ModelFactory) -> None:
    path = make_model("qwen2", "tiny", "Q4_K_M")
    with Model.open(path, n_ctx=32) as m:
        w = m.window(1, 2)
        names = [n for n in m.file.tensors if n.startswith("blk.1.")]
        assert len(w.byte_ranges()) == len(names) == len(m.layer_byte_ranges(1))
        assert w.weight_bytes == sum(m.file.tensors[n].n_bytes for n in names)
        assert w.byte_ranges() == m.layer_byte_ranges(1)


def test_closed_windows_and_mismatched_steps_are_errors_not_crashes(
        make_model: ModelFactory) -> None:
    """ggml aborts the process on an out-of-range row or a write past a tensor, and a closed
    window's tensors are freed memory: each is a ValueError here, before ggml sees it."""
    with Model.open(make_model("llama", "tiny", "F16"), n_ctx=32) as m:
        w = m.window(0, 1)
        h = m.embed([1, 2])
        w.close()
        with pytest.raises(ValueError, match="closed"):
            w.forward(h, np.arange(2))
        full = m.window(0, m.config.n_layer)
        with pytest.raises(ValueError, match="4 tokens do not match 2 positions"):
            full.run(np.arange(2), "s", tokens=np.array([1, 2, 3, 4]))
        with pytest.raises(ValueError, match="vocabulary"):
            full.run(np.arange(1), "s", tokens=np.array([10**6]))
        with pytest.raises(ValueError, match="either hidden states or token ids"):
            full.run(np.arange(1), "s")
        assert full.n_cached("s") == 0  # nothing half-done
        assert np.isfinite(full.run(np.arange(2), "s", tokens=np.array([1, 2]), logits=True)).all()
    with pytest.raises(ValueError, match="closed"):
        full.forward(h, np.arange(2), "t")
