"""The merge stage end to end on digits: the pipeline's task models merged by every method into a
multi-head artifact (with patches), checkpoints on disk merged by streaming, and two models from
different inits aligned by weight matching with the loss barrier measured."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from slimforge.artifacts import ArtifactError, load_tensors, read_meta, save_tensors
from slimforge.checkpoint import load_model, load_multihead
from slimforge.config import ParamsError, dump_params, validate_params
from slimforge.workspace import Workspace
from tasks.finetune.stage import run as run_finetune
from tasks.ingest.stage import run as run_ingest
from tasks.merge.stage import run as run_merge
from tasks.merge.task_arithmetic import TaskVectorConfig, merge_task_vectors, task_vectors
from tasks.select.stage import run as run_select
from tasks.train.stage import run as run_train

BASE = {"ingest": {"dataset": "digits", "max_examples": 600},
        "train": {"model": {"arch": "mlp", "hidden": [32]}, "epochs": 4, "batch_size": 32, "lr": 0.005},
        "finetune": {"tasks": [{"name": "rot90", "transform": "rotate90"}, {"name": "flip", "transform": "hflip"}],
                     "epochs": 2, "batch_size": 32}}


def _params(root: Path, **sections):
    params = validate_params({**BASE, **sections}, "test")
    (root / "params.yaml").write_text(dump_params(params))
    return params


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("merge")
    params = _params(root)
    ws = Workspace(root)
    for run in (run_ingest, run_select, run_train, run_finetune):
        run(params, ws)
    return ws


def test_lambda_zero_merges_to_the_base_and_keeps_every_head(ws):
    metrics = run_merge(_params(ws.root, merge={"method": "ties", "lambdas": [0.0]}), ws)
    assert metrics["lambda"] == 0.0 and set(metrics["val_accuracy_by_task"]) == {"rot90", "flip"}
    base, merged = load_model(ws.artifact("train")), load_multihead(ws.artifact("merge"))
    for task, model in merged.items():
        assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                     base.backbone.state_dict().values(), strict=True))
        assert torch.equal(model.head.weight, load_model(ws.artifact("finetune", task)).head.weight)


@pytest.mark.parametrize("merge", [
    {"method": "task_arithmetic", "lambdas": [0.3, 0.6]},
    {"method": "dare", "drop": 0.5, "lambdas": [0.5], "rescales": [0.5, 0.7], "seed": 3},
    {"method": "average"},
    {"method": "greedy_soup"},
    {"method": "adamerging", "steps": 3, "granularity": "task"},
])
def test_every_method_writes_a_multihead_artifact_with_its_report(ws, merge):
    metrics = run_merge(_params(ws.root, merge=merge), ws)
    meta = read_meta(ws.artifact("merge"))
    assert meta["method"] == metrics["method"] == merge["method"] and meta["tasks"] == ["flip", "rot90"]
    assert 0 <= metrics["val_accuracy"] <= 1 and len(load_multihead(ws.artifact("merge"))) == 2
    if merge["method"] == "dare":
        assert metrics["rescale"] in (0.5, 0.7) and len(metrics["val_accuracy_by_lambda"]) == 2


def test_full_precision_patches_reproduce_the_task_models(ws):
    metrics = run_merge(_params(ws.root, merge={"method": "task_arithmetic", "lambdas": [0.5],
                                                "patch": {"layers": ["*"]}}), ws)
    for task, report in metrics["patches"].items():
        assert (ws.artifact("merge") / "patches" / f"{task}.safetensors").is_file()
        assert report["val_accuracy"] == metrics["finetuned_val_accuracy_by_task"][task]
    small = run_merge(_params(ws.root, merge={"method": "task_arithmetic", "lambdas": [0.5],
                                              "patch": {"layers": ["1.*"], "rank": 2, "bits": 8}}), ws)
    assert all(r["compression"] > 10 for r in small["patches"].values())


def test_checkpoints_on_disk_merge_by_streaming_like_in_memory(ws, tmp_path):
    base = load_model(ws.artifact("train")).state_dict()
    tuned = [load_model(ws.artifact("finetune", t)).state_dict() for t in ("rot90", "flip")]
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "a", "b")]
    for path, state in zip(paths, [base, *tuned], strict=True):
        save_tensors(path, {k: v.contiguous() for k, v in state.items()})
    merge = {"method": "ties", "lambdas": [0.8], "density": 0.5,
             "checkpoints": {"base": str(paths[0]), "models": [str(p) for p in paths[1:]]}}
    metrics = run_merge(_params(ws.root, merge=merge), ws)
    assert metrics["format"] == "checkpoint"
    got = load_tensors(ws.artifact("merge") / "model.safetensors")
    cfg = TaskVectorConfig(method="ties", density=0.5)
    want = merge_task_vectors(base, task_vectors(base, tuned), 0.8, cfg)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert read_meta(ws.artifact("merge"))["parents"]["base"]["path"] == paths[0].resolve().as_posix()


def test_a_missing_checkpoint_is_named_and_leaves_the_previous_artifact(ws, tmp_path):
    run_merge(_params(ws.root, merge={"method": "average"}), ws)
    before = read_meta(ws.artifact("merge"))
    missing = tmp_path / "nope.safetensors"
    merge = {"method": "task_arithmetic", "lambdas": [1.0],
             "checkpoints": {"base": str(missing), "models": [str(missing)]}}
    with pytest.raises(ArtifactError, match="nope.safetensors"):
        run_merge(_params(ws.root, merge=merge), ws)
    assert read_meta(ws.artifact("merge")) == before


def test_checkpoints_need_one_lambda_and_unknown_methods_list_the_valid_ones(ws):
    with pytest.raises(ParamsError, match="lambdas"):
        _params(ws.root, merge={"method": "ties", "lambdas": [0.5, 1.0], "checkpoints": {"base": "a", "models": ["b"]}})
    with pytest.raises(ParamsError, match="weight_matching"):
        _params(ws.root, merge={"method": "tie"})


def test_weight_matching_aligns_two_inits_and_measures_the_barrier(ws, tmp_path):
    other = Workspace(tmp_path / "other")
    shutil.copytree(ws.artifact("ingest"), other.artifact("ingest"))
    params = _params(other.root, train={**BASE["train"], "seed": 1})
    run_select(params, other)
    run_train(params, other)
    merge = {"method": "weight_matching", "models": [str(ws.artifact("train")), str(other.artifact("train"))]}
    metrics = run_merge(_params(ws.root, merge=merge), ws)
    assert set(metrics["loss_barrier"]) == {"naive", "weight matching"}
    assert (ws.artifact("merge") / "barrier.png").stat().st_size > 0
    assert read_meta(ws.artifact("merge"))["format"] == "dense" and load_model(ws.artifact("merge")) is not None
    assert all(0 <= b < 10 for b in metrics["loss_barrier"].values()) and len(metrics["curves"]["naive"]) == 11
