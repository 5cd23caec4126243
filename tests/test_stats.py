"""imgcls.stats against independent references: exact fractions, a plain loop, hand-computed values."""

from __future__ import annotations

import math
import time
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imgcls import stats
from imgcls.stats import Interval, accuracy_interval, flipped, mcnemar_exact, paired_bootstrap

counts = st.integers(0, 200)
flags = st.lists(st.booleans(), min_size=1, max_size=300)


def mcnemar_reference(b: int, c: int) -> Fraction:
    """The definition, term by term in exact arithmetic."""
    n = b + c
    tail = sum(Fraction(math.comb(n, i), 2**n) for i in range(min(b, c) + 1))
    return min(Fraction(1), 2 * tail)


def bootstrap_reference(a: np.ndarray, b: np.ndarray, resamples: int, seed: int, level: float) -> tuple[float, float]:
    """One resample per iteration, one row of draws at a time: the documented draw order."""
    rng, n = np.random.default_rng(seed), len(a)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        values.append((int(b[idx].sum()) - int(a[idx].sum())) / n)
    low, high = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


@st.composite
def paired_flags(draw) -> tuple[np.ndarray, np.ndarray]:
    a = draw(flags)
    b = draw(st.lists(st.booleans(), min_size=len(a), max_size=len(a)))
    return np.array(a), np.array(b)


# ------------------------------------------------------------------------------------------ McNemar


@settings(max_examples=200, deadline=None)
@given(counts, counts)
@example(0, 0)
@example(0, 1)
@example(0, 200)
@example(100, 100)
def test_mcnemar_matches_exact_fractions(b: int, c: int) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(float(mcnemar_reference(b, c)), rel=1e-12, abs=0)


@settings(max_examples=100, deadline=None)
@given(counts, counts)
@example(0, 0)
def test_mcnemar_is_symmetric_and_a_probability(b: int, c: int) -> None:
    p = mcnemar_exact(b, c)
    assert p == mcnemar_exact(c, b)
    assert 0.0 < p <= 1.0


def test_mcnemar_published_values() -> None:
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096, rel=1e-12)  # 0.0386
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(7, 7) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024, rel=1e-12)


def test_mcnemar_large_counts_are_accurate() -> None:
    """At n = 20,000 the 9,800-term sum is checked against exact integers (term-by-term ratio)."""
    b, c = 9_800, 10_200
    term = total = 1
    for i in range(b):
        term = term * (b + c - i) // (i + 1)
        total += term
    assert mcnemar_exact(b, c) == pytest.approx(float(Fraction(2 * total, 2 ** (b + c))), rel=1e-11)


def test_mcnemar_is_fast_at_100k_images() -> None:
    """The brief asks < 50 ms; 10x slack for a busy machine, still far below exact integers' ~2 s."""
    start = time.perf_counter()
    p = mcnemar_exact(49_000, 51_000)
    assert time.perf_counter() - start < 0.5
    assert p == pytest.approx(2.588716038346898e-10, rel=1e-9)  # exact-integer value, computed once


def test_mcnemar_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 3)


# ---------------------------------------------------------------------------------------- bootstrap


@settings(max_examples=30, deadline=None)
@given(paired_flags(), st.integers(0, 2**32 - 1), st.sampled_from([0.8, 0.95]), st.integers(1, 250))
@example((np.array([True]), np.array([False])), 0, 0.95, 1)
@example(tuple(np.random.default_rng(0).random((2, 40)) < 0.5), 0, 0.95, 7)  # draw order matters at this size
def test_bootstrap_matches_a_plain_loop(
    pair: tuple[np.ndarray, np.ndarray], seed: int, level: float, rows_per_chunk: int
) -> None:
    """Whatever the memory budget (here: rows_per_chunk resamples per block), the documented draw order."""
    a, b = pair
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stats, "_BOOTSTRAP_BYTES", rows_per_chunk * stats._BYTES_PER_DRAW * len(a))
        got = paired_bootstrap(a, b, resamples=200, seed=seed, level=level)
    assert (got.low, got.high) == bootstrap_reference(a, b, 200, seed, level)


@settings(max_examples=30, deadline=None)
@given(paired_flags(), st.integers(0, 2**32 - 1))
def test_bootstrap_estimate_is_observed_difference_and_inside(pair: tuple[np.ndarray, np.ndarray], seed: int) -> None:
    a, b = pair
    got = paired_bootstrap(a, b, resamples=500, seed=seed)
    assert got.estimate == (int(b.sum()) - int(a.sum())) / len(a)
    assert got.low <= got.estimate <= got.high
    assert -1.0 <= got.low <= got.high <= 1.0


