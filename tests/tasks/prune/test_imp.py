from itertools import pairwise

import pytest
import torch

from slimforge.models import MLPConfig, build_model
from slimforge.training import FitConfig, accuracy, fit
from tasks.prune.common import PruneContext
from tasks.prune.imp import (
    ImpConfig,
    iterative_magnitude_pruning,
    masked_trainer,
    prune_imp,
    rewind,
    rewind_state_after,
    round_sparsities,
    rounds_needed,
)
from tasks.prune.magnitude import prunable
from tasks.train.init import initialize
from tasks.train.inits.erk import random_mask


def _ctx(model, x, y, initial_model=None):
    return PruneContext(model, MLPConfig(hidden=[32]), (64,), 10, x, y, torch.Generator(),
                        initial_model=initial_model)


def _mlp(seed: int, hidden=(32,)):
    model = build_model(MLPConfig(hidden=list(hidden)), (64,), 10)
    initialize(model, "kaiming", torch.Generator().manual_seed(seed))
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rounds_needed_is_the_smallest_reaching_the_target():
    assert rounds_needed(0.8, 0.2) == 8  # 1 - 0.8^7 = 0.790, 1 - 0.8^8 = 0.832
    assert rounds_needed(0.36, 0.2) == 2  # exactly 1 - 0.8^2, despite float error
    sp = round_sparsities(ImpConfig(sparsity=0.8, rate=0.2))
    assert len(sp) == 8 and sp[-1] == 0.8 and all(a < b for a, b in pairwise(sp))


def test_too_many_rounds_is_refused():
    with pytest.raises(ValueError, match="rounds"):
        ImpConfig(sparsity=0.5, rate=0.2, rounds=5)  # 1 - 0.8^4 = 0.59 > 0.5 before the last round


def test_rounds_prune_exact_counts_nested_and_rewind_exactly():
    """Stub training perturbs the weights so each round's magnitudes differ."""
    model = _mlp(1, hidden=(24, 16))
    theta = _state(_mlp(2, hidden=(24, 16)))  # a checkpoint different from the trained model
    n = sum(w.numel() for w in prunable(model).values())
    g = torch.Generator().manual_seed(3)
    seen = []

    def train_round(m, masks):
        seen.append(({k: v.clone() for k, v in masks.items()}, _state(m)))
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.add_(torch.randn(p.shape, generator=g))
                if name in masks:
                    p.mul_(masks[name])
        seen[-1] += (_state(m),)

    cfg = ImpConfig(sparsity=0.7, rate=0.25)
    result = iterative_magnitude_pruning(model, theta, train_round, cfg)
    assert len(seen) == 5  # 1 - 0.75^4 = 0.684 < 0.7 <= 1 - 0.75^5
    for r, (masks, rewound, _) in enumerate(seen, start=1):
        kept = sum(int(m.sum()) for m in masks.values())
        target = 0.7 if r == len(seen) else 1 - 0.75**r
        assert kept == round((1 - target) * n)
        for name, value in theta.items():
            if name in masks:
                assert torch.equal(rewound[name][masks[name]], value[masks[name]])
                assert (rewound[name][~masks[name]] == 0).all()
            else:
                assert torch.equal(rewound[name], value)  # biases rewound too
    for (prev, _, trained), (cur, _, _) in pairwise(seen):
        for name in cur:
            assert not (cur[name] & ~prev[name]).any()  # nested
        kept_abs = torch.cat([trained[k][cur[k]].abs() for k in cur])
        dropped_abs = torch.cat([trained[k][prev[k] & ~cur[k]].abs() for k in cur])
        assert kept_abs.min() >= dropped_abs.max()  # global magnitude among survivors
    assert result.history[-1]["sparsity"] == 1 - round(0.3 * n) / n
    assert torch.equal(result.masks["head.weight"], seen[-1][0]["head.weight"])


def test_rewind_state_lies_on_the_base_trajectory(digits_split):
    xtr, ytr, _, _ = digits_split
    cfg = FitConfig(epochs=1, batch_size=100, lr=1e-2)
    init = _mlp(0)
    before = _state(init)
    assert all(torch.equal(v, before[k]) for k, v in rewind_state_after(init, xtr, ytr, cfg, 0,
                                                                        torch.Generator()).items())
    theta5 = rewind_state_after(init, xtr, ytr, cfg, 5, torch.Generator().manual_seed(7))
    assert all(torch.equal(v, before[k]) for k, v in _state(init).items())  # init untouched
    base, snaps = _mlp(0), []
    fit(base, xtr, ytr, cfg, torch.Generator().manual_seed(7), after_step=lambda m: snaps.append(_state(m)))
    assert all(torch.equal(theta5[k], snaps[4][k]) for k in theta5)
    with pytest.raises(ValueError, match="rewind_steps"):
        rewind_state_after(init, xtr, ytr, cfg, 13, torch.Generator())  # 1 epoch = 12 steps


def test_masked_trainer_keeps_pruned_weights_zero(digits_split):
    xtr, ytr, _, _ = digits_split
    model = _mlp(0)
    masks = {n: random_mask(tuple(w.shape), w.numel() // 4, torch.Generator().manual_seed(1))
             for n, w in prunable(model).items()}
    masked_trainer(xtr, ytr, FitConfig(epochs=1, batch_size=100, optimizer="sgd", lr=0.1), 0)(model, masks)
    for name, w in prunable(model).items():
        assert (w[~masks[name]] == 0).all()
        assert (w[masks[name]] != 0).float().mean() > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ticket_beats_random_mask_at_equal_layer_sparsity(digits_split, seed):
    xtr, ytr, xte, yte = digits_split
    fc = FitConfig(epochs=4, batch_size=64, lr=1e-2)
    model = _mlp(seed)
    theta = rewind_state_after(model, xtr, ytr, fc, 0, torch.Generator())
    fit(model, xtr, ytr, fc, torch.Generator().manual_seed(100 + seed))
    result = iterative_magnitude_pruning(model, theta, masked_trainer(xtr, ytr, fc, seed),
                                         ImpConfig(sparsity=0.8, rate=0.4, training=fc, seed=seed))
    assert len(result.history) == 4 and abs(result.history[-1]["sparsity"] - 0.8) < 1e-3
    ticket = accuracy(model, xte, yte)
    g = torch.Generator().manual_seed(1000 + seed)
    rmasks = {n: random_mask(tuple(m.shape), int(m.sum()), g) for n, m in result.masks.items()}
    rewind(model, theta, rmasks)
    masked_trainer(xtr, ytr, fc, seed)(model, rmasks)
    assert ticket >= accuracy(model, xte, yte)


def test_registry_entry_returns_an_exact_ticket(digits_split):
    xtr, ytr, _, _ = digits_split
    fc = FitConfig(epochs=1, batch_size=100, lr=1e-2)
    model = _mlp(0)
    fit(model, xtr, ytr, fc, torch.Generator().manual_seed(0))
    ctx = _ctx(model, xtr, ytr, initial_model=lambda: (_mlp(0), torch.Generator().manual_seed(0)))
    out = prune_imp(ctx, ImpConfig(sparsity=0.5, rate=0.3, rewind_steps=3, training=fc))
    n = sum(m.numel() for m in out.masks.values())
    assert sum(int(m.sum()) for m in out.masks.values()) == round(0.5 * n)
    assert out.report == {"imp_rounds": 2, "imp_rewind_steps": 3}
    for name, w in prunable(out.model).items():
        assert (w[~out.masks[name]] == 0).all()
    with pytest.raises(ValueError, match="initialisation"):
        prune_imp(_ctx(model, xtr, ytr), ImpConfig())
