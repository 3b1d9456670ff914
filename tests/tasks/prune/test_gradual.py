import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from slimforge.models import MLPConfig, build_model
from slimforge.training import FitConfig, MaskHold, accuracy, fit
from tasks.prune.common import PruneContext
from tasks.prune.gradual import (
    GradualConfig,
    prune_and_regrow,
    prune_gradual,
    regrow_rate,
    sparsity_schedule,
    train_gradually,
)
from tasks.prune.magnitude import prunable
from tasks.train.init import initialize
from tasks.train.inits.erk import erk_masks, random_mask


def _ctx(model, x, y, initial_model=None):
    return PruneContext(model, MLPConfig(hidden=[64]), (64,), 10, x, y, torch.Generator(),
                        initial_model=initial_model)


def _mlp(seed: int, hidden=(64,)):
    model = build_model(MLPConfig(hidden=list(hidden)), (64,), 10)
    initialize(model, "kaiming", torch.Generator().manual_seed(seed))
    return model


def _random_masks(model, density, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: random_mask(tuple(w.shape), round(density * w.numel()), g) for n, w in prunable(model).items()}


def test_schedule_endpoints_midpoint_and_monotone():
    s_i, s_f, t0, n, dT = 0.1, 0.9, 50, 8, 25
    assert sparsity_schedule(t0, t0, n, dT, s_i, s_f) == s_i
    assert sparsity_schedule(0, t0, n, dT, s_i, s_f) == s_i
    assert sparsity_schedule(t0 + n * dT, t0, n, dT, s_i, s_f) == s_f
    assert sparsity_schedule(10**6, t0, n, dT, s_i, s_f) == s_f
    assert sparsity_schedule(t0 + n * dT / 2, t0, n, dT, s_i, s_f) == pytest.approx(s_f + (s_i - s_f) / 8)
    values = [sparsity_schedule(t, t0, n, dT, s_i, s_f) for t in range(400)]
    assert all(a <= b for a, b in pairwise(values))
    assert regrow_rate(0, 8, 0.5) == 0.5 and regrow_rate(8, 8, 0.5) == pytest.approx(0, abs=1e-15)


def test_prune_and_regrow_keeps_counts_and_grows_largest_gradients_at_zero():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
    masks = _random_masks(model, 0.4, 1)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        w = params[name]
        with torch.no_grad():
            w.mul_(m)
        # inactive weights get |grad| in [10, 11), active ones in [0, 1): no dropped weight is regrown
        w.grad = torch.where(m, torch.rand(w.shape, generator=g), 10 + torch.rand(w.shape, generator=g))
    before = {n: params[n].detach().clone() for n in masks}
    new = prune_and_regrow(model, masks, 0.3)
    for name, old in masks.items():
        w, grad = params[name], params[name].grad
        k = math.ceil(0.3 * int(old.sum()))
        assert int(new[name].sum()) == int(old.sum())
        grown, dropped = new[name] & ~old, old & ~new[name]
        assert int(grown.sum()) == k and int(dropped.sum()) == k
        assert (w[grown] == 0).all() and (w[dropped] == 0).all()
        assert torch.equal(w[old & new[name]], before[name][old & new[name]])
        assert before[name][dropped].abs().max() <= before[name][old & new[name]].abs().min()
        assert grad[grown].abs().min() >= grad[~old & ~new[name]].abs().max()


def test_prune_and_regrow_on_a_dense_layer_changes_nothing():
    """Only the just-dropped weights are inactive, so they are all regrown with their values."""
    model = nn.Sequential(nn.Linear(12, 8))
    model[0].weight.grad = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    before = model[0].weight.detach().clone()
    new = prune_and_regrow(model, {"0.weight": torch.ones(8, 12, dtype=torch.bool)}, 0.5)
    assert new["0.weight"].all() and torch.equal(model[0].weight, before)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_weights_and_optimizer_state_stay_zero_after_every_step(optimizer):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 30, generator=g), torch.randint(0, 10, (64,), generator=g)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
    cfg = FitConfig(optimizer=optimizer, lr=0.05, momentum=0.9, epochs=1, batch_size=16)
    fit(model, x, y, cfg, g, label="dense")  # dense steps: every weight moves
    masks = _random_masks(model, 0.3, 2)
    params = dict(model.named_parameters())
    hold = MaskHold(model, masks)
    seen = []

    def check(_: nn.Module) -> None:  # after_step runs after the hold has applied
        for name, m in masks.items():
            assert (params[name][~m] == 0).all()
            assert (params[name][m] != 0).all()
            states = [v for v in hold.optimizer.state[params[name]].values() if v.shape == m.shape]
            assert states and all((v[~m] == 0).all() for v in states)  # momentum / Adam moments too
        seen.append(1)

    fit(model, x, y, cfg, g, hold=hold, after_step=check, label="held")
    assert len(seen) == 4


