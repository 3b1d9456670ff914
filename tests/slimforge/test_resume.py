"""Exact resume: a run stopped after k steps and continued ends bit-identical to one that was
never stopped; only the newest K checkpoints stay; checkpoints hold safetensors and JSON only."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimforge.artifacts import ArtifactError
from slimforge.resume import FILES, CheckpointWarning, step_dirs
from slimforge.training import Checkpointing, FitConfig, fit

SHAPE = (1, 8, 8)
N, BATCH = 100, 16  # 7 steps per epoch, the last one short
CONFIGS = {"sgd": FitConfig(optimizer="sgd", lr=0.05, epochs=3, batch_size=BATCH),
           "adamw": FitConfig(optimizer="adamw", lr=3e-3, weight_decay=1e-2, epochs=3, batch_size=BATCH,
                              schedule="cosine", warmup_steps=4),
           "lion": FitConfig(optimizer="lion", lr=1e-3, weight_decay=0.1, epochs=3, batch_size=BATCH)}


class Stop(Exception):
    """Raised from after_step: the run 'dies' after a given optimizer step."""


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, *SHAPE, generator=g), torch.randint(0, 10, (N,), generator=g)


def _model(dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the test's fixed start; library code never seeds
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10))


def _run(cfg, ckpt=None, stop_after=None, dropout=0.0):
    """(model, history) of one fit; raises Stop after step ``stop_after``. The global RNG (dropout)
    starts from the same state in every call."""
    model, counter = _model(dropout), itertools.count(1)

    def after_step(_):
        if next(counter) == stop_after:
            raise Stop

    with torch.random.fork_rng():
        torch.manual_seed(123)
        history = fit(model, *_data(), cfg, torch.Generator().manual_seed(7), after_step=after_step,
                      label="t", checkpoint=ckpt)
    return model, history


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), f"{name}: max diff {(ta - tb).abs().max().item()}"


@pytest.mark.parametrize("optimizer", sorted(CONFIGS))
@pytest.mark.parametrize("every,stop_after", [(5, 13), (7, 16), (4, 21)])  # mid-epoch, epoch end, finished
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, optimizer, every, stop_after):
    cfg = CONFIGS[optimizer]
    reference, ref_history = _run(cfg)
    ckpt = Checkpointing(tmp_path / "run", every_steps=every, keep_last=2)
    if stop_after < 21:
        with pytest.raises(Stop):
            _run(cfg, ckpt, stop_after=stop_after)
        assert step_dirs(ckpt.directory)[-1][0] == stop_after // every * every
    else:
        _run(cfg, ckpt)
    resumed, history = _run(cfg, ckpt)
    _assert_same(reference, resumed)
    assert history == ref_history and len(history) == 3


def test_resume_restores_the_global_rng_for_dropout(tmp_path):
    cfg = CONFIGS["adamw"]
    reference, _ = _run(cfg, dropout=0.3)
    ckpt = Checkpointing(tmp_path / "run", every_steps=3)
    with pytest.raises(Stop):
        _run(cfg, ckpt, stop_after=11, dropout=0.3)
    with torch.random.fork_rng():
        torch.manual_seed(999)  # a different global state at restart: the checkpoint's wins
        resumed = _model(0.3)
        fit(resumed, *_data(), cfg, torch.Generator().manual_seed(7), label="t", checkpoint=ckpt)
    _assert_same(reference, resumed)


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    _run(CONFIGS["sgd"], Checkpointing(tmp_path / "k3", every_steps=2, keep_last=3))
    assert [s for s, _ in step_dirs(tmp_path / "k3")] == [18, 20, 21]  # 21 = the final step
    _run(CONFIGS["sgd"], Checkpointing(tmp_path / "all", every_steps=5, keep_last=0))
    assert [s for s, _ in step_dirs(tmp_path / "all")] == [5, 10, 15, 20, 21]
    assert not [p for p in (tmp_path / "k3").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_a_checkpoint_is_safetensors_and_json_only(tmp_path):
    _run(CONFIGS["adamw"], Checkpointing(tmp_path / "run", every_steps=10))
    _, path = step_dirs(tmp_path / "run")[-1]
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{f.name} looks like a pickle / torch.save zip"
        load_file(f) if f.suffix == ".safetensors" else json.loads(f.read_text())
    state = json.loads((path / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (21, 3, 0)
    assert state["lr"] == 0.0 and len(state["history"]) == 3  # cosine ends at 0
    rng = load_file(path / "rng.safetensors")
    assert {k: t.dtype for k, t in rng.items()} == dict.fromkeys(("current", "epoch_start", "torch_cpu"), torch.uint8)
    assert sorted(load_file(path / "optimizer.safetensors")) == sorted(
        f"{i}.{name}" for i in range(4) for name in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_partial_latest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    cfg = CONFIGS["lion"]
    reference, _ = _run(cfg)
    ckpt = Checkpointing(tmp_path / "run", every_steps=5, keep_last=3)
    with pytest.raises(Stop):
        _run(cfg, ckpt, stop_after=17)
    latest = ckpt.directory / "step-00000015"
    if damage == "missing":
        (latest / "optimizer.safetensors").unlink()
    else:
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    (ckpt.directory / ".step-00000020.tmp-0123abcd").mkdir()  # what a kill mid-write leaves
    with pytest.warns(CheckpointWarning, match="step-00000015"):
        resumed, _ = _run(cfg, ckpt)
    _assert_same(reference, resumed)
    assert [s for s, _ in step_dirs(ckpt.directory)] == [15, 20, 21]
    assert not (ckpt.directory / ".step-00000020.tmp-0123abcd").exists()


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    ckpt = Checkpointing(tmp_path / "run", every_steps=5)
    with pytest.raises(Stop):
        _run(CONFIGS["sgd"], ckpt, stop_after=8)
    other = CONFIGS["sgd"].model_copy(update={"lr": 0.01})
    with pytest.raises(ArtifactError, match="another checkpoint directory"):
        _run(other, ckpt)


def test_a_finished_run_is_not_trained_again(tmp_path):
    ckpt = Checkpointing(tmp_path / "run", every_steps=100)
    first, history = _run(CONFIGS["sgd"], ckpt)
    again, again_history = _run(CONFIGS["sgd"], ckpt, stop_after=1)  # would raise Stop if it stepped
    _assert_same(first, again)
    assert again_history == history


def test_without_checkpointing_nothing_is_written(tmp_path):
    _run(CONFIGS["sgd"], Checkpointing(tmp_path / "off", every_steps=0))
    assert not (tmp_path / "off").exists()
