"""The prune stage end to end on digits for every registered method: the artifact loads back
(sparse-stored, structurally smaller or factorized) and gives the model the stage measured."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from slimforge.artifacts import WEIGHTS, read_meta
from slimforge.checkpoint import load_any, load_model
from slimforge.config import dump_params, validate_params
from slimforge.data import load_dataset
from slimforge.training import accuracy
from slimforge.workspace import Workspace
from tasks.ingest.stage import run as run_ingest
from tasks.prune import METHODS, magnitude_masks, prunable
from tasks.prune.stage import run as run_prune
from tasks.select.stage import run as run_select
from tasks.train.stage import run as run_train

BASE = {"ingest": {"dataset": "digits", "max_examples": 600},
        "train": {"model": {"arch": "cnn", "channels": [8, 16], "hidden": 32}, "epochs": 3, "batch_size": 64}}
QUICK = {"epochs": 1, "batch_size": 64}
TINY = {
    "magnitude": {"sparsity": 0.9},
    "imp": {"sparsity": 0.5, "rate": 0.5, "training": QUICK, "rewind_steps": 2},
    "gmp": {"final_sparsity": 0.9, "training": {"epochs": 2, "batch_size": 64}, "end_epoch": 1, "prune_every": 2},
    "granet": {"final_sparsity": 0.9, "training": {"epochs": 2, "batch_size": 64}, "end_epoch": 1, "prune_every": 2},
    "random": {"sparsity": 0.9},
    "layer_adaptive": {"sparsity": 0.7, "grid_step": 0.1, "unit": 0.05, "calibration_size": 64},
    "nm": {"n": 2, "m": 4},
    "channel": {"keep_fraction": 0.5},
    "svd": {"ratio": 0.25},
    "welore": {"compression": 0.3},
    "trp": {"energy": 0.8, "truncate_every": 2, "training": QUICK},
    "sparse_soup": {"sparsity": 0.5, "rounds": 1, "ingredients": 2, "training": QUICK},
    "heads": {"keep_fraction": 0.5, "examples": 64},
}
VIT = {"model": {"arch": "vit", "patch": 4, "width": 16, "depth": 2, "heads": 4, "mlp": 32},
       "epochs": 2, "batch_size": 64}
VIT_ONLY = {"heads"}  # methods for a ViT base; the others run on the CNN base


def _params(root: Path, **sections):
    params = validate_params({**BASE, **sections}, "test")
    (root / "params.yaml").write_text(dump_params(params))
    return params


def _train_base(root: Path, **sections) -> Path:
    params = _params(root, **sections)
    ws = Workspace(root)
    for run in (run_ingest, run_select, run_train):
        run(params, ws)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return _train_base(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory) -> Path:
    return _train_base(tmp_path_factory.mktemp("trained_vit"), train=VIT)


@pytest.fixture
def ws(trained, tmp_path) -> Workspace:
    shutil.copytree(trained, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def test_every_method_has_tiny_settings():
    assert set(TINY) == set(METHODS)


@pytest.mark.parametrize("method", sorted(TINY))
def test_stage_writes_an_artifact_that_loads_back_as_the_measured_model(request, tmp_path, method):
    vit = method in VIT_ONLY
    ws = Workspace(shutil.copytree(request.getfixturevalue("trained_vit" if vit else "trained"), tmp_path / "ws"))
    params = _params(ws.root, prune={"method": method, **TINY[method], "recovery": QUICK}, **({"train": VIT} if vit else {}))
    metrics = run_prune(params, ws)
    model = load_any(ws.artifact("prune"))
    val = load_dataset(ws.artifact("ingest")).part("val")
    assert accuracy(model, *val) == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    meta = read_meta(ws.artifact("prune"))
    assert meta["method"] == method and meta["parents"]["base"]["path"] == "artifacts/train"
    if method in ("magnitude", "random", "gmp", "granet", "imp", "layer_adaptive", "sparse_soup"):
        target = TINY[method].get("sparsity", TINY[method].get("final_sparsity"))
        assert metrics["sparsity"] == pytest.approx(target, abs=1e-3)
        assert meta["format"] == "sparse"
    if method == "nm":
        assert metrics["nm_pattern"] == "2:4" and meta["format"] == "sparse"
    if method == "channel":
        assert meta["model"]["config"]["channels"] == [4, 8]
        assert metrics["parameters"] < sum(p.numel() for p in load_model(ws.artifact("train")).parameters()) / 3
    if method in ("svd", "welore", "trp"):
        assert meta["model"]["low_rank"] and metrics["ranks"] == meta["model"]["low_rank"]
    if method == "sparse_soup":
        assert len(metrics["soup_rounds"]["1"]["ingredient_val_accuracy"]) == 2
    if method == "heads":
        assert meta["model"]["config"]["block_heads"] == [2, 2]
        assert metrics["parameters"] < sum(p.numel() for p in load_model(ws.artifact("train")).parameters())


def test_a_90_percent_sparse_file_is_under_a_quarter_of_the_dense_one(ws):
    params = _params(ws.root, prune={"method": "magnitude", "sparsity": 0.9, "scope": "layer", "recovery": QUICK})
    metrics = run_prune(params, ws)
    stored, dense = (ws.artifact(s) / WEIGHTS for s in ("prune", "train"))
    assert metrics["bytes"] == stored.stat().st_size
    assert stored.stat().st_size <= 0.25 * dense.stat().st_size, (stored.stat().st_size, dense.stat().st_size)


def test_perp_retrains_only_biases_and_keeps_the_mask(ws):
    params = _params(ws.root, prune={"method": "magnitude", "sparsity": 0.8, "recovery_params": "perp",
                                     "recovery": {"epochs": 2, "batch_size": 64, "lr": 0.01}})
    run_prune(params, ws)
    pruned = load_model(ws.artifact("prune"))
    base = load_model(ws.artifact("train"))
    for (name, p), q in zip(pruned.named_parameters(), base.parameters(), strict=True):
        if name.endswith("weight"):  # the surviving weights are the base's, the rest zero
            assert torch.all((p == 0) | (p == q)), name
        else:
            assert not torch.equal(p, q), f"{name} was not retrained"


def test_perp_lora_moves_the_surviving_weights_and_keeps_the_mask(ws):
    params = _params(ws.root, prune={"method": "magnitude", "sparsity": 0.8, "recovery_params": "perp_lora",
                                     "recovery_lora_rank": 2, "recovery": {"epochs": 1, "batch_size": 64, "lr": 0.01}})
    metrics = run_prune(params, ws)
    assert metrics["sparsity"] == pytest.approx(0.8, abs=1e-3)
    pruned = load_model(ws.artifact("prune"))
    base = load_model(ws.artifact("train"))
    assert list(pruned.state_dict()) == list(base.state_dict())
    masks = magnitude_masks(prunable(base), 0.8, "global")  # the stage's mask, recomputed
    for name, w in prunable(pruned).items():
        assert torch.equal(w != 0, masks[name]), name  # exactly the mask
        assert not torch.equal(w[masks[name]], prunable(base)[name][masks[name]]), f"{name} did not move"


def test_random_baseline_keeps_the_per_layer_counts_and_is_recovered_like_the_method(ws):
    params = _params(ws.root, prune={"method": "magnitude", "sparsity": 0.8, "random_baseline": True,
                                     "recovery": QUICK})
    metrics = run_prune(params, ws)
    pruned, baseline = load_model(ws.artifact("prune")), load_model(ws.artifact("prune", "random_baseline"))
    assert read_meta(ws.artifact("prune", "random_baseline"))["method"] == "random_like"
    base = load_model(ws.artifact("train"))
    for (name, p), q, b in zip(pruned.named_parameters(), baseline.parameters(), base.parameters(), strict=True):
        if p.dim() > 1:  # prunable weights: same kept count, other places, retrained
            assert int((p != 0).sum()) == int((q != 0).sum()) and not torch.equal(p != 0, q != 0), name
            assert not torch.equal(q[q != 0], b[q != 0]), f"{name} of the baseline was not recovered"
    val = load_dataset(ws.artifact("ingest")).part("val")
    assert accuracy(baseline, *val) == pytest.approx(metrics["val_accuracy_random_baseline"], abs=1e-6)