def test_gmp_reaches_exact_sparsity_on_schedule_and_stays_near_dense(digits_split):
    xtr, ytr, xte, yte = digits_split
    fc = FitConfig(epochs=10, batch_size=64, lr=1e-2)  # 19 steps per epoch
    dense = _mlp(0)
    fit(dense, xtr, ytr, fc, torch.Generator().manual_seed(1))
    model = _mlp(0)
    cfg = GradualConfig(method="gmp", final_sparsity=0.8, prune_every=10, start_epoch=0, end_epoch=7, training=fc)
    result = train_gradually(model, xtr, ytr, cfg, torch.Generator().manual_seed(1))
    n_w = sum(w.numel() for w in prunable(model).values())
    steps = [h["step"] for h in result.history]
    assert steps == list(range(0, 140, 10))  # window 133 steps -> n = 13 pruning steps after t0
    for h in result.history:
        assert h["sparsity"] == 1 - round((1 - h["target_sparsity"]) * n_w) / n_w
    assert result.history[-1]["target_sparsity"] == 0.8
    assert sum(int(m.sum()) for m in result.masks.values()) == round(0.2 * n_w)
    for name, w in prunable(model).items():
        assert (w[~result.masks[name]] == 0).all()
    assert accuracy(model, xte, yte) >= accuracy(dense, xte, yte) - 0.04


def test_granet_sparse_start_regrows_and_ends_exact(digits_split):
    xtr, ytr, xte, yte = digits_split
    fc = FitConfig(epochs=4, batch_size=64, lr=1e-2)
    common = {"final_sparsity": 0.8, "initial_density": 0.5, "prune_every": 10, "start_epoch": 1, "end_epoch": 3,
              "training": fc}
    runs = {}
    for method in ("gmp", "granet"):
        model = _mlp(0)
        runs[method] = (model, train_gradually(model, xtr, ytr, GradualConfig(method=method, **common),
                                               torch.Generator().manual_seed(1)))
    n_w = sum(w.numel() for w in prunable(runs["gmp"][0]).values())
    # the ERK mask train_gradually draws first from generator(1)
    initial = erk_masks({n: tuple(w.shape) for n, w in prunable(runs["gmp"][0]).items()}, 0.5,
                        torch.Generator().manual_seed(1))
    for method, (model, result) in runs.items():
        assert sum(int(m.sum()) for m in result.masks.values()) == round(0.2 * n_w)
        assert result.history[0]["step"] == 19 and result.history[0]["target_sparsity"] == pytest.approx(0.5)
        for name, w in prunable(model).items():
            assert (w[~result.masks[name]] == 0).all()
        outside = sum(int((m & ~initial[n]).sum()) for n, m in result.masks.items())
        assert (outside == 0) == (method == "gmp")  # only regeneration reactivates weights
    rhos = [h["rho"] for h in runs["granet"][1].history]
    assert rhos[0] == 0.5 and rhos[-1] == 0 and all(a >= b for a, b in pairwise(rhos))
    assert accuracy(runs["granet"][0], xte, yte) > 0.8


def test_bad_windows_are_refused(digits_split):
    xtr, ytr, _, _ = digits_split
    with pytest.raises(ValueError, match="end_epoch"):
        GradualConfig(start_epoch=3, end_epoch=3)
    with pytest.raises(ValueError, match="final_sparsity"):
        GradualConfig(final_sparsity=0.4, initial_density=0.5)
    cfg = GradualConfig(prune_every=1000, end_epoch=2, training=FitConfig(epochs=2, batch_size=64))
    with pytest.raises(ValueError, match="prune_every"):
        train_gradually(_mlp(0), xtr, ytr, cfg, torch.Generator())


def test_registry_entry_trains_from_init_or_the_trained_base(digits_split):
    xtr, ytr, _, _ = digits_split
    fc = FitConfig(epochs=2, batch_size=100, lr=1e-2)  # 12 steps per epoch
    trained = _mlp(0)
    ctx = _ctx(trained, xtr, ytr, initial_model=lambda: (_mlp(5), torch.Generator()))
    cfg = GradualConfig(method="granet", final_sparsity=0.6, prune_every=4, end_epoch=1, training=fc)
    out = prune_gradual(ctx, cfg)
    assert out.model is not trained and out.report["pruning_steps"] == 4  # steps 0, 4, 8, 12
    n = sum(m.numel() for m in out.masks.values())
    assert sum(int(m.sum()) for m in out.masks.values()) == round(0.4 * n)
    assert prune_gradual(ctx, cfg.model_copy(update={"start": "trained"})).model is trained
    with pytest.raises(ValueError, match="start: trained"):
        prune_gradual(_ctx(trained, xtr, ytr), cfg)
