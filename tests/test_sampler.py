"""The sampler chain against its definition and against llama.cpp's own samplers.

llama.cpp's sampler API (through llama_cpp) runs on a token-data array of the same logits; where
it defines a step (top-k, top-p, min-p, penalties) the surviving tokens and logits must match.
Distributions are checked by drawing: empirical frequencies must lie within a binomial bound
computed from the number of draws and a family-wise error rate, not a hand-picked tolerance.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import llama_cpp
import numpy as np
import pytest

from prima_node.text.sampler import Sampler, SamplingParams

FULL: dict[str, Any] = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # nothing cut


def logits_for(seed: int, n: int = 512, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x.astype(np.float64) - np.max(x))
    return z / z.sum()


def llama_cpp_apply(samplers: Sequence[Any], logits: np.ndarray,
                    history: Sequence[int] = ()) -> dict[int, float]:
    """Run llama.cpp samplers in order over ``logits``: surviving token id -> its logit."""
    n = logits.size
    data: Any = (llama_cpp.llama_token_data * n)()
    for i in range(n):
        data[i].id, data[i].logit, data[i].p = i, float(logits[i]), 0.0
    arr: Any = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    try:
        for s in samplers:
            for t in history:
                llama_cpp.llama_sampler_accept(s, t)
            llama_cpp.llama_sampler_apply(s, ctypes.byref(arr))
        return {arr.data[i].id: arr.data[i].logit for i in range(arr.size)}
    finally:
        for s in samplers:
            llama_cpp.llama_sampler_free(s)


def lc_penalties(last_n: int, repeat: float, freq: float, present: float) -> Any:
    # The binding declares a leading n_vocab argument that the C function no longer has; giving
    # last_n for both puts the right value in the right register either way.
    return llama_cpp.llama_sampler_init_penalties(last_n, last_n, repeat, freq, present)


def kept(s: Sampler, logits: np.ndarray) -> set[int]:
    return set(np.flatnonzero(s.probabilities(logits)).tolist())


def within_binomial(counts: np.ndarray, probs: np.ndarray, n: int, alpha: float = 1e-6) -> None:
    """Every count is within a two-sided normal-approximation binomial bound (Bonferroni)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the distribution"
    k = int(support.sum())
    z = NormalDist().inv_cdf(1 - alpha / (2 * k))
    mean = n * probs[support]
    bound = z * np.sqrt(mean * (1 - probs[support])) + 1  # +1: continuity
    dev = np.abs(counts[support] - mean)
    assert (dev <= bound).all(), f"max deviation {dev.max():.1f} over bound {bound.min():.1f}"


# ---------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_the_argmax(temperature: float) -> None:
    for seed in range(5):
        x = logits_for(seed)
        s = Sampler(SamplingParams(temperature=temperature, top_k=3, top_p=0.5), x.size)
        assert s.sample(x) == int(np.argmax(x))
        p = s.probabilities(x)
        assert p[int(np.argmax(x))] == 1.0 and p.sum() == 1.0


def test_same_seed_same_sequence_other_seed_differs() -> None:
    xs = [logits_for(100 + i, scale=0.5) for i in range(64)]

    def run(seed: int | None) -> tuple[int, list[int]]:
        s = Sampler(SamplingParams(seed=seed, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0),
                    512)
        return s.seed, [s.sample(x) for x in xs]

    _, a = run(7)
    assert run(7)[1] == a
    assert run(8)[1] != a
    seed, c = run(None)  # drawn from the OS, but reported so that it can be replayed
    assert run(seed)[1] == c


def test_seed_may_be_large_or_negative() -> None:
    for seed in (0, 2**64 - 1, -(2**63)):
        s = Sampler(SamplingParams(seed=seed), 16)
        assert s.seed == seed
        s.sample(logits_for(0, 16))


def test_draws_follow_the_tempered_softmax() -> None:
    x = logits_for(3, 24, scale=1.0)
    params = SamplingParams(seed=11, **{**FULL, "temperature": 0.7})
    s = Sampler(params, x.size)
    n = 40_000
    counts = np.bincount([s.sample(x) for _ in range(n)], minlength=x.size)
    within_binomial(counts, softmax(x / 0.7), n)


