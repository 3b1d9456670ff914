"""fit(): today's results without checkpoints, every optimizer, the lr each step really uses."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.optim.optimizer import register_optimizer_step_pre_hook

from slimforge.data import batches
from slimforge.models import CNNConfig, MLPConfig, build_model
from slimforge.training import FitConfig, accuracy, fit, make_optimizer

SHAPE = (1, 8, 8)


def _data(n: int = 120, seed: int = 0):
    """Ten learnable classes: x (n, 1, 8, 8) = a class template + noise, y (n,)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, *SHAPE, generator=g)
    y = torch.arange(n) % 10
    return templates[y] + 0.5 * torch.randn(n, *SHAPE, generator=g), y


def _model(cfg=None, seed: int = 0):
    cfg = cfg or MLPConfig(hidden=[32])
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the test's own model; library code never seeds
        return build_model(cfg, SHAPE, 10)


def _reference_fit(model, x, y, cfg, g):
    """The loop as it was before checkpoints (LambdaLR, lazily drawn permutations)."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    total = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    factor = {"linear_decay": lambda s: 1.0 - s / total,
              "cosine": lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)),
              "constant": lambda s: 1.0}[cfg.schedule]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    history = []
    model.train()
    for _ in range(cfg.epochs):
        running = 0.0
        for idx in batches(len(x), cfg.batch_size, g):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        history.append(running / len(x))
    return history


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("schedule", ["linear_decay", "cosine", "constant"])
def test_without_checkpoints_fit_gives_the_old_loop_bit_for_bit(optimizer, schedule):
    x, y = _data()
    cfg = FitConfig(optimizer=optimizer, schedule=schedule, lr=0.02, epochs=3, batch_size=16)
    a, b = _model(CNNConfig(channels=[4, 8], hidden=16)), _model(CNNConfig(channels=[4, 8], hidden=16))
    ha = fit(a, x, y, cfg, torch.Generator().manual_seed(1), label="t")
    hb = _reference_fit(b, x, y, cfg, torch.Generator().manual_seed(1))
    assert ha == hb
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.05, 5e-4), ("adamw", 3e-3, 1e-2), ("lion", 1e-3, 0.1)])
def test_every_optimizer_learns(optimizer, lr, wd):
    x, y = _data(200)
    model = _model()
    history = fit(model, x, y, FitConfig(optimizer=optimizer, lr=lr, weight_decay=wd, epochs=10, batch_size=20),
                  torch.Generator().manual_seed(0), label="t")
    assert history[-1] < 0.5 * history[0]
    assert accuracy(model, x, y) > 0.9


def _lrs_used(cfg: FitConfig, n: int = 40) -> list[float]:
    """The lr of every optimizer step fit takes."""
    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        fit(_model(), *_data(n), cfg, torch.Generator().manual_seed(0), label="t")
    finally:
        handle.remove()
    return seen


def test_fit_follows_warmup_then_linear_decay():
    cfg = FitConfig(lr=0.1, epochs=5, batch_size=10, warmup_steps=4)  # 20 steps
    lrs = _lrs_used(cfg)
    assert len(lrs) == 20
    assert lrs[:4] == [0.1 * k / 4 for k in (1, 2, 3, 4)]  # peak exactly at the last warm-up step
    assert lrs[3] == 0.1
    assert all(a > b for a, b in itertools.pairwise(lrs[3:]))
    assert lrs[-1] == pytest.approx(0.1 / 17)  # one step before the decay reaches 0


def test_fit_refuses_a_warmup_longer_than_the_run():
    with pytest.raises(ValueError, match="warmup_steps 21"):
        _lrs_used(FitConfig(epochs=5, batch_size=10, warmup_steps=21))


def test_fit_config_lists_the_optimizers():
    assert FitConfig(optimizer="lion").optimizer == "lion"
    with pytest.raises(ValidationError, match="'sgd', 'adamw' or 'lion'"):
        FitConfig(optimizer="adam")
    assert FitConfig().checkpoint_every == 0 and FitConfig().warmup_steps == 0
