"""The train stage: checkpoints under runs/train/<key>/seed-<s>, recorded in meta.json; a run killed with
SIGKILL and started again ends with the same weights as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slimforge.artifacts
from slimforge.artifacts import load_tensors, read_meta
from slimforge.config import dump_params, validate_params
from slimforge.resume import step_dirs
from slimforge.workspace import Workspace
from tasks.ingest.stage import run as run_ingest
from tasks.select.stage import run as run_select
from tasks.train.stage import run as run_train
from tasks.train.stage import run_key

TRAIN = {"model": {"arch": "mlp", "hidden": [32]}, "epochs": 2, "batch_size": 32}  # 420 examples: 28 steps


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A workspace with the ingest (600 digits) and select artifacts, made once."""
    root = tmp_path_factory.mktemp("prepared")
    params = _params(root, TRAIN)
    run_ingest(params, Workspace(root))
    run_select(params, Workspace(root))
    return root


@pytest.fixture
def pinned_code_version(monkeypatch):
    """Other engineers edit the tree while tests run; pin the code hash so run keys compare."""
    monkeypatch.setattr(slimforge.artifacts, "code_version", lambda stage=None: "test")


def _params(root: Path, train: dict):
    """Validated params with ``train``, also written to root/params.yaml as the CLI reads them."""
    params = validate_params({"ingest": {"dataset": "digits", "max_examples": 600}, "train": train}, "test")
    (root / "params.yaml").write_text(dump_params(params))
    return params


def _workspace(prepared: Path, root: Path, train: dict):
    shutil.copytree(prepared, root)
    return _params(root, train), Workspace(root)


def _checkpoints(root: Path) -> dict[int, Path]:
    runs = root / "runs" / "train"
    return {step: path for run in sorted(runs.glob("*/seed-*")) for step, path in step_dirs(run)}


def test_checkpoints_are_recorded_and_readable_by_rewind(prepared, tmp_path, pinned_code_version):
    params, ws = _workspace(prepared, tmp_path / "ws", {**TRAIN, "checkpoint_every": 10, "keep_checkpoints": 0})
    metrics = run_train(params, ws)
    meta = read_meta(ws.artifact("train"))
    key = run_key(params.train, {"dataset": ws.artifact("ingest"), "selection": ws.artifact("select")})
    assert meta["checkpoints"] == f"runs/train/{key}/seed-0"
    assert sorted(_checkpoints(ws.root)) == [10, 20, 28]
    final = load_tensors(ws.root / meta["checkpoints"] / "step-00000028" / "model.safetensors")
    trained = load_tensors(ws.artifact("train", "model.safetensors"))
    assert all(torch.equal(final[k], trained[k]) for k in trained)
    assert metrics["train_examples"] == 420

    rewind = {"scheme": "rewind", "run": meta["checkpoints"], "step": 10}  # the path meta.json records
    rewound = _params(ws.root, {**TRAIN, "checkpoint_every": 10, "init": rewind})
    run_train(rewound, ws)
    meta = read_meta(ws.artifact("train"))
    assert meta["method"] == "rewind" and meta["checkpoints"] != f"runs/train/{key}/seed-0"


def test_checkpointing_off_writes_what_the_stage_always_wrote(prepared, tmp_path, pinned_code_version):
    params, ws = _workspace(prepared, tmp_path / "off", TRAIN)
    run_train(params, ws)
    assert not (ws.root / "runs").exists()
    assert "checkpoints" not in read_meta(ws.artifact("train"))
    assert sorted(p.name for p in ws.artifact("train").iterdir()) == ["meta.json", "model.safetensors"]


def test_the_run_key_follows_config_and_inputs_not_checkpoint_settings(prepared, pinned_code_version):
    ws = Workspace(prepared)
    inputs = {"dataset": ws.artifact("ingest"), "selection": ws.artifact("select")}
    base = _params(prepared / "..", TRAIN).train
    key = run_key(base, inputs)
    assert run_key(base.model_copy(update={"checkpoint_every": 3, "keep_checkpoints": 9}), inputs) == key
    assert run_key(base.model_copy(update={"lr": 0.01}), inputs) != key
    assert run_key(base, {**inputs, "selection": ws.artifact("ingest")}) != key


