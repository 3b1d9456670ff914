"""Bad inputs, one table: each is refused at its real boundary with the project's error type
and a one-line message naming the file, the key or tensor and what was expected, and the
stage that was asked to run writes nothing (no artifact directory, no metrics file, no
temp directory left behind).

Boundaries: ``run_stage`` (params.yaml read by ``load_params``; the ingest stage on a data
file; the train stage with ``init: pretrained``; the merge stage on ``merge.checkpoints``)
and ``load_any`` for a model artifact that later stages read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from slimforge.artifacts import ArtifactError, save_tensors
from slimforge.checkpoint import load_any, model_spec, save_model
from slimforge.config import ParamsError
from slimforge.models import CNNConfig, MLPConfig, build_model
from slimforge.stages import run_stage
from slimforge.workspace import Workspace

PROJECT_ERRORS = (ParamsError, ArtifactError)
MLP = MLPConfig(hidden=[16])  # the train stage's architecture in these tests: digits (1, 8, 8) -> 10


@dataclass(frozen=True)
class Attempt:
    """What one bad input does: ``call`` must raise naming ``file`` and every one of ``names``,
    with ``expected`` (a regex) saying what would be valid; ``stage`` (in ``ws``) must write nothing."""

    call: Callable[[], object]
    file: str
    names: tuple[str, ...]
    expected: str
    stage: str | None = None
    ws: Workspace | None = None


# ---------------------------------------------------------------- file makers

def _write_params(ws: Workspace, raw: dict | str) -> Path:
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.params.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return ws.params


def _truncate(path: Path, keep: float = 0.6) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])
    return path


def _corrupt_header(path: Path) -> Path:
    """Keep the 8-byte header length, replace the JSON header by bytes that are not JSON."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    path.write_bytes(raw[:8] + b"{" + b"\xff" * (n - 1) + raw[8 + n:])
    return path


def _mlp_state(cfg=MLP, shape=(1, 8, 8)) -> dict[str, torch.Tensor]:
    """A state dict of ``cfg`` for digits; the values do not matter, only names and shapes."""
    return build_model(cfg, shape, 10).state_dict()


def _digits_arrays(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """x (n, 1, 4, 4) float32, y (n,) three classes."""
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 4, 4), dtype=np.float32), np.arange(n, dtype=np.int64) % 3


# ---------------------------------------------------------------- params.yaml (load_params via run_stage)

def _params_case(raw, names: tuple[str, ...], expected: str) -> Callable[[Path], Attempt]:
    def make(tmp: Path) -> Attempt:
        ws = Workspace(tmp / "ws")
        path = _write_params(ws, raw)
        return Attempt(lambda: run_stage("ingest", ws), str(path), names, expected, "ingest", ws)
    return make


PARAMS_CASES = {
    "params: unknown key": _params_case(
        {"ingest": {"dataset": "digits", "max_exampels": 50}}, ("ingest.max_exampels",),
        r"Extra inputs are not permitted"),
    "params: unknown section": _params_case(
        {"ingest": {"dataset": "digits"}, "trian": {"epochs": 1}}, ("trian",), r"Extra inputs are not permitted"),
    "params: wrong type": _params_case(
        {"train": {"epochs": "ten"}}, ("train.epochs", "'ten'"), r"valid integer"),
    "params: wrong type in a list": _params_case(
        {"merge": {"lambdas": [0.3, "big"]}}, ("merge.lambdas.1", "'big'"), r"valid number"),
    "params: section is a list": _params_case(
        {"prune": [0.5]}, ("prune", "[0.5]"), r"valid dictionary"),
    "params: section is a scalar": _params_case(
        {"quantize": 8}, ("quantize", "8"), r"valid dictionary"),
    "params: unknown method": _params_case(
        {"prune": {"method": "magnitud"}}, ("prune", "'magnitud'"), r"magnitude"),
    "params: unknown init": _params_case(
        {"train": {"init": "kaimig"}}, ("train.init", "'kaimig'"), r"kaiming"),
    "params: held-out fractions leave no training data": _params_case(
        {"ingest": {"val_fraction": 0.5, "test_fraction": 0.4}}, ("ingest.val_fraction", "ingest.test_fraction"),
        r"expected a sum below 0\.9"),
    "params: batch not divisible by the world size": _params_case(
        {"train": {"batch_size": 10, "distributed": {"nproc_per_node": 4}}}, ("train.batch_size", "10"),
        r"divisible by the world size 4"),
    "params: select keeps nothing": _params_case(
        {"select": {"method": "random", "keep_fraction": 0}}, ("select.keep_fraction",), r"greater than 0"),
    "params: fraction is NaN": _params_case(
        "ingest:\n  val_fraction: .nan\n", ("ingest.val_fraction", "nan"), r"less than 1|greater than 0"),
    "params: merge coefficient is NaN": _params_case(
        "merge:\n  lambdas: [0.3, .nan]\n", ("merge.lambdas", "lambdas[1] is nan"), r"expected finite"),
    "params: dataset file without a path": _params_case(
        {"ingest": {"dataset": "file"}}, ("ingest.path",), r"required .*\.npz/\.parquet"),
    "params: key with a line break": _params_case(
        {"ingest": {"data\nset": "digits"}}, ("ingest.'data\\nset'",), r"Extra inputs are not permitted"),
    "params: not YAML": _params_case(
        "ingest: [digits\n", (), r"not valid YAML"),
    "params: not a mapping": _params_case(
        "- ingest\n- train\n", (), r"expected a mapping of stage sections, got list"),
}


