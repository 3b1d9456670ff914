"""Boundary checks on loaded arrays, and the seeded stratified subset / split.

validate_arrays raises a one-line ArtifactError (a ValueError) naming the source, what is
wrong and what was expected, so a bad dataset is refused before anything is written. The
subset and the split are stratified per class and drawn from explicit numpy generators.
"""

from __future__ import annotations

import numpy as np

from slimforge.artifacts import ArtifactError

SUBSET_STREAM = 1  # subset draws from default_rng([seed, 1]), independent of the split's stream
MIN_PER_CLASS = 3  # enough for one train, one val and one test example of every class


def validate_arrays(x: np.ndarray, y: np.ndarray, source: str) -> int:
    """Check x (N, ...) numeric and y (N,) integer labels 0..K-1 with every class present.

    Returns K, the number of classes.
    """
    _check_x(np.asarray(x), source)
    y = _check_y(np.asarray(y), source)
    if len(x) != len(y):
        raise ArtifactError(f"{source}: x has {len(x)} examples but y has {len(y)} labels; "
                            f"expected one label per example")
    return _check_classes(y, source)


def _check_x(x: np.ndarray, source: str) -> None:
    if x.dtype == object:
        raise ArtifactError(f"{source}: x is an object array{_ragged_hint(x)}; "
                            f"expected a numeric array (N, ...) with one shape per example")
    if x.dtype.kind not in "biuf":
        raise ArtifactError(f"{source}: x has dtype {x.dtype}; expected numbers (int or float)")
    if x.ndim < 2:
        raise ArtifactError(f"{source}: x has shape {list(x.shape)}; expected (N, features...)")
    if x.shape[0] == 0:
        raise ArtifactError(f"{source}: zero examples; expected at least one")
    if x[:1].size == 0:
        raise ArtifactError(f"{source}: x has shape {list(x.shape)}, no values per example; "
                            f"expected at least one feature")
    with np.errstate(over="ignore"):  # float64 beyond ~3.4e38 becomes inf: reported below
        bad = ~np.isfinite(x.astype(np.float32, copy=False))
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))[0])
        raise ArtifactError(f"{source}: x has {int(bad.sum())} NaN/Inf values as float32, first "
                            f"in example {first}; expected finite numbers")


def _ragged_hint(x: np.ndarray) -> str:
    """Describe the first row whose shape differs from row 0, if rows are array-like."""
    if x.ndim != 1:
        return ""
    shapes = [np.shape(row) for row in x]
    for i, s in enumerate(shapes):
        if s != shapes[0]:
            return (f" with ragged rows (example {i} has shape {list(s)}, "
                    f"example 0 has {list(shapes[0])})")
    return ""


def _check_y(y: np.ndarray, source: str) -> np.ndarray:
    """Return y as int64 (N,) after checking it holds non-negative integers."""
    if y.ndim != 1:
        raise ArtifactError(f"{source}: y has shape {list(y.shape)}; expected (N,) labels")
    if y.dtype.kind == "f":
        nan = ~np.isfinite(y)
        if nan.any():
            raise ArtifactError(f"{source}: y has {int(nan.sum())} NaN/Inf labels, first at index "
                                f"{int(np.flatnonzero(nan)[0])}; expected integers 0..K-1")
        frac = y != np.round(y)
        if frac.any():
            i = int(np.flatnonzero(frac)[0])
            raise ArtifactError(f"{source}: label {y[i]:g} at index {i} is not an integer; "
                                f"expected integers 0..K-1")
    elif y.dtype.kind not in "iu":
        raise ArtifactError(f"{source}: labels have dtype {y.dtype}; expected integers 0..K-1")
    neg = y < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ArtifactError(f"{source}: {int(neg.sum())} negative labels, first {y[i]:g} at index "
                            f"{i}; expected integers 0..K-1")
    if len(y) and y.max() >= len(y):  # K classes need K examples; also keeps the int64 cast exact
        i = int(np.argmax(y))
        raise ArtifactError(f"{source}: label {y[i].item()} at index {i} is out of range for {len(y)} "
                            f"examples; expected integers 0..K-1 with every class present")
    return y.astype(np.int64)


def _check_classes(y: np.ndarray, source: str) -> int:
    if len(y) == 0:
        raise ArtifactError(f"{source}: zero examples; expected at least one")
    present = np.unique(y)  # sorted; a gap means a class inside 0..max has no examples
    top = int(present[-1])
    if len(present) != top + 1:
        gap = int(np.flatnonzero(present != np.arange(len(present)))[0])
        first_top = int(np.flatnonzero(y == top)[0])
        raise ArtifactError(f"{source}: class {gap} has no examples, yet labels go up to {top} "
                            f"(first at index {first_top}); expected every class 0..{top} "
                            f"present (is a label out of range?)")
    return top + 1


def _class_counts(y: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]  # ascending example indices
    return classes, members


def subset_indices(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified subset of n examples (all if n >= len(y)).

    Classes keep their share of n (largest remainder), but at least min(size, 3) each, so
    every split can still hold every class.
    """
    if n >= len(y):
        return np.arange(len(y))
    _, members = _class_counts(y)
    take = _stratified_counts(np.array([len(m) for m in members]), n)
    rng = np.random.default_rng([seed, SUBSET_STREAM])
    keep = [rng.choice(m, size=int(k), replace=False) for m, k in zip(members, take, strict=True)]
    return np.sort(np.concatenate(keep))


def _stratified_counts(counts: np.ndarray, n: int) -> np.ndarray:
    """(K,) examples to keep per class, summing to n, each in [min(count, 3), count]."""
    floor = np.minimum(counts, MIN_PER_CLASS)
    if n < floor.sum():
        raise ValueError(f"ingest.max_examples={n} is too small: keeping {MIN_PER_CLASS} examples "
                         f"of each of {len(counts)} classes needs at least {int(floor.sum())}")
    share = n * counts / counts.sum()  # (K,) exact proportional share
    take = np.maximum(np.floor(share).astype(np.int64), floor)
    while take.sum() > n:  # the floor pushed us over: trim the most over-served class
        room = np.where(take > floor, take - share, -np.inf)
        take[np.argmax(room)] -= 1
    while take.sum() < n:  # largest remainder: top up the most under-served class
        room = np.where(take < counts, share - take, -np.inf)
        take[np.argmax(room)] += 1
    return take


def split_dataset(y: np.ndarray, val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Split codes (N,) uint8: 0 train, 1 val, 2 test, stratified per class.

    Per class of n examples, round(n * fraction) go to val and to test; a class with at
    least 3 examples always gets one of each in train, val and test.
    """
    rng = np.random.default_rng(seed)
    split = np.zeros(len(y), dtype=np.uint8)
    for members in _class_counts(y)[1]:
        n_val, n_test = _held_out(len(members), val_fraction, test_fraction)
        order = rng.permutation(members)
        split[order[:n_val]] = 1
        split[order[n_val:n_val + n_test]] = 2
    return split


def _held_out(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) counts for a class of n examples, leaving train at least one."""
    n_val, n_test = int(np.floor(n * val_fraction + 0.5)), int(np.floor(n * test_fraction + 0.5))
    if n >= MIN_PER_CLASS:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    while n_val + n_test > n - 1 and n_val + n_test > 0:
        if n_test >= n_val and (n_test > 1 or n < MIN_PER_CLASS):
            n_test -= 1
        elif n_val > 1 or n < MIN_PER_CLASS:
            n_val -= 1
        else:
            break
    return n_val, n_test
