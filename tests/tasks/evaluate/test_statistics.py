import numpy as np
import pytest

from tasks.evaluate.statistics import (
    accuracy_ci,
    bootstrap_ci,
    bootstrap_means,
    mcnemar_exact,
    paired_difference,
    seed_summary,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _correct(n_right, n, rng=None):
    """A per-example correctness vector with exactly n_right True entries, shuffled."""
    out = np.zeros(n, dtype=bool)
    out[:n_right] = True
    return rng.permutation(out) if rng is not None else out


def _coverage(draws, n_boot, truth):
    hits = 0
    for i, sample in enumerate(draws):
        low, high = bootstrap_ci(sample, n_boot=n_boot, rng=_rng(i))
        hits += low <= truth <= high
    return hits / len(draws)


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
    draws = _rng(123).normal(loc=0.9, scale=0.02, size=(400, 50))  # 400 samples of n=50
    coverage = _coverage(draws, n_boot=1000, truth=0.9)
    assert 0.90 <= coverage <= 0.98, f"95% interval covered the mean in {coverage:.3f} of 400 draws"


def test_accuracy_interval_covers_the_true_accuracy():
    # 400 test sets of 200 examples from a model that is right with probability 0.8.
    sets = _rng(7).random((400, 200)) < 0.8
    hits = sum(lo <= 0.8 <= hi for lo, hi in (accuracy_ci(s, _rng(i), n_boot=1000) for i, s in enumerate(sets)))
    assert 0.90 <= hits / 400 <= 0.98, f"coverage {hits / 400:.3f}"


def test_intervals_shrink_as_n_grows():
    rng = _rng(1)
    widths = []
    for n in (30, 300, 3000):
        low, high = bootstrap_ci(rng.normal(size=n), rng=_rng(2))
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.3)  # width ∝ 1/√n


def test_interval_contains_the_sample_mean_and_is_ordered():
    values = _rng(3).exponential(size=40)
    low, high = bootstrap_ci(values, rng=_rng())
    assert low < values.mean() < high


def test_same_seed_gives_the_same_interval():
    values = _rng(4).normal(size=100)
    assert bootstrap_ci(values, rng=_rng(5)) == bootstrap_ci(values, rng=_rng(5))
    correct = _rng(6).random(1000) < 0.7
    assert accuracy_ci(correct, _rng(5)) == accuracy_ci(correct, _rng(5))
    assert bootstrap_ci(values, rng=_rng(5)) != bootstrap_ci(values, rng=_rng(6))


def test_chunked_resampling_matches_one_block(monkeypatch):
    from tasks.evaluate import statistics

    values = _rng(8).normal(size=1000)
    whole = bootstrap_means(values, 50, _rng(9))
    monkeypatch.setattr(statistics, "_CHUNK_ELEMENTS", 7000)  # 7 rows per chunk, last one partial
    chunked = bootstrap_means(values, 50, _rng(9))
    np.testing.assert_allclose(chunked, whole)


def test_one_value_has_a_zero_width_interval():
    assert bootstrap_ci([0.87], rng=_rng()) == (0.87, 0.87)
    assert bootstrap_ci([0.9, 0.9, 0.9], rng=_rng()) == (0.9, 0.9)


def test_seed_summary():
    out = seed_summary([0.90, 0.92, 0.94], _rng())
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.92) and out["std"] == pytest.approx(0.02)
    low, high = out["ci95"]
    assert 0.90 <= low <= 0.92 <= high <= 0.94  # a resample mean never leaves the sample's range
    assert "ci90" in seed_summary([0.90, 0.92, 0.94], _rng(), level=0.90)


def test_seed_summary_of_one_seed_claims_no_spread():
    assert seed_summary([0.9], _rng()) == {"n": 1, "mean": 0.9, "std": None, "ci95": None}


def test_identical_models_differ_by_zero_with_a_zero_width_interval():
    correct = _rng(10).random(500) < 0.8
    out = paired_difference(correct, correct.copy(), _rng())
    assert (out["difference"], out["low"], out["high"]) == (0.0, 0.0, 0.0)
    assert out["p_value"] == 1.0 and out["a_only"] == out["b_only"] == 0


def test_ten_more_right_of_a_thousand_is_one_point():
    base = _correct(900, 1000)
    better = base.copy()
    better[900:910] = True  # right on 10 examples the baseline gets wrong, same elsewhere
    out = paired_difference(better, base, _rng())
    assert out["difference"] == pytest.approx(0.01)
    assert out["low"] >= 0.0 and out["high"] <= 0.02
    assert out["p_value"] == pytest.approx(2 * 0.5**10)  # all 10 discordant pairs favour a
    assert paired_difference(base, better, _rng())["difference"] == pytest.approx(-0.01)


def test_pairing_is_narrower_than_independent_intervals():
    rng = _rng(11)
    b = rng.random(2000) < 0.8
    a = b.copy()
    flip = rng.choice(2000, size=60, replace=False)
    a[flip] = ~a[flip]  # a differs from b on 60 examples only
    out = paired_difference(a, b, _rng())
    lo_a, hi_a = accuracy_ci(a, _rng())
    assert out["high"] - out["low"] < (hi_a - lo_a) / 2


def test_mcnemar_exact_against_scipy_binomtest():
    from scipy.stats import binomtest

    for a_only, b_only in [(3, 12), (10, 10), (0, 5), (25, 40)]:
        expected = binomtest(a_only, a_only + b_only, 0.5).pvalue
        assert mcnemar_exact(a_only, b_only) == pytest.approx(expected)


@pytest.mark.parametrize("call, name", [
    (lambda: bootstrap_ci([], rng=_rng()), "values"),
    (lambda: bootstrap_ci([1.0, np.nan], rng=_rng()), "values"),
    (lambda: bootstrap_ci([[1.0, 2.0]], rng=_rng()), "values"),
    (lambda: bootstrap_ci([1.0, 2.0], level=95, rng=_rng()), "level"),
    (lambda: bootstrap_ci([1.0, 2.0], n_boot=0, rng=_rng()), "n_boot"),
    (lambda: seed_summary([], _rng()), "values"),
    (lambda: accuracy_ci(np.array([], dtype=bool), _rng()), "correct"),
    (lambda: accuracy_ci(np.array([0.5, 1.0]), _rng()), "correct"),
    (lambda: paired_difference([True, False], [True], _rng()), "correct_b"),
    (lambda: paired_difference([], [], _rng()), "correct_a"),
])
def test_bad_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        call()