# ---------------------------------------------------------------- dataset files (the ingest stage)

def _npz(name: str, **arrays) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        np.savez(tmp / name, **arrays)
        return tmp / name
    return write


def _parquet(name: str, columns: dict, metadata: dict | None = None, names: list[str] | None = None):
    def write(tmp: Path) -> Path:
        if names:
            table = pa.Table.from_arrays(list(columns.values()), names=names)
        else:
            table = pa.table(columns)
        if metadata:
            table = table.replace_schema_metadata(metadata)
        pq.write_table(table, tmp / name)
        return tmp / name
    return write


def _data_case(writer: Callable[[Path], Path], names: tuple[str, ...], expected: str,
               damage: Callable[[Path], Path] | None = None) -> Callable[[Path], Attempt]:
    def make(tmp: Path) -> Attempt:
        ws = Workspace(tmp / "ws")
        (ws.root / "data").mkdir(parents=True)
        path = writer(ws.root / "data")
        if damage:
            damage(path)
        _write_params(ws, {"ingest": {"dataset": "file", "path": f"data/{path.name}"}})
        return Attempt(lambda: run_stage("ingest", ws), f"data/{path.name}", names, expected, "ingest", ws)
    return make


X, Y = _digits_arrays()
X_NAN, X_INF, Y_BIG, Y_NEG, Y_HUGE = X.copy(), X.copy(), Y.copy(), Y.copy(), Y.astype(np.uint64)
X_NAN[11, 0, 2, 2], X_INF[5, 0, 0, 0] = np.nan, np.inf
Y_BIG[4], Y_NEG[7], Y_HUGE[9] = 7, -2, 2**64 - 1
RAGGED = np.empty(60, dtype=object)
RAGGED[:] = [np.zeros(1 + i % 2) for i in range(60)]
FEATURES = {"label": pa.array(Y), **{f"f{j}": pa.array(X.reshape(60, -1)[:, j]) for j in range(16)}}