def test_draws_over_a_large_vocabulary_follow_the_softmax() -> None:
    """Above a few thousand candidates the draw finds its block first; the law must not move."""
    x = logits_for(14, 20_000, scale=1.0)
    x[[5, 1023, 1024, 19_999]] += 6.0  # heavy tokens at block edges and at the very end
    s = Sampler(SamplingParams(seed=5, **FULL), x.size)
    n = 20_000
    draws = np.array([s.sample(x) for _ in range(n)])
    p = softmax(x)
    groups = np.minimum(np.arange(x.size) // 500, 39)  # 40 groups of ids, spanning blocks
    for heavy in (5, 1023, 1024, 19_999):
        groups[heavy] = 40 + [5, 1023, 1024, 19_999].index(heavy)
    within_binomial(np.bincount(groups[draws], minlength=44),
                    np.bincount(groups, weights=p, minlength=44), n)


# ---------------------------------------------------------------------------------- cuts


def test_top_k_keeps_exactly_the_k_best_as_llama_cpp() -> None:
    for seed, k in [(0, 1), (1, 7), (2, 40), (3, 511)]:
        x = logits_for(seed)
        s = Sampler(SamplingParams(**{**FULL, "top_k": k}), x.size)
        got = kept(s, x)
        assert len(got) == k
        assert got == set(np.argsort(-x)[:k].tolist())
        assert got == set(llama_cpp_apply([llama_cpp.llama_sampler_init_top_k(k)], x))


@pytest.mark.parametrize("top_k", [0, 50])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_with_mass_p_as_llama_cpp(top_k: int, top_p: float) -> None:
    for seed in range(4):
        x = logits_for(seed)
        s = Sampler(SamplingParams(**{**FULL, "top_k": top_k, "top_p": top_p}), x.size)
        got = kept(s, x)
        chain = [llama_cpp.llama_sampler_init_top_k(top_k), llama_cpp.llama_sampler_init_top_p(
            top_p, 1)] if top_k else [llama_cpp.llama_sampler_init_top_p(top_p, 1)]
        assert got == set(llama_cpp_apply(chain, x))
        # and by definition: the best tokens, whose mass reaches p, and one fewer would not
        pool = np.argsort(-x)[:top_k] if top_k else np.argsort(-x)
        q = softmax(x[pool])
        size = len(got)
        assert got == set(pool[:size].tolist())
        assert q[:size].sum() >= top_p - 1e-6 and (size == 1 or q[:size - 1].sum() < top_p)


def test_top_p_draws_follow_the_renormalised_distribution() -> None:
    x = logits_for(5, 64, scale=1.5)
    s = Sampler(SamplingParams(seed=3, **{**FULL, "top_p": 0.8}), x.size)
    p = softmax(x)
    order = np.argsort(-p)
    size = int(np.searchsorted(np.cumsum(p[order]), 0.8)) + 1
    expect = np.zeros_like(p)
    expect[order[:size]] = p[order[:size]] / p[order[:size]].sum()
    n = 40_000
    counts = np.bincount([s.sample(x) for _ in range(n)], minlength=x.size)
    within_binomial(counts, expect, n)


def test_top_p_on_a_flat_large_vocabulary_without_top_k() -> None:
    """The head-only sort must grow until it holds the mass (nearly the whole vocabulary)."""
    x = logits_for(9, 131_072, scale=0.05)
    s = Sampler(SamplingParams(**{**FULL, "top_p": 0.97}), x.size)
    p = softmax(x)
    order = np.argsort(-p, kind="stable")
    size = int(np.searchsorted(np.cumsum(p[order]), 0.97)) + 1
    got = kept(s, x)
    assert len(got) == size and got == set(order[:size].tolist())


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.3])
def test_min_p_keeps_tokens_within_a_factor_of_the_best_as_llama_cpp(min_p: float) -> None:
    for seed in range(4):
        x = logits_for(seed)
        s = Sampler(SamplingParams(**{**FULL, "min_p": min_p}), x.size)
        got = kept(s, x)
        p = softmax(x)
        assert got == set(np.flatnonzero(p >= min_p * p.max()).tolist())
        assert got == set(llama_cpp_apply([llama_cpp.llama_sampler_init_min_p(min_p, 1)], x))