def _slimforge_stage_train(root: Path, log: str) -> subprocess.Popen:
    """``slimforge stage train`` in ``root``, as dvc.yaml runs it."""
    env = {k: v for k, v in os.environ.items() if k != "SLIMFORGE_WORKSPACE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = open(root / log, "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(["slimforge", "stage", "train"], cwd=root, env=env, stdout=out, stderr=out)


def _finish(proc: subprocess.Popen, root: Path, log: str) -> None:
    assert proc.wait(timeout=300) == 0, (root / log).read_text()[-3000:]


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_bit_identical_weights(prepared, tmp_path):
    long = {**TRAIN, "epochs": 4, "batch_size": 8}  # 53 steps per epoch, 212 in all
    _workspace(prepared, tmp_path / "ref", long)
    _workspace(prepared, tmp_path / "killed", {**long, "checkpoint_every": 5, "keep_checkpoints": 0})
    reference = _slimforge_stage_train(tmp_path / "ref", "log")
    killed = _slimforge_stage_train(tmp_path / "killed", "log1")
    deadline = time.monotonic() + 240
    while len(_checkpoints(tmp_path / "killed")) < 2:
        assert killed.poll() is None, "the run ended before it was killed: " + (tmp_path / "killed/log1").read_text()
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed/artifacts/train").exists()
    before = {step: os.stat(p / "model.safetensors").st_ino for step, p in _checkpoints(tmp_path / "killed").items()
              if (p / "model.safetensors").is_file()}
    assert before and max(before) < 212

    _finish(_slimforge_stage_train(tmp_path / "killed", "log2"), tmp_path / "killed", "log2")
    _finish(reference, tmp_path / "ref", "log")
    after = _checkpoints(tmp_path / "killed")
    assert max(after) == 212
    resumed_from = max(s for s in before if s % 5 == 0)
    assert os.stat(after[resumed_from] / "model.safetensors").st_ino == before[resumed_from]  # not re-trained
    want = load_tensors(tmp_path / "ref/artifacts/train/model.safetensors")
    got = load_tensors(tmp_path / "killed/artifacts/train/model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name}: max diff {(want[name] - got[name]).abs().max()}"
    ref_metrics = json.loads((tmp_path / "ref/metrics/train.json").read_text())
    assert json.loads((tmp_path / "killed/metrics/train.json").read_text()) == ref_metrics


def test_seed_sweep_writes_one_run_per_seed(prepared, tmp_path, pinned_code_version):
    params, ws = _workspace(prepared, tmp_path / "ws", {**TRAIN, "seeds": [3, 4]})
    metrics = run_train(params, ws)
    main = load_tensors(ws.artifact("train", "model.safetensors"))
    extra = {s: load_tensors(ws.artifact("train", "seeds", f"seed-{s}", "model.safetensors")) for s in (3, 4)}
    assert set(metrics["val_accuracy_by_seed"]) == {"0", "3", "4"}
    assert not torch.equal(main["head.weight"], extra[3]["head.weight"])
    assert json.loads((ws.artifact("train", "seeds", "seed-4") / "meta.json").read_text())["seed"] == 4
    alone, ws_alone = _workspace(prepared, tmp_path / "alone", {**TRAIN, "seed": 3})
    run_train(alone, ws_alone)
    assert torch.equal(load_tensors(ws_alone.artifact("train", "model.safetensors"))["head.weight"],
                       extra[3]["head.weight"])  # a sweep member is the same run as training that seed alone


def test_random_baseline_trains_on_a_random_subset_shaped_like_the_selection(tmp_path):
    from tasks.train.stage import random_subset

    y_all = torch.arange(10).repeat(20)  # 20 of each class
    chosen = torch.tensor([0, 0, 0, 1, 7, 7])
    ids = random_subset(y_all, chosen, torch.Generator().manual_seed(0))
    assert sorted(y_all[ids].tolist()) == sorted(chosen.tolist()) and len(ids.unique()) == len(ids)
    assert not torch.equal(ids, random_subset(y_all, chosen, torch.Generator().manual_seed(1)))

    root = tmp_path / "ws"
    root.mkdir()
    params = validate_params({"ingest": {"dataset": "digits", "max_examples": 600}, "train": {**TRAIN,
                              "random_baseline": True},
                              "select": {"method": "el2n", "keep_fraction": 0.3, "scoring_epochs": 1,
                                         "scoring_seeds": 1}}, "test")
    (root / "params.yaml").write_text(dump_params(params))
    ws = Workspace(root)
    run_ingest(params, ws)
    run_select(params, ws)
    metrics = run_train(params, ws)
    baseline = ws.artifact("train", "random_baseline")
    assert read_meta(baseline)["method"] == "random_subset" and 0 < metrics["val_accuracy_random_baseline"] <= 1
    assert not torch.equal(load_tensors(baseline / "model.safetensors")["head.weight"],
                           load_tensors(ws.artifact("train") / "model.safetensors")["head.weight"])
