import math

import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_digits

from slimforge.models import MLPConfig, build_model
from tasks.select import METHODS
from tasks.select.experts import ExpertConfig
from tasks.select.selection import SelectContext
from tasks.select.trajectory_matching import (
    FlatModel,
    TrajectoryMatchingConfig,
    balance_factor,
    perturb,
    segment_targets,
    select_trajectory_matching,
    unroll_and_match,
)
from tasks.train.init import initialize


def _digits(dtype=torch.float32):
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=dtype), torch.tensor(d.target)


def _make(gen, dtype=torch.float32):
    model = build_model(MLPConfig(hidden=[12]), (64,), 10)
    initialize(model, "kaiming", gen)
    return model.to(dtype)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _setup(dtype=torch.float64):
    """A tiny MLP, a start and a target 'expert' point, 10 synthetic images (one per class)."""
    x, y = _digits(dtype)
    g = torch.Generator().manual_seed(0)
    net = FlatModel(_make(g, dtype))
    start, target = _flat(_make(g, dtype)), _flat(_make(g, dtype))
    idx = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    return net, start, target, x[idx].clone(), y[idx].clone()


def test_no_student_steps_gives_loss_exactly_one():
    net, start, target, syn, labels = _setup(torch.float32)
    lr = torch.tensor(0.01)
    loss = unroll_and_match(net, start, {0: target}, syn, labels, lr, torch.Generator().manual_seed(0))
    assert loss.item() == 1.0
    shaken = perturb(start, net.sizes, 1.0, torch.Generator().manual_seed(1))
    assert not torch.equal(shaken, start)
    assert unroll_and_match(net, shaken, {0: target}, syn, labels, lr, torch.Generator()).item() == 1.0


def test_gradient_reaches_pixels_through_every_unrolled_step():
    net, start, target, syn, labels = _setup(torch.float64)
    steps, batch, seed = 4, 5, 7  # two chunks per permutation

    def loss_of(images, lr):
        return unroll_and_match(net, start, {steps: target}, images, labels, lr,
                                torch.Generator().manual_seed(seed), batch=batch, momentum=0.5)

    first_chunk = torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:batch]
    image, pixel = int(first_chunk[0]), 37  # used in step 0: its effect has to cross steps 1..3
    syn_var = syn.clone().requires_grad_(True)
    lr_var = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss_of(syn_var, lr_var).backward()
    eps = 1e-6
    plus, minus = syn.clone(), syn.clone()
    plus[image, pixel] += eps
    minus[image, pixel] -= eps
    lr0 = torch.tensor(0.3, dtype=torch.float64)
    fd = (loss_of(plus, lr0) - loss_of(minus, lr0)).item() / (2 * eps)
    auto = syn_var.grad[image, pixel].item()
    assert abs(auto) > 1e-6
    assert math.isclose(auto, fd, rel_tol=1e-5), f"autograd {auto:.8e} vs finite difference {fd:.8e}"
    fd_lr = (loss_of(syn, lr0 + eps) - loss_of(syn, lr0 - eps)).item() / (2 * eps)
    assert math.isclose(lr_var.grad.item(), fd_lr, rel_tol=1e-5)


def test_intermediate_targets_and_balance_factor():
    trajectory = torch.arange(8.0).unsqueeze(1).repeat(1, 3)  # (T+1, P): epoch e holds e
    cfg = TrajectoryMatchingConfig(syn_steps=20, expert_epochs=3, max_start_epoch=2,
                                   intermediate_matching=True, experts=ExpertConfig(train_epochs=7))
    targets = segment_targets(trajectory, 2, cfg)
    assert sorted(targets) == [6, 12, 20]
    assert [targets[k][0].item() for k in (6, 12, 20)] == [3.0, 4.0, 5.0]
    plain = segment_targets(trajectory, 2, cfg.model_copy(update={"intermediate_matching": False}))
    assert list(plain) == [20] and plain[20][0].item() == 5.0
    factors = [balance_factor(t, 10) for t in range(11)]
    assert all(f < 1 for f in factors[:5]) and all(f > 1 for f in factors[5:])
    assert factors == sorted(factors)


def test_perturbation_is_relative_to_each_weight():
    g = torch.Generator().manual_seed(0)
    flat = torch.tensor([0.0, 2.0, -1.0, 0.0, 3.0])
    out = perturb(flat, [2, 3], 1.0, g)
    assert out[0] == 0 and out[3] == 0  # zeros stay zero: the noise multiplies the weight
    assert torch.all((out - flat).abs() <= flat.abs() + 1e-7)  # |d_i| / ‖d‖ ≤ 1 per tensor
    assert not torch.equal(out, flat)
    assert torch.equal(perturb(flat, [2, 3], 0.0, g), flat)


def _context(seed: int) -> SelectContext:
    x, y = _digits()
    return SelectContext(x=x[:400], y=y[:400], num_classes=10, make_model=_make, epochs=1,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{}, {"init": "representative", "balanced_inner_loss": True,
                                          "intermediate_matching": True, "weight_perturbation": 1.0,
                                          "inner_momentum": 0.9, "syn_batch": 7,
                                          "experts": ExpertConfig(count=2, train_epochs=3, batch_size=128,
                                                                  regularization=True)}])
def test_method_is_bit_identical_for_the_same_seed(options):
    base = {"ipc": 2, "iterations": 4, "syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 1,
            "lr_img": 1.0, "experts": ExpertConfig(count=2, train_epochs=3, batch_size=128)}
    cfg = TrajectoryMatchingConfig(**(base | options))
    a, b, c = (select_trajectory_matching(_context(s), cfg) for s in (0, 0, 1))
    assert a.images.shape == (20, 64) and a.labels.tolist() == [k for k in range(10) for _ in range(2)]
    assert torch.equal(a.images, b.images) and a.history == b.history
    assert not torch.equal(a.images, c.images)
    assert all(math.isfinite(v) for v in a.history) and len(a.history) == 4


def test_divergence_is_reported_with_the_setting_to_change():
    cfg = TrajectoryMatchingConfig(ipc=1, iterations=5, syn_steps=3, expert_epochs=1, max_start_epoch=1,
                                   lr_img=1e12, experts=ExpertConfig(count=1, train_epochs=2, batch_size=128))
    with pytest.raises(FloatingPointError, match="lower select.lr_img"):
        select_trajectory_matching(_context(0), cfg)


def test_config_checks_and_registry():
    assert METHODS["trajectory_matching"].config is TrajectoryMatchingConfig
    with pytest.raises(ValidationError, match="exceeds experts.train_epochs"):
        TrajectoryMatchingConfig(max_start_epoch=9, expert_epochs=2, experts=ExpertConfig(train_epochs=10))
    with pytest.raises(ValidationError, match="intermediate_matching"):
        TrajectoryMatchingConfig(syn_steps=1, expert_epochs=2, intermediate_matching=True)
    with pytest.raises(ValidationError):
        TrajectoryMatchingConfig(lr_imgg=1.0)