DATA_CASES = {
    "data: NaN in x": _data_case(_npz("nan.npz", x=X_NAN, y=Y), ("x", "example 11"), r"expected finite numbers"),
    "data: Inf in x": _data_case(_npz("inf.npz", x=X_INF, y=Y), ("x", "example 5"), r"expected finite numbers"),
    "data: NaN in a parquet feature": _data_case(
        _parquet("nan.parquet", {**FEATURES, "f3": pa.array(np.where(np.arange(60) == 8, np.nan, 0.5))}),
        ("x", "example 8"), r"expected finite numbers"),
    "data: label out of range": _data_case(
        _npz("high.npz", x=X, y=Y_BIG), ("labels go up to 7", "index 4"), r"expected every class 0\.\.7 present"),
    "data: label beyond int64": _data_case(
        _npz("huge.npz", x=X, y=Y_HUGE), ("label 18446744073709551615", "index 9"),
        r"out of range for 60 examples; expected integers 0\.\.K-1"),
    "data: negative label": _data_case(
        _npz("neg.npz", x=X, y=Y_NEG), ("negative labels", "-2", "index 7"), r"expected integers 0\.\.K-1"),
    "data: fractional label": _data_case(
        _npz("frac.npz", x=X, y=Y + 0.5), ("label 0.5", "index 0"), r"expected integers 0\.\.K-1"),
    "data: NaN label": _data_case(
        _npz("nanlabel.npz", x=X, y=np.where(np.arange(60) == 3, np.nan, Y)), ("NaN/Inf labels", "index 3"),
        r"expected integers 0\.\.K-1"),
    "data: string labels (parquet)": _data_case(
        _parquet("strlabel.parquet", {**FEATURES, "label": pa.array([str(v) for v in Y])}), ("labels",),
        r"expected integers 0\.\.K-1"),
    "data: x and y lengths differ": _data_case(
        _npz("len.npz", x=X, y=Y[:-1]), ("x has 60 examples", "y has 59"), r"expected one label per example"),
    "data: y missing": _data_case(_npz("noy.npz", x=X), ("missing ['y']",), r"expected x \(N, \.\.\.\) and y"),
    "data: ragged object array": _data_case(
        _npz("ragged.npz", x=RAGGED, y=Y), ("object array",), r"expected numeric arrays"),
    "data: truncated npz": _data_case(_npz("trunc.npz", x=X, y=Y), (".npz",), r"not a readable", damage=_truncate),
    "data: truncated parquet": _data_case(
        _parquet("trunc.parquet", FEATURES), (".parquet",), r"not a readable", damage=_truncate),
    "data: shape entry of strings": _data_case(
        _npz("shape.npz", x=X.reshape(60, 16), y=Y, shape=np.array(["a", "b"])), ("shape ['a', 'b']",),
        r"expected the per-example shape"),
    "data: parquet shape metadata out of range": _data_case(
        _parquet("shape.parquet", FEATURES, {"shape": "[1e400]"}), ("shape [inf]",),
        r"expected the per-example shape"),
    "data: duplicate label column": _data_case(
        _parquet("dup.parquet", {"a": pa.array(Y), "b": pa.array(Y), "c": pa.array(X[:, 0, 0, 0])},
                 names=["label", "label", "f0"]), ("column 'label' appears 2 times",), r"expected unique"),
    "data: no label column": _data_case(
        _parquet("nolabel.parquet", {"f0": pa.array(X[:, 0, 0, 0])}), ("no 'label' column",),
        r"expected 'label' plus"),
}


# ---------------------------------------------------------------- weights: train init, merge inputs, artifacts

@pytest.fixture(scope="module")
def trained_inputs(tmp_path_factory):
    """A workspace holding ingest and select artifacts (digits, 150 examples), so the train
    stage's only problem is the checkpoint it is told to start from."""
    ws = Workspace(tmp_path_factory.mktemp("train") / "ws")
    _write_params(ws, {"ingest": {"dataset": "digits", "max_examples": 150},
                       "select": {"method": "random", "keep_fraction": 1.0}})
    run_stage("ingest", ws)
    run_stage("select", ws)
    return ws


def _pretrained_case(state: Callable[[], dict], names: tuple[str, ...], expected: str,
                     damage: Callable[[Path], Path] | None = None):
    def make(tmp: Path, ws: Workspace) -> Attempt:
        ckpt = ws.root / "start.safetensors"
        save_tensors(ckpt, state())
        if damage:
            damage(ckpt)
        _write_params(ws, {"ingest": {"dataset": "digits", "max_examples": 150},
                           "select": {"method": "random", "keep_fraction": 1.0},
                           "train": {"model": MLP.model_dump(mode="json"), "epochs": 1,
                                     "init": {"scheme": "pretrained", "path": "start.safetensors"}}})
        return Attempt(lambda: run_stage("train", ws), str(ckpt), ("train.init.pretrained", *names), expected,
                       "train", ws)
    return make


def _with(state: Callable[[], dict], name: str, value: torch.Tensor) -> Callable[[], dict]:
    return lambda: {**state(), name: value}