def test_default_chain_matches_llama_cpp_order() -> None:
    """top-k 40, top-p 0.95, min-p 0.05 at temperature 0.8, then the kept probabilities."""
    for seed in range(4):
        x = logits_for(seed, scale=1.0)
        s = Sampler(SamplingParams(), x.size)
        ref = llama_cpp_apply([llama_cpp.llama_sampler_init_top_k(40),
                               llama_cpp.llama_sampler_init_top_p(0.95, 1),
                               llama_cpp.llama_sampler_init_min_p(0.05, 1),
                               llama_cpp.llama_sampler_init_temp(0.8)], x)
        got = s.probabilities(x)
        ids = np.array(sorted(ref))
        assert set(np.flatnonzero(got).tolist()) == set(ids.tolist())
        np.testing.assert_allclose(got[ids], softmax(np.array([ref[i] for i in ids])),
                                   rtol=1e-5)


def test_temperature_sharpens_and_flattens() -> None:
    x = logits_for(4, 64)
    ent = []
    for t in (0.25, 0.5, 1.0, 2.0):
        p = Sampler(SamplingParams(**{**FULL, "temperature": t}), x.size).probabilities(x)
        np.testing.assert_allclose(p, softmax(x / t), rtol=1e-9, atol=1e-15)
        ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert ent == sorted(ent)


def test_temperature_applies_after_the_cuts() -> None:
    """min-p and top-p cut on the temperature-1 distribution (llama.cpp's order)."""
    x = logits_for(6, 128)
    cold = Sampler(SamplingParams(**{**FULL, "min_p": 0.1, "temperature": 0.2}), x.size)
    hot = Sampler(SamplingParams(**{**FULL, "min_p": 0.1, "temperature": 5.0}), x.size)
    assert kept(cold, x) == kept(hot, x)


# ---------------------------------------------------------------------------------- penalties


def implied_logits(s: Sampler, x: np.ndarray, ref: int) -> np.ndarray:
    """The adjusted logits, read back from the full distribution relative to token ``ref``."""
    p = s.probabilities(x)
    return np.log(p) - np.log(p[ref]) + x[ref]


@pytest.mark.parametrize("repeat,freq,present,last_n", [
    (1.3, 0.0, 0.0, 64), (1.0, 0.4, 0.0, 64), (1.0, 0.0, 0.7, 64), (1.15, 0.25, 0.5, 6),
    (1.2, 0.1, 0.1, -1)])
def test_penalties_match_llama_cpp_and_touch_only_recent_tokens(
        repeat: float, freq: float, present: float, last_n: int) -> None:
    x = logits_for(7, 64, scale=1.0)
    prompt = [3, 5, 5, 9]
    sampled = [5, 12, 3, 3, 40, 41, 42]
    params = SamplingParams(repeat_penalty=repeat, frequency_penalty=freq,
                            presence_penalty=present, repeat_last_n=last_n, **FULL)
    s = Sampler(params, x.size)
    s.feed_prompt(prompt)
    driver = np.full(x.size, -1e4, dtype=np.float32)
    for t in sampled:  # make the sampler record exactly these tokens
        forced = driver.copy()
        forced[t] = 0.0
        assert s.sample(forced) == t
    history = prompt + sampled
    window = history if last_n < 0 else history[-last_n:]
    untouched = next(i for i in range(x.size) if i not in history)
    got = implied_logits(s, x, untouched)
    lc_n = len(history) if last_n < 0 else last_n
    ref = llama_cpp_apply([lc_penalties(lc_n, repeat, freq, present)], x, history)
    want = np.array([ref[i] for i in range(x.size)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # and by the formula, on exactly the tokens of the window
    counts = {t: window.count(t) for t in set(window)}
    for i in range(x.size):
        v = float(x[i])
        if i in counts:
            v = v * repeat if v <= 0 else v / repeat
            v -= counts[i] * freq + present
        assert got[i] == pytest.approx(v, abs=1e-4), i


def test_no_penalty_with_repeat_last_n_zero() -> None:
    x = logits_for(8, 32)
    s = Sampler(SamplingParams(repeat_penalty=2.0, presence_penalty=1.0, repeat_last_n=0,
                               **FULL), x.size)
    s.feed_prompt([1, 2, 3, 4])
    np.testing.assert_allclose(s.probabilities(x), softmax(x), rtol=1e-6)


# ---------------------------------------------------------------------------------- bias


@pytest.mark.parametrize("ban", [-math.inf, -100.0, -250.0])
def test_logit_bias_bans_even_the_best_token(ban: float) -> None:
    x = logits_for(9, 64)
    best = int(np.argmax(x))
    for temperature in (0.0, 1.0):
        s = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
                                   logit_bias={best: ban}, seed=1), x.size)
        assert s.probabilities(x)[best] == 0.0
        assert all(s.sample(x) != best for _ in range(200))


