"""The quantize stage end to end on digits: an RTN, a GPTQ and an AWQ variant each write a packed
artifact that loads back onto the low-bit modules, and metrics that put the methods side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.cpu_w4a8 import w4a8_available
from slimforge.artifacts import read_meta
from slimforge.checkpoint import load_any, load_model
from slimforge.config import ParamsError, dump_params, validate_params
from slimforge.data import load_dataset
from slimforge.workspace import Workspace
from tasks.ingest.stage import run as run_ingest
from tasks.quantize.execution import PackedLinear, W4A8CpuLinear
from tasks.quantize.stage import run as run_quantize
from tasks.select.stage import run as run_select
from tasks.train.stage import run as run_train

BASE = {"ingest": {"dataset": "digits", "max_examples": 600},
        "train": {"model": {"arch": "cnn", "channels": [8, 16], "hidden": 64}, "epochs": 10, "batch_size": 32,
                  "lr": 0.005}}
VARIANTS = [
    {"name": "rtn3", "bits": 3, "granularity": "channel"},  # no method: an RTN variant
    {"name": "gptq3", "method": "gptq", "bits": 3, "granularity": "channel", "act_order": True},
    {"name": "awq3", "method": "awq", "bits": 3, "granularity": "channel"},
    {"name": "gptq4", "method": "gptq", "bits": 4, "granularity": "group", "group_size": 32},
    {"name": "awq4", "method": "awq", "bits": 4, "granularity": "group", "group_size": 32},
]


def _params(root: Path, **sections):
    params = validate_params({**BASE, **sections}, "test")
    (root / "params.yaml").write_text(dump_params(params))
    return params


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("quantize")
    params = _params(root)
    ws = Workspace(root)
    for run in (run_ingest, run_select, run_train):
        run(params, ws)
    return ws


def test_methods_write_packed_artifacts_and_comparable_metrics(ws):
    params = _params(ws.root, quantize={"variants": VARIANTS, "calibration": {"size": 128}})
    metrics = run_quantize(params, ws)
    assert list(metrics) == [v["name"] for v in VARIANTS]
    base = load_model(ws.artifact("train"))
    x, _ = load_dataset(ws.artifact("ingest")).part("val")
    for v in VARIANTS:
        m = metrics[v["name"]]
        meta = read_meta(ws.artifact("quantize") / v["name"])
        assert m["method"] == meta["method"] == v.get("method", "rtn")
        assert meta["config"]["bits"] == v["bits"] and m["calibration_examples"] == 128
        model = load_any(ws.artifact("quantize") / v["name"])
        hidden = [m for m in model.backbone.body if not isinstance(m, (torch.nn.Conv2d, torch.nn.ReLU,
                                                                       torch.nn.MaxPool2d, torch.nn.Flatten))]
        assert len(hidden) == 1 and isinstance(hidden[0], PackedLinear)  # the hidden Linear runs a low-bit op
        with torch.no_grad():
            assert (model(x).argmax(1) == base(x).argmax(1)).float().mean() >= 0.7
    for bits, grid in ((3, "3"), (4, "4")):
        rtn = metrics["rtn3"]["calibration_layer_error"] if bits == 3 else None
        for method in ("gptq", "awq"):
            err = metrics[f"{method}{grid}"]["calibration_layer_error"]
            assert 0 < err < 1
            if rtn is not None:
                assert err < rtn, f"{method} {bits}-bit layer error {err} vs RTN {rtn}"
    assert metrics["gptq3"]["calibration_kl"] < metrics["rtn3"]["calibration_kl"]
    assert metrics["awq3"]["calibration_kl"] < metrics["rtn3"]["calibration_kl"]


def test_an_unknown_method_names_the_valid_ones(ws):
    with pytest.raises(ParamsError) as e:
        validate_params({"quantize": {"variants": [{"name": "a", "method": "gptqq", "bits": 4}]}}, "p.yaml")
    assert "p.yaml: quantize.variants.0" in str(e.value) and "'rtn', 'gptq', 'awq'" in str(e.value)
    with pytest.raises(ParamsError, match=r"quantize.variants.0.damp: -1"):
        validate_params({"quantize": {"variants": [{"name": "a", "method": "gptq", "bits": 4, "damp": -1}]}}, "p.yaml")


@pytest.mark.skipif(not w4a8_available(), reason="onnxruntime (the [cpu] extra) is not installed")
def test_cpu_int4_w4a8_reaches_the_artifact_and_its_loader(ws):
    variant = {"name": "w4", "bits": 4, "granularity": "group", "group_size": 32}
    params = _params(ws.root, quantize={"variants": [variant], "calibration": {"size": 64}, "cpu_int4": "w4a8"})
    metrics = run_quantize(params, ws)
    assert read_meta(ws.artifact("quantize") / "w4")["cpu_int4"] == "w4a8"
    model = load_any(ws.artifact("quantize") / "w4")
    assert any(isinstance(m, W4A8CpuLinear) for m in model.modules())  # what evaluate will time
    assert metrics["w4"]["calibration_agreement"] >= 0.8
    with pytest.raises(ParamsError, match=r"quantize.cpu_int4"):
        validate_params({"quantize": {"cpu_int4": "int4"}}, "p.yaml")
