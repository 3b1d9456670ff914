"""Sources: built-in sets load offline with the documented shapes; .npz/.parquet round-trip;
unreadable or malformed files are refused with a message naming the file."""

from __future__ import annotations

import random

import numpy as np
import pytest

from slimforge.artifacts import ArtifactError
from tasks.ingest import IngestConfig
from tasks.ingest.sources import SOURCES, get_source, load_mnist1d
from tasks.ingest.validate import validate_arrays

BUILTIN = {  # name -> (N, per-example shape, value range or None for standardised)
    "mnist5k": (5000, (1, 28, 28), (0.0, 1.0)),
    "digits": (1797, (1, 8, 8), (0.0, 1.0)),
    "mnist1d": (5000, (40,), None),
}


@pytest.fixture(scope="module")
def builtin():
    """Each built-in set loaded once per module (mnist5k ~2.5 s, mnist1d ~3 s)."""
    return {name: SOURCES[name](IngestConfig(dataset=name)) for name in BUILTIN}


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_shapes_ranges_and_classes(builtin, name):
    x, y = builtin[name]
    n, shape, bounds = BUILTIN[name]
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (n, *shape) and y.shape == (n,)
    assert np.isfinite(x).all()
    if bounds is None:  # MNIST-1D is centred to mean 0, std 1
        assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    else:
        assert x.min() == bounds[0] and x.max() == bounds[1]
    assert validate_arrays(x, y, name) == 10
    assert np.bincount(y).min() > 100  # every digit well represented


def test_mnist1d_is_deterministic_and_leaves_global_rngs_alone(builtin):
    np_state, py_state = np.random.get_state(), random.getstate()
    x, y = load_mnist1d(IngestConfig(dataset="mnist1d"))
    assert np.array_equal(x, builtin["mnist1d"][0]) and np.array_equal(y, builtin["mnist1d"][1])
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'cifar' is not one of mnist5k, digits, mnist1d, file"):
        get_source("cifar")


def _load(path) -> tuple[np.ndarray, np.ndarray]:
    return SOURCES["file"](IngestConfig(dataset="file", path=str(path)))


def test_npz_round_trip(arrays, write_npz):
    x, y = arrays
    got_x, got_y = _load(write_npz("d.npz", x=x, y=y))
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)


def test_npz_optional_shape_reshapes(arrays, write_npz):
    x, y = arrays
    got_x, _ = _load(write_npz("d.npz", x=x.reshape(60, 16), y=y, shape=np.array([1, 4, 4])))
    assert np.array_equal(got_x, x)


def test_npz_shape_that_does_not_fit_is_rejected(arrays, write_npz):
    x, y = arrays
    path = write_npz("d.npz", x=x, y=y, shape=np.array([3, 3]))
    message = r"d\.npz: shape \[3, 3\] needs 9 values per example, but x"
    with pytest.raises(ArtifactError, match=message):
        _load(path)


def test_parquet_feature_columns_round_trip(arrays, write_parquet):
    x, y = arrays
    flat = x.reshape(60, 16)
    cols = {f"f{i}": flat[:, i] for i in range(16)} | {"label": y}
    got_x, got_y = _load(write_parquet("d.parquet", cols, shape=[1, 4, 4]))
    assert np.array_equal(got_x.astype(np.float32), x) and np.array_equal(got_y, y)


def test_parquet_pixels_column_round_trip(arrays, write_parquet):
    x, y = arrays
    path = write_parquet("d.parquet", {"label": y, "pixels": list(x.reshape(60, 16))})
    got_x, got_y = _load(path)
    assert np.array_equal(got_x.astype(np.float32), x.reshape(60, 16)) and np.array_equal(got_y, y)


def test_npz_missing_y_is_rejected(arrays, write_npz):
    message = r"only_x\.npz: \.npz has arrays \['x'\], missing \['y'\]"
    with pytest.raises(ArtifactError, match=message):
        _load(write_npz("only_x.npz", x=arrays[0]))


def test_npz_object_array_is_refused_without_unpickling(write_npz):
    ragged = np.array([np.zeros(3), np.zeros(4)], dtype=object)
    path = write_npz("ragged.npz", x=ragged, y=np.array([0, 1]))
    with pytest.raises(ArtifactError, match=r"ragged\.npz: \.npz holds an object array"):
        _load(path)


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_truncated_file_is_rejected(arrays, write_npz, write_parquet, suffix):
    x, y = arrays
    if suffix == ".npz":
        path = write_npz("cut.npz", x=x, y=y)
    else:
        path = write_parquet("cut.parquet", {"label": y, "pixels": list(x.reshape(60, 16))})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=rf"cut\{suffix}: not a readable \{suffix} file"):
        _load(path)


def test_garbage_bytes_are_rejected(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(ArtifactError, match=r"junk\.npz: not a readable \.npz file"):
        _load(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope\.npz: file not found"):
        _load(tmp_path / "nope.npz")


@pytest.mark.parametrize("columns, message", [
    ({"y": [0, 1], "f0": [0.0, 1.0]}, r"no 'label' column"),
    ({"label": [0, 1]}, r"only a 'label' column"),
    ({"label": [0, 1], "f0": ["a", "b"]}, r"column 'f0' has type string; expected numeric"),
    ({"label": [0, 1], "pixels": [[0.0, 1.0], [1.0]]},
     r"ragged 'pixels': row 1 has 1 values, row 0 has 2"),
    ({"label": [0, 1], "pixels": [[0.0], None]}, r"'pixels' is null in 1 rows \(first row 1\)"),
])
def test_malformed_parquet_is_rejected(write_parquet, columns, message):
    with pytest.raises(ArtifactError, match=r"bad\.parquet: " + message):
        _load(write_parquet("bad.parquet", columns))
