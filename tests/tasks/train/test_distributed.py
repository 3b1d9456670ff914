"""DDP training (torchrun, gloo on CPU) on 2 processes matches single-process ``fit`` on the same
global batches to float rounding; the train stage runs it from params; bad settings and a failed
child are refused in one line and leave no artifact."""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile

import pytest
import torch
from sklearn.datasets import load_digits

import tasks.train.distributed
from slimforge.artifacts import load_tensors, read_meta
from slimforge.checkpoint import build_from_spec, model_spec
from slimforge.config import ParamsError, dump_params, validate_params
from slimforge.models import CNNConfig
from slimforge.training import EpochPlan, FitConfig, MaskHold, fit
from slimforge.workspace import Workspace
from tasks.ingest.stage import run as run_ingest
from tasks.select.dsa import batch_augment
from tasks.select.stage import run as run_select
from tasks.train.distributed import DistributedConfig, DistributedRunError, fit_distributed
from tasks.train.init import initialize
from tasks.train.stage import run as run_train

TOL = 1e-5  # float32 rounding of sums taken in another order, after ~20 steps
TWO = DistributedConfig(nproc_per_node=2, backend="gloo")
TRAIN = {"model": {"arch": "mlp", "hidden": [32]}, "epochs": 2, "batch_size": 32}  # 420 examples: last batch 4


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data[:n], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, torch.tensor(d.target[:n])


def test_two_process_ddp_matches_one_process_on_the_same_global_batch():
    x, y = _digits(300)
    g = torch.Generator().manual_seed(0)
    spec = model_spec(CNNConfig(channels=[8], hidden=16), (1, 8, 8), 10)
    model = build_from_spec(spec)
    initialize(model, "kaiming", g)
    init = copy.deepcopy(model.state_dict())
    masks = {"head.weight": torch.rand(10, 16, generator=g) < 0.7}
    # 241 positions per epoch, batches of 32: the last batch of 17 splits 9 / 8 over the ranks
    plan = EpochPlan(torch.stack([torch.randperm(300, generator=g)[:241] for _ in range(2)]),
                     torch.rand(2, 241, generator=g) + 0.5)
    cfg = FitConfig(epochs=2, batch_size=32, lr=1e-2)
    start = g.get_state()
    ref = copy.deepcopy(model)
    want = fit(ref, x, y, cfg, g, hold=MaskHold(ref, masks), plan=plan, augment=batch_augment())
    g_ddp = torch.Generator().set_state(start)
    got = fit_distributed(spec, model, x, y, cfg, g_ddp, TWO, masks=masks, plan=plan, augment="dsa")

    diff = _max_diff(ref.state_dict(), model.state_dict())
    assert diff < TOL, f"DDP vs one process: max abs weight difference {diff:.3g}"
    assert got == pytest.approx(want, rel=1e-5) and torch.equal(g_ddp.get_state(), g.get_state())
    assert not model.head.weight[~masks["head.weight"]].any()  # the mask held on every rank

    control = build_from_spec(spec)  # the check can fail: the per-rank batch of 16 trained alone
    control.load_state_dict(init)
    fit(control, x, y, cfg.model_copy(update={"batch_size": 16}), torch.Generator().set_state(start),
        hold=MaskHold(control, masks), plan=plan, augment=batch_augment())
    off = _max_diff(control.state_dict(), model.state_dict())
    assert off > 1e3 * max(diff, 1e-7), f"control differs by only {off:.3g} (DDP vs one process: {diff:.3g})"




@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A workspace with the ingest (600 digits) and select artifacts, made once."""
    root = tmp_path_factory.mktemp("prepared")
    params = _params(root, TRAIN)
    run_ingest(params, Workspace(root))
    run_select(params, Workspace(root))
    return root


def _params(root, train: dict):
    params = validate_params({"ingest": {"dataset": "digits", "max_examples": 600}, "train": train}, "params.yaml")
    (root / "params.yaml").write_text(dump_params(params))
    return params


def _workspace(prepared, root, train: dict):
    shutil.copytree(prepared, root)
    return _params(root, train), Workspace(root)


def test_the_stage_trains_with_ddp_to_the_single_process_weights(prepared, tmp_path):
    one, ws_one = _workspace(prepared, tmp_path / "one", TRAIN)
    ddp, ws_ddp = _workspace(prepared, tmp_path / "ddp", {**TRAIN, "checkpoint_every": 10,
                                                          "distributed": {"nproc_per_node": 2, "backend": "gloo"}})
    want, got = run_train(one, ws_one), run_train(ddp, ws_ddp)
    a = load_tensors(ws_one.artifact("train", "model.safetensors"))
    b = load_tensors(ws_ddp.artifact("train", "model.safetensors"))
    diff = _max_diff(a, b)
    assert diff < TOL, f"DDP stage vs one-process stage: max abs weight difference {diff:.3g}"
    assert got["final_train_loss"] == pytest.approx(want["final_train_loss"], abs=1e-5)
    meta = read_meta(ws_ddp.artifact("train"))
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in read_meta(
        ws_one.artifact("train"))
    last = ws_ddp.root / meta["checkpoints"] / "step-00000028" / "model.safetensors"  # written by rank 0
    assert _max_diff(load_tensors(last), b) == 0


def test_a_batch_the_processes_cannot_share_evenly_is_refused_naming_the_keys(tmp_path):
    with pytest.raises(ParamsError) as e:
        _params(tmp_path, {**TRAIN, "batch_size": 30, "distributed": {"nproc_per_node": 4}})
    assert "train.batch_size 30" in str(e.value) and "train.distributed.nproc_per_node 4" in str(e.value)
    with pytest.raises(ParamsError, match="nnodes 2 needs master_addr and master_port"):
        _params(tmp_path, {**TRAIN, "distributed": {"nnodes": 2}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_without_gpus_is_refused_before_training(prepared, tmp_path):
    params, ws = _workspace(prepared, tmp_path / "ws", {**TRAIN, "distributed": {"nproc_per_node": 2,
                                                                                  "backend": "nccl"}})
    with pytest.raises(ParamsError, match="train.distributed.backend 'nccl' .* needs that many CUDA GPUs"):
        run_train(params, ws)
    assert not ws.artifact("train").exists()


def test_a_failed_child_is_one_line_with_its_error_and_leaves_no_artifact(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.train.distributed, "WORKER", "tasks.train.no_such_worker")
    params, ws = _workspace(prepared, tmp_path / "ws", {**TRAIN, "distributed": {"nproc_per_node": 2}})
    with pytest.raises(DistributedRunError) as e:
        run_train(params, ws)
    msg = str(e.value)
    assert "\n" not in msg and "exited with status 1" in msg and "No module named" in msg, msg
    assert not ws.artifact("train").exists() and not list(ws.root.glob("artifacts/.train*"))


def test_a_run_past_its_timeout_is_stopped_with_every_worker_reaped(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the job directory, to find its processes by
    x, y = _digits(1000)
    spec = model_spec(CNNConfig(channels=[8], hidden=16), (1, 8, 8), 10)
    slow = FitConfig(epochs=100, batch_size=8)
    with pytest.raises(DistributedRunError, match="did not finish within timeout_s 3 s"):
        fit_distributed(spec, build_from_spec(spec), x, y, slow, torch.Generator(), TWO.model_copy(
            update={"timeout_s": 3}))
    left = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    assert str(tmp_path) not in left, left