def test_logit_bias_adds_to_the_logit() -> None:
    x = logits_for(10, 64)
    s = Sampler(SamplingParams(logit_bias={3: 2.5, 4: -1.25}, **FULL), x.size)
    y = x.copy()
    y[3] += 2.5
    y[4] -= 1.25
    np.testing.assert_allclose(s.probabilities(x), softmax(y), rtol=1e-6)


def test_everything_banned_is_a_clear_error() -> None:
    s = Sampler(SamplingParams(logit_bias={0: -math.inf, 1: -100.0}), 2)
    with pytest.raises(ValueError, match="every token is banned"):
        s.sample(np.zeros(2, dtype=np.float32))


class _OnlyEven:
    """A stand-in constraint: even token ids only, records what it was told."""

    n_vocab = 64

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def allowed(self) -> np.ndarray:
        m = np.zeros(self.n_vocab, dtype=bool)
        m[::2] = True
        return m

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)


def test_a_constraint_masks_before_the_rest_of_the_chain() -> None:
    x = logits_for(11, 64)
    c = _OnlyEven()
    s = Sampler(SamplingParams(top_k=5, top_p=1.0, min_p=0.0, seed=0), x.size,
                c)  # type: ignore[arg-type]
    keep = kept(s, x)
    even = np.arange(0, 64, 2)
    # top-k counts among the allowed tokens, not the vocabulary (the mask came first)
    assert keep == set(even[np.argsort(-x[even])[:5]].tolist())
    picked = [s.sample(x) for _ in range(20)]
    assert c.accepted == picked and all(t % 2 == 0 for t in picked)
    g = Sampler(SamplingParams(temperature=0.0), x.size, _OnlyEven())  # type: ignore[arg-type]
    assert g.sample(x) == int(even[np.argmax(x[even])])


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("top_k", 2.5), ("top_k", True),
    ("top_p", 1.5), ("top_p", -0.1), ("min_p", 2.0), ("repeat_penalty", 0.0),
    ("repeat_penalty", -1.0), ("repeat_last_n", -2), ("presence_penalty", math.nan),
    ("frequency_penalty", math.inf), ("seed", 2**64), ("seed", 1.5), ("seed", "7"),
])
def test_validation_names_the_field(field: str, value: object) -> None:
    p = SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        p.validate(100)
    with pytest.raises(ValueError, match=field):
        Sampler(p, 100)


@pytest.mark.parametrize("bias", [{100: 1.0}, {-1: 1.0}, {"3": 1.0}, {3: math.nan},
                                  {3: math.inf}])
def test_validation_of_logit_bias(bias: dict[Any, float]) -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias).validate(100)


def test_wrong_logits_shape_is_refused() -> None:
    s = Sampler(SamplingParams(), 10)
    with pytest.raises(ValueError, match="shape"):
        s.sample(np.zeros(11, dtype=np.float32))


@pytest.mark.parametrize("top_p", [0.5, 0.95])
@pytest.mark.parametrize("shape", ["flat", "peaked"])
def test_top_p_without_top_k_on_a_32k_vocabulary_as_llama_cpp(top_p: float, shape: str) -> None:
    """Large candidate sets: a partition of the head (peaked, as a trained model's) or a
    value sort with block sums (flat); either way the same set as llama.cpp's."""
    x = logits_for(12, 32_000)
    if shape == "peaked":
        x[np.random.default_rng(13).choice(x.size, 30, replace=False)] += 12.0
    s = Sampler(SamplingParams(**{**FULL, "top_p": top_p}), x.size)
    got = kept(s, x)
    assert (len(got) <= 256) is (shape == "peaked")
    assert got == set(llama_cpp_apply([llama_cpp.llama_sampler_init_top_p(top_p, 1)], x))
