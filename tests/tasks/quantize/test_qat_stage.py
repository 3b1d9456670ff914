"""A QAT variant through the quantize stage on digits: trained on the labelled train split, written
packed beside an RTN variant, with per-epoch oscillation figures in its metrics."""

from __future__ import annotations

import torch

from slimforge.artifacts import read_meta
from slimforge.checkpoint import load_any, load_model
from slimforge.config import dump_params, validate_params
from slimforge.data import load_dataset
from slimforge.workspace import Workspace
from tasks.ingest.stage import run as run_ingest
from tasks.quantize.stage import run as run_quantize
from tasks.select.stage import run as run_select
from tasks.train.stage import run as run_train

BASE = {"ingest": {"dataset": "digits", "max_examples": 600},
        "train": {"model": {"arch": "mlp", "hidden": [64]}, "epochs": 10, "batch_size": 32, "lr": 0.005}}
VARIANTS = [
    {"name": "rtn2", "bits": 2, "granularity": "channel"},
    {"name": "ofq2", "method": "qat", "quantizer": "ofq", "bits": 2, "granularity": "channel",
     "training": {"epochs": 3, "lr": 0.001, "batch_size": 32, "weight_decay": 0.0}, "cga_epochs": 1},
]


def test_a_qat_variant_trains_on_the_train_split_and_reports_oscillation(tmp_path):
    params = validate_params({**BASE, "quantize": {"variants": VARIANTS, "calibration": {"size": 64}}}, "test")
    (tmp_path / "params.yaml").write_text(dump_params(params))
    ws = Workspace(tmp_path)
    for run in (run_ingest, run_select, run_train):
        run(params, ws)
    metrics = run_quantize(params, ws)
    qat, rtn = metrics["ofq2"], metrics["rtn2"]
    assert "training" not in rtn and qat["method"] == "qat"
    assert [row["phase"] for row in qat["training"]] == ["qat", "qat", "qat", "cga"]
    assert 0 <= qat["oscillating_share"] == qat["training"][-1]["oscillating_share"] <= 1
    meta = read_meta(ws.artifact("quantize") / "ofq2")
    assert "training" in meta["parents"] and meta["config"]["quantizer"] == "ofq"
    x, y = load_dataset(ws.artifact("ingest")).part("val")
    with torch.no_grad():
        acc = {name: float((load_any(ws.artifact("quantize") / name)(x).argmax(1) == y).float().mean())
               for name in metrics}
    assert acc["ofq2"] > acc["rtn2"], acc  # 2-bit QAT recovers what 2-bit RTN loses


def test_an_ofq_variant_with_qkr_trains_a_vit_and_exports_a_loadable_artifact(tmp_path):
    base = {**BASE, "train": {**BASE["train"], "model": {"arch": "vit", "patch": 8, "width": 16, "depth": 1,
                                                          "heads": 2, "mlp": 32}, "epochs": 4}}
    variant = {**VARIANTS[1], "name": "ofq2qkr", "qkr": True, "training": {**VARIANTS[1]["training"], "epochs": 2}}
    params = validate_params({**base, "quantize": {"variants": [variant], "calibration": {"size": 64}}}, "test")
    (tmp_path / "params.yaml").write_text(dump_params(params))
    ws = Workspace(tmp_path)
    for run in (run_ingest, run_select, run_train):
        run(params, ws)
    metrics = run_quantize(params, ws)["ofq2qkr"]
    assert [row["phase"] for row in metrics["training"]] == ["qat", "qat", "cga"]
    assert all(0 <= row["qk_oscillating_share"] <= 1 for row in metrics["training"])
    assert read_meta(ws.artifact("quantize") / "ofq2qkr")["config"]["qkr"] is True
    x, _ = load_dataset(ws.artifact("ingest")).part("val")
    with torch.no_grad():
        exported = load_any(ws.artifact("quantize") / "ofq2qkr")
        assert exported(x).isfinite().all()
    key = next(k for k in exported.state_dict() if k.endswith("in_proj_weight"))
    base_w = load_model(ws.artifact("train")).state_dict()[key]
    q, k, v = exported.state_dict()[key].chunk(3)
    bq, bk, bv = base_w.chunk(3)
    assert not torch.equal(q, bq) and not torch.equal(k, bk)  # QKR's trained q/k rows are stored
    assert torch.equal(v, bv)  # W_v is the base's