TRAIN_CASES = {
    "pretrained: wider MLP": _pretrained_case(
        lambda: _mlp_state(MLPConfig(hidden=[32])), ("'backbone.1.weight'", "(32, 64)"), r"expects \(16, 64\)"),
    "pretrained: a CNN for an MLP": _pretrained_case(
        lambda: _mlp_state(CNNConfig(channels=[4], hidden=8)), ("missing tensor 'backbone.1.weight'",),
        r"checkpoint of this architecture"),
    "pretrained: extra tensor": _pretrained_case(
        _with(_mlp_state, "head2.weight", torch.zeros(2)), ("'head2.weight'",), r"architecture does not have"),
    "pretrained: NaN weight": _pretrained_case(
        _with(_mlp_state, "head.bias", torch.full((10,), float("nan"))), ("'head.bias'",),
        r"NaN or Inf; expected finite weights"),
    "pretrained: Inf weight": _pretrained_case(
        _with(_mlp_state, "backbone.1.bias", torch.full((16,), float("-inf"))), ("'backbone.1.bias'",),
        r"NaN or Inf; expected finite weights"),
    "pretrained: truncated safetensors": _pretrained_case(
        _mlp_state, (), r"not a readable safetensors file", damage=_truncate),
    "pretrained: corrupt header": _pretrained_case(
        _mlp_state, (), r"not a readable safetensors file", damage=_corrupt_header),
}


BASE = {"embed.weight": torch.randn(7, 5, generator=torch.Generator().manual_seed(0)),
        "layer.bias": torch.randn(6, generator=torch.Generator().manual_seed(1))}


def _merge_case(model: dict, names: tuple[str, ...], expected: str, damage=None):
    def make(tmp: Path) -> Attempt:
        ws = Workspace(tmp / "ws")
        ws.root.mkdir(parents=True)
        save_tensors(ws.root / "base.safetensors", BASE)
        save_tensors(ws.root / "ok.safetensors", {k: v + 0.1 for k, v in BASE.items()})
        save_tensors(ws.root / "bad.safetensors", model)
        if damage:
            damage(ws.root / "bad.safetensors")
        inputs = {"base": str(ws.root / "base.safetensors"),
                  "models": [str(ws.root / "ok.safetensors"), str(ws.root / "bad.safetensors")]}
        _write_params(ws, {"merge": {"method": "task_arithmetic", "lambdas": [0.5], "checkpoints": inputs}})
        return Attempt(lambda: run_stage("merge", ws), str(ws.root / "bad.safetensors"), names, expected,
                       "merge", ws)
    return make


MERGE_CASES = {
    "merge: mismatched shape": _merge_case(
        {**BASE, "embed.weight": torch.zeros(7, 4)}, ("models[1]", "'embed.weight'", "(7, 4)"), r"base has \(7, 5\)"),
    "merge: wrong architecture (tensor missing)": _merge_case(
        {"embed.weight": BASE["embed.weight"]}, ("models[1]", "'layer.bias'"), r"which base .* has"),
    "merge: integer tensor for a float one": _merge_case(
        {**BASE, "layer.bias": torch.zeros(6, dtype=torch.int64)}, ("models[1]", "'layer.bias'"),
        r"float tensor cannot be merged with a non-float one"),
    "merge: NaN weight": _merge_case(
        {**BASE, "layer.bias": torch.full((6,), float("nan"))}, ("'layer.bias'",), r"expected finite weights"),
    "merge: Inf weight": _merge_case(
        {**BASE, "embed.weight": BASE["embed.weight"].clone().fill_(float("inf"))}, ("'embed.weight'",),
        r"expected finite weights"),
    "merge: truncated safetensors": _merge_case(
        dict(BASE), ("models[1]",), r"not a readable safetensors file", damage=_truncate),
    "merge: corrupt header": _merge_case(
        dict(BASE), ("models[1]",), r"not a readable safetensors file", damage=_corrupt_header),
}