def test_bootstrap_is_deterministic_per_seed() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random(500) < 0.7, rng.random(500) < 0.8
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3) != paired_bootstrap(a, b, seed=4)


@settings(max_examples=20, deadline=None)
@given(flags)
def test_bootstrap_of_identical_runs_is_zero(a: list[bool]) -> None:
    assert paired_bootstrap(np.array(a), np.array(a), resamples=100) == Interval(0.0, 0.0, 0.0)


def test_bootstrap_pairing_narrows_the_interval() -> None:
    """Two runs that agree on 95% of images differ little; an unpaired view would see two full spreads."""
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.5
    b = a.copy()
    b[:100] = ~b[:100]
    assert paired_bootstrap(a, b, resamples=2000).width < 0.03


def test_bootstrap_large_n_stays_within_memory() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(50_000) < 0.9, rng.random(50_000) < 0.91
    tracemalloc.start()
    try:
        got = paired_bootstrap(a, b, resamples=2000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80 * 2**20  # the 64 MiB block plus small arrays
    assert got.low < got.estimate < got.high


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.array([True, False]), np.array([True]), "same images"),
        (np.array([], dtype=bool), np.array([], dtype=bool), "no images"),
        (np.array([1, 0]), np.array([1, 1]), "bool"),  # labels passed by mistake
        (np.array([[True]]), np.array([[True]]), "1-D"),
    ],
)
def test_bootstrap_rejects_bad_input(a: np.ndarray, b: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b)


def test_bootstrap_rejects_bad_level_and_resamples() -> None:
    a = np.array([True, False])
    with pytest.raises(ValueError, match="level=1.0"):
        paired_bootstrap(a, a, level=1.0)
    with pytest.raises(ValueError, match="resamples=0"):
        paired_bootstrap(a, a, resamples=0)


# ------------------------------------------------------------------------------------------- Wilson


def test_wilson_hand_computed() -> None:
    """8/10 at 95%: the textbook Wilson interval (0.4902, 0.9433)."""
    got = accuracy_interval(8, 10)
    assert (got.low, got.high, got.estimate) == pytest.approx((0.49016, 0.94332, 0.8), abs=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))), st.floats(0.5, 0.999))
@example((0, 1), 0.95)
@example((1, 1), 0.95)
@example((0, 10**6), 0.95)
def test_wilson_contains_estimate_within_unit_interval(case: tuple[int, int], level: float) -> None:
    correct, n = case
    got = accuracy_interval(correct, n, level)
    assert 0.0 <= got.low <= got.estimate <= got.high <= 1.0
    assert got.estimate == correct / n
    assert got.width > 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**5).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))), st.integers(2, 10))
@example((0, 1), 2)
@example((1, 1), 2)
def test_wilson_narrows_as_n_grows(case: tuple[int, int], factor: int) -> None:
    """Same observed accuracy on `factor` times the images: a strictly narrower interval."""
    correct, n = case
    assert accuracy_interval(correct * factor, n * factor).width < accuracy_interval(correct, n).width


def test_wilson_wider_for_higher_level() -> None:
    assert accuracy_interval(50, 100, 0.99).width > accuracy_interval(50, 100, 0.95).width


@pytest.mark.parametrize(("correct", "n"), [(0, 0), (-1, 5), (6, 5)])
def test_wilson_rejects_impossible_counts(correct: int, n: int) -> None:
    with pytest.raises(ValueError, match=f"correct={correct}, n={n}"):
        accuracy_interval(correct, n)


# ------------------------------------------------------------------------------------------ flipped


@settings(max_examples=50, deadline=None)
@given(paired_flags())
def test_flipped_are_mcnemars_discordant_images(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    paths = [f"img/{i}.png" for i in range(len(a))]
    a_only, b_only = flipped(paths, a, b)
    assert a_only == [p for p, x, y in zip(paths, a, b) if x and not y]
    assert len(b_only) == int((b & ~a).sum())
    assert not set(a_only) & set(b_only)
    # Their counts are exactly what the difference in accuracy is made of.
    assert (len(b_only) - len(a_only)) / len(a) == paired_bootstrap(a, b, resamples=1).estimate


def test_flipped_example_and_length_check() -> None:
    a, b = np.array([True, True, False, False]), np.array([True, False, True, False])
    assert flipped(["w", "x", "y", "z"], a, b) == (["x"], ["y"])
    with pytest.raises(ValueError, match="3 paths for 4"):
        flipped(["w", "x", "y"], a, b)
