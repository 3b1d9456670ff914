"""Confidence intervals for evaluation metrics, and the paired comparison of two classifiers.

Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13: the percentile bootstrap.
Resample the n observations with replacement B times, take the statistic (here the mean) of
each resample, and report the α/2 and 1 − α/2 quantiles of those B values.

Two classifiers scored on the same test examples are compared *paired*: the example indices are
resampled jointly, which is the bootstrap of the per-example difference d_i = a_i − b_i (whose
mean is acc_a − acc_b). Pairing removes the example-to-example variance the two models share, so
the interval is much narrower than one built from two independent accuracy intervals. The
p-value is the exact McNemar test (McNemar 1947; Dietterich 1998 recommends it for comparing
classifiers on one test set): under "equal accuracy" each discordant example is equally likely
to favour either model, so the count won by a is Binomial(a_only + b_only, 1/2). It is exact for
any n, where a bootstrap p-value is quantised to 1/B and undefined for identical models.

Caveat: the percentile bootstrap assumes the sample shows the spread of the population. With a
handful of values (3 train seeds) it undercovers, since a resample can never be wider than the
sample; a t-interval is the honest choice there, and a bootstrap of seeds is a description.
Every function takes an explicit ``np.random.Generator``; the same seed gives the same interval.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

# Largest (rows, N) block of resampled indices drawn at once: 2**22 int64 = 32 MiB.
_CHUNK_ELEMENTS = 2**22


def _as_values(values, name: str) -> np.ndarray:
    """``values`` as a non-empty, finite, 1-D float array, or a ValueError naming ``name``."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty; need at least one value")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _as_correct(correct, name: str) -> np.ndarray:
    """Per-example correctness as a non-empty 1-D bool array (bools or 0/1), or a ValueError."""
    arr = np.asarray(correct)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of per-example booleans, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name}: expected booleans (or 0/1) per example, got values such as "
                             f"{arr[~np.isin(arr, (0, 1))][:3].tolist()}")
        arr = arr.astype(bool)
    return arr


def _check_settings(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: {level} is not a confidence level; use a fraction in (0, 1), e.g. 0.95")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot: {n_boot} is not a positive number of bootstrap resamples")


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The means of ``n_boot`` resamples (with replacement) of ``values`` (N,) -> (n_boot,).

    Vectorised: an (rows, N) index matrix per chunk, at most _CHUNK_ELEMENTS entries at a time,
    so a 10k-example test set with B = 2000 never holds the 20M indices at once."""
    n = len(values)
    rows = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # (rows, N)
        means[start:stop] = values[idx].mean(axis=1)
    return means


def _percentile_interval(values: np.ndarray, level: float, n_boot: int,
                         rng: np.random.Generator) -> tuple[float, float]:
    if np.all(values == values[0]):  # every resample is the sample: no spread to estimate
        return float(values[0]), float(values[0])
    alpha = 1.0 - level
    low, high = np.quantile(bootstrap_means(values, n_boot, rng), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, *,
                 rng: np.random.Generator) -> tuple[float, float]:
    """Percentile-bootstrap ``level`` interval of the mean of ``values``; one value v -> (v, v)."""
    _check_settings(level, n_boot)
    return _percentile_interval(_as_values(values, "values"), level, n_boot, rng)


def seed_summary(values, rng: np.random.Generator, level: float = 0.95, n_boot: int = 2000) -> dict:
    """A metric over train seeds: {n, mean, std, ci<level>: [low, high]} (JSON-able).

    std uses ddof=1; with one seed there is no spread to estimate, so std and the interval are
    None rather than a zero-width interval that would claim certainty. The interval key names
    its level ("ci95" at 0.95, "ci90" at 0.90) so a report cannot mislabel it."""
    _check_settings(level, n_boot)
    arr = _as_values(values, "values")
    key = f"ci{level * 100:g}"
    if len(arr) == 1:
        return {"n": 1, "mean": float(arr[0]), "std": None, key: None}
    low, high = _percentile_interval(arr, level, n_boot, rng)
    return {"n": len(arr), "mean": float(arr.mean()), "std": float(arr.std(ddof=1)), key: [low, high]}


def accuracy_ci(correct, rng: np.random.Generator, level: float = 0.95,
                n_boot: int = 2000) -> tuple[float, float]:
    """Percentile-bootstrap interval of a test accuracy, resampling the test examples.

    ``correct`` (N,) is True where the model's prediction is right; the interval reflects how
    much the accuracy would move on another test set of N examples from the same distribution."""
    _check_settings(level, n_boot)
    return _percentile_interval(_as_correct(correct, "correct").astype(float), level, n_boot, rng)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (right only by a / only by b)."""
    n = a_only + b_only
    if n == 0:  # the two models agree on every example: no evidence of a difference
        return 1.0
    return float(min(1.0, 2.0 * stats.binom.cdf(min(a_only, b_only), n, 0.5)))


def paired_difference(correct_a, correct_b, rng: np.random.Generator, level: float = 0.95,
                      n_boot: int = 2000) -> dict:
    """Paired comparison of model a (a method) with b (its stage's baseline) on the same examples.

    Returns {difference: acc_a − acc_b, low, high: the paired percentile-bootstrap interval of
    the difference, p_value: two-sided exact McNemar, test: "mcnemar_exact", n, a_only, b_only}.
    The discordant counts are kept so a reader can see what the p-value rests on."""
    _check_settings(level, n_boot)
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_b: {len(b)} examples but correct_a has {len(a)}; "
                         "a paired comparison needs both models scored on the same examples")
    diff = a.astype(float) - b.astype(float)  # (N,) in {-1, 0, 1}
    low, high = _percentile_interval(diff, level, n_boot, rng)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    return {"difference": (a_only - b_only) / len(a), "low": low, "high": high,
            "p_value": mcnemar_exact(a_only, b_only), "test": "mcnemar_exact",
            "n": len(a), "a_only": a_only, "b_only": b_only}
