"""validate_arrays refuses bad data in one line naming the source; the subset and split
are seeded, stratified and disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.ingest.validate import split_dataset, subset_indices, validate_arrays

SRC = "data/user.npz"


def test_good_arrays_return_the_class_count(arrays):
    assert validate_arrays(*arrays, SRC) == 3


def _with(arrays, x=None, y=None):
    ax, ay = arrays
    return (ax.copy() if x is None else x), (ay.copy() if y is None else y)


def test_nan_and_inf_report_count_and_first_example(arrays):
    x, y = _with(arrays)
    x[5, 0, 1, 1], x[9, 0, 0, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"^data/user\.npz: x has 2 NaN/Inf values as float32, "
                                         r"first in example 5; expected finite numbers$"):
        validate_arrays(x, y, SRC)


def test_float64_overflowing_float32_is_caught(arrays):
    x = arrays[0].astype(np.float64)
    x[3] = 1e300
    with pytest.raises(ValueError, match="first in example 3"):
        validate_arrays(x, arrays[1], SRC)


@pytest.mark.parametrize("labels, message", [
    ({7: -2}, r"1 negative labels, first -2 at index 7; expected integers 0\.\.K-1"),
    ({4: 5}, (r"class 3 has no examples, yet labels go up to 5 \(first at index 4\)"
              r".*\(is a label out of range\?\)")),
    ({4: 0.5}, r"label 0\.5 at index 4 is not an integer"),
    ({2: np.nan}, r"y has 1 NaN/Inf labels, first at index 2"),
])
def test_bad_labels_are_rejected(arrays, labels, message):
    floats = any(isinstance(v, float) for v in labels.values())
    y = arrays[1].astype(np.float64 if floats else np.int64)
    for i, v in labels.items():
        y[i] = v
    with pytest.raises(ValueError, match=r"^data/user\.npz: " + message):
        validate_arrays(arrays[0], y, SRC)


def test_integral_float_labels_are_accepted(arrays):
    assert validate_arrays(arrays[0], arrays[1].astype(np.float32), SRC) == 3


def test_empty_class_names_the_class(arrays):
    y = arrays[1].copy()
    y[y == 1] = 2  # labels 0 and 2 only
    with pytest.raises(ValueError, match=r"class 1 has no examples, yet labels go up to 2"):
        validate_arrays(arrays[0], y, SRC)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((5, 3)), np.zeros(4, np.int64), r"x has 5 examples but y has 4 labels"),
    (np.zeros((0, 3)), np.zeros(0, np.int64), r"zero examples"),
    (np.zeros((4, 0)), np.zeros(4, np.int64), r"x has shape \[4, 0\], no values per example"),
    (np.zeros(4), np.zeros(4, np.int64), r"x has shape \[4\]; expected \(N, features\.\.\.\)"),
    (np.array([["a", "b"]] * 2), np.zeros(2, np.int64), r"x has dtype <U1; expected numbers"),
    (np.zeros((2, 3)), np.array(["0", "1"]), r"labels have dtype <U1; expected integers"),
    (np.zeros((2, 3)), np.zeros((2, 1), np.int64), r"y has shape \[2, 1\]; expected \(N,\) labels"),
])
def test_shape_length_and_dtype_errors(x, y, message):
    with pytest.raises(ValueError, match=r"^data/user\.npz: " + message):
        validate_arrays(x, y, SRC)


def test_ragged_object_array_names_the_odd_row():
    x = np.empty(3, dtype=object)
    x[0], x[1], x[2] = np.zeros(4), np.zeros(4), np.zeros(5)
    with pytest.raises(ValueError, match=r"object array with ragged rows "
                                         r"\(example 2 has shape \[5\], "
                                         r"example 0 has \[4\]\)"):
        validate_arrays(x, np.array([0, 1, 1]), SRC)


def _labels(sizes: list[int]) -> np.ndarray:
    """Shuffled labels with sizes[c] examples of class c."""
    y = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(7).permutation(y)


def test_split_is_deterministic_and_seed_dependent():
    y = _labels([50, 30, 70])
    a, b = split_dataset(y, 0.1, 0.2, seed=0), split_dataset(y, 0.1, 0.2, seed=0)
    assert a.dtype == np.uint8 and a.shape == y.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, split_dataset(y, 0.1, 0.2, seed=1))


def test_split_is_stratified_and_disjoint():
    y = _labels([50, 30, 70, 3])
    split = split_dataset(y, 0.1, 0.2, seed=3)
    assert set(np.unique(split)) == {0, 1, 2}  # each example in exactly one split
    for c, n in enumerate([50, 30, 70]):
        counts = np.bincount(split[y == c], minlength=3)
        assert counts[1] == round(n * 0.1) and counts[2] == round(n * 0.2)
    assert np.bincount(split[y == 3], minlength=3).tolist() == [1, 1, 1]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_split_of_tiny_classes_keeps_train(n):
    split = split_dataset(np.zeros(n, np.int64), 0.3, 0.5, seed=0)
    counts = np.bincount(split, minlength=3)
    assert counts[0] >= 1
    if n >= 3:
        assert counts[1] >= 1 and counts[2] >= 1


def test_subset_is_stratified_seeded_and_exact():
    y = _labels([100, 50, 250])
    keep = subset_indices(y, 80, seed=0)
    assert len(keep) == 80 and np.array_equal(keep, np.unique(keep))
    assert np.bincount(y[keep]).tolist() == [20, 10, 50]
    assert np.array_equal(keep, subset_indices(y, 80, seed=0))
    assert not np.array_equal(keep, subset_indices(y, 80, seed=1))


def test_subset_keeps_three_of_every_class():
    y = _labels([1000, 5, 2])
    counts = np.bincount(y[subset_indices(y, 20, seed=0)])
    assert counts.tolist() == [15, 3, 2]


def test_subset_too_small_and_too_large():
    y = _labels([10, 10, 10])
    with pytest.raises(ValueError, match=r"ingest\.max_examples=8 is too small.*at least 9"):
        subset_indices(y, 8, seed=0)
    assert np.array_equal(subset_indices(y, 100, seed=0), np.arange(30))
