"""run(): one atomic artifact with data, manifest and meta; byte-identical reruns;
bad data refused with the file named and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import slimforge.artifacts
from slimforge.data import load_dataset
from slimforge.workspace import Workspace
from tasks.ingest import run
from tasks.ingest.manifest import MANIFEST_SCHEMA, example_hashes

FILES = ("data.safetensors", "manifest.csv", "meta.json")


@pytest.fixture
def pinned_code_version(monkeypatch):
    """Other engineers edit the tree while tests run; pin the code hash so reruns compare."""
    monkeypatch.setattr(slimforge.artifacts, "code_version", lambda stage=None: "test")


def test_digits_artifact_is_complete(tmp_path, make_params):
    ws = Workspace(tmp_path)
    metrics = run(make_params(dataset="digits", max_examples=300, seed=4), ws)
    assert metrics == {"examples_train": 210, "examples_val": 30, "examples_test": 60,
                       "examples_total": 300, "num_classes": 10, "input_shape": [1, 8, 8]}
    out = ws.artifact("ingest")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    ds = load_dataset(out)
    assert ds.x.shape == (300, 1, 8, 8) and ds.num_classes == 10
    manifest = MANIFEST_SCHEMA.validate(pd.read_csv(out / "manifest.csv"))
    assert manifest["label"].tolist() == ds.y.tolist()
    assert manifest["sha256"].tolist() == example_hashes(ds.x.numpy())
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["stage"], meta["method"], meta["seed"]) == ("ingest", "digits", 4)
    assert meta["source"] == "digits"
    assert meta["num_classes"] == 10 and meta["input_shape"] == [1, 8, 8] and meta["parents"] == {}
    assert meta["config"]["max_examples"] == 300


def test_same_config_in_two_workspaces_is_byte_identical(tmp_path, make_params,
                                                          pinned_code_version):
    params = make_params(dataset="digits", max_examples=200, seed=1)
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    run(params, a)
    run(params, b)
    for name in FILES:
        assert a.artifact("ingest", name).read_bytes() == b.artifact("ingest", name).read_bytes()
    run(make_params(dataset="digits", max_examples=200, seed=2), b)
    assert (a.artifact("ingest", "manifest.csv").read_bytes()
            != b.artifact("ingest", "manifest.csv").read_bytes())


def test_file_inside_workspace_is_a_parent(tmp_path, arrays, make_params):
    (tmp_path / "raw").mkdir()
    np.savez(tmp_path / "raw" / "mine.npz", x=arrays[0], y=arrays[1])
    ws = Workspace(tmp_path)
    metrics = run(make_params(dataset="file", path="raw/mine.npz"), ws)  # relative to the root
    assert metrics["num_classes"] == 3 and metrics["input_shape"] == [1, 4, 4]
    meta = json.loads(ws.artifact("ingest", "meta.json").read_text())
    assert meta["source"] == "raw/mine.npz"
    assert meta["parents"]["source"]["path"] == "raw/mine.npz"
    expected = slimforge.artifacts.sha256_file(tmp_path / "raw" / "mine.npz")
    assert meta["parents"]["source"]["sha256"] == expected


def test_file_outside_workspace_is_not_a_parent(tmp_path, arrays, write_npz, make_params):
    path = write_npz("outside.npz", x=arrays[0], y=arrays[1])
    ws = Workspace(tmp_path / "ws")
    run(make_params(dataset="file", path=str(path)), ws)
    meta = json.loads(ws.artifact("ingest", "meta.json").read_text())
    assert meta["parents"] == {} and meta["source"] == str(path)


def _corrupt(x, y):
    """name -> (x, y, expected message) for each kind of bad data."""
    nan_x = x.copy()
    nan_x[11, 0, 2, 2] = np.nan
    neg, high, gap = y.copy(), y.copy(), y.copy()
    neg[3], high[3] = -1, 7
    gap[gap == 1] = 0
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros(3), np.zeros(4)
    return {
        "nan": (nan_x, y, r"1 NaN/Inf values as float32, first in example 11"),
        "negative": (x, neg, r"negative labels, first -1 at index 3"),
        "out_of_range": (x, high, r"class 3 has no examples, yet labels go up to 7"),
        "empty_class": (x, gap, r"class 1 has no examples, yet labels go up to 2"),
        "length": (x, y[:-1], r"x has 60 examples but y has 59 labels"),
        "ragged": (ragged, np.array([0, 1]), r"object array"),
    }


@pytest.mark.parametrize("kind", ["nan", "negative", "out_of_range", "empty_class", "length",
                                  "ragged"])
def test_bad_file_is_refused_and_nothing_is_written(tmp_path, arrays, write_npz, make_params, kind):
    x, y, message = _corrupt(*arrays)[kind]
    path = write_npz(f"bad_{kind}.npz", x=x, y=y)
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ValueError, match=rf"bad_{kind}\.npz: .*{message}"):
        run(make_params(dataset="file", path=str(path)), ws)
    assert not (ws.root / "artifacts").exists()
    assert not ws.root.exists() or not any(ws.root.iterdir())


def test_failed_run_keeps_the_previous_artifact(tmp_path, arrays, write_npz, make_params):
    ws = Workspace(tmp_path / "ws")
    run(make_params(dataset="digits", max_examples=100), ws)
    before = {n: ws.artifact("ingest", n).read_bytes() for n in FILES}
    with pytest.raises(ValueError, match=r"only_x\.npz"):
        run(make_params(dataset="file", path=str(write_npz("only_x.npz", x=arrays[0]))), ws)
    assert {n: ws.artifact("ingest", n).read_bytes() for n in FILES} == before
    assert sorted(p.name for p in (ws.root / "artifacts").iterdir()) == ["ingest"]  # no temp dirs