def _artifact_case(mutate: Callable[[dict], dict], names: tuple[str, ...], expected: str, damage=None):
    """A model artifact as later stages read it (``load_any``): the check is the error alone."""
    def make(tmp: Path) -> Attempt:
        directory = tmp / "model"
        directory.mkdir()
        state = mutate(dict(_mlp_state()))
        save_model(directory, state, model_spec(MLP, (1, 8, 8), 10), root=tmp, stage="train", method="kaiming",
                   config={}, seed=0, parents={})
        if damage:
            damage(directory / "model.safetensors")
        return Attempt(lambda: load_any(directory), str(directory / "model.safetensors"), names, expected)
    return make


ARTIFACT_CASES = {
    "artifact: truncated weights": _artifact_case(lambda s: s, (), r"not a readable safetensors", _truncate),
    "artifact: corrupt header": _artifact_case(lambda s: s, (), r"not a readable safetensors", _corrupt_header),
    "artifact: NaN weights": _artifact_case(
        lambda s: {**s, "head.weight": s["head.weight"] * float("nan")}, ("'head.weight'",),
        r"expected finite weights"),
    "artifact: other architecture": _artifact_case(
        lambda s: {**s, "backbone.1.weight": torch.zeros(16, 65)}, ("'backbone.1.weight'", "(16, 65)"),
        r"expects \(16, 64\)"),
}

CASES = {**PARAMS_CASES, **DATA_CASES, **MERGE_CASES, **ARTIFACT_CASES}
KINDS = {  # the bad-input kinds of the issue -> the rows that try them
    "truncated or corrupt safetensors": ("pretrained: truncated safetensors", "pretrained: corrupt header",
                                         "merge: truncated safetensors", "merge: corrupt header",
                                         "artifact: truncated weights", "artifact: corrupt header"),
    "checkpoint of the wrong architecture": ("pretrained: wider MLP", "pretrained: a CNN for an MLP",
                                             "merge: wrong architecture (tensor missing)",
                                             "artifact: other architecture"),
    "NaN or Inf in data or weights": ("data: NaN in x", "data: Inf in x", "data: NaN in a parquet feature",
                                      "pretrained: NaN weight", "merge: NaN weight", "artifact: NaN weights"),
    "labels out of range": ("data: label out of range", "data: label beyond int64", "data: negative label",
                            "data: fractional label"),
    "mismatched shapes in a merge": ("merge: mismatched shape",),
    "params with unknown keys": ("params: unknown key", "params: unknown section"),
    "params with wrong types": ("params: wrong type", "params: section is a list"),
    "impossible combinations": ("params: held-out fractions leave no training data",
                                "params: batch not divisible by the world size", "params: select keeps nothing"),
}


def _check(attempt: Attempt) -> str:
    with pytest.raises(Exception) as info:
        attempt.call()
    err = info.value
    assert isinstance(err, PROJECT_ERRORS), f"{type(err).__name__} leaked: {err}"
    msg = str(err)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert attempt.file in msg, f"file {attempt.file} not named: {msg}"
    for name in attempt.names:
        assert name in msg, f"{name!r} not named: {msg}"
    assert re.search(attempt.expected, msg), f"no expectation /{attempt.expected}/: {msg}"
    if attempt.stage is not None:
        ws = attempt.ws
        assert not ws.artifact(attempt.stage).exists(), "an artifact was written"
        assert not ws.metrics(attempt.stage).exists(), "a metrics file was written"
        leftovers = [p.name for p in (ws.root / "artifacts").glob(".*")] if (ws.root / "artifacts").exists() else []
        assert not leftovers, f"temp directories left: {leftovers}"
    return msg


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_naming_file_key_and_expectation(case, tmp_path):
    print(f"\n{case}: {_check(CASES[case](tmp_path))}")


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_pretrained_checkpoint_stops_the_train_stage(case, tmp_path, trained_inputs):
    print(f"\n{case}: {_check(TRAIN_CASES[case](tmp_path, trained_inputs))}")


def test_the_table_covers_every_kind_of_the_issue():
    rows = {**CASES, **TRAIN_CASES}
    for kind, names in KINDS.items():
        assert names and all(n in rows for n in names), kind
    print(f"\nbad inputs tried: {len(rows)} ({len(PARAMS_CASES)} params, {len(DATA_CASES)} data files, "
          f"{len(TRAIN_CASES)} pretrained checkpoints, {len(MERGE_CASES)} merge checkpoints, "
          f"{len(ARTIFACT_CASES)} model artifacts)")
