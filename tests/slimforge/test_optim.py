"""Lion's box invariance and exact step size; AdamW's decoupled decay; the lr schedules."""

from __future__ import annotations

import pytest
import torch

from slimforge.optim import SCHEDULES, Lion, lr_factor

LAM, ETA = 5.0, 0.01  # weight decay λ and lr η of the box tests: ηλ = 0.05 ≤ 1


def _param(values: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(values.double().clone())


def _random_grad_steps(p, opt, steps: int, g: torch.Generator, scale: float = 1.0):
    """Yield (x before, x after, c) for ``steps`` Lion steps on random gradients."""
    beta1, _ = opt.param_groups[0]["betas"]
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
        m = opt.state[p].get("exp_avg", torch.zeros_like(p)).clone()
        c = beta1 * m + (1 - beta1) * p.grad
        before = p.detach().clone()
        opt.step()
        yield before, p.detach().clone(), c


def test_lion_stays_in_the_box_for_any_gradient():
    g = torch.Generator().manual_seed(0)
    p = _param((torch.rand(256, generator=g) * 2 - 1) / LAM)  # ‖x‖∞ ≤ 1/λ
    opt = Lion([p], lr=ETA, weight_decay=LAM)
    for _, after, _ in _random_grad_steps(p, opt, 1000, g, scale=10.0):
        assert after.abs().max().item() <= 1 / LAM + 1e-15


def test_lion_shrinks_the_excess_outside_the_box():
    g = torch.Generator().manual_seed(1)
    p = _param(torch.randn(256, generator=g) * 3)  # mostly far outside ±1/λ = ±0.2
    opt = Lion([p], lr=ETA, weight_decay=LAM)
    for before, after, _ in _random_grad_steps(p, opt, 200, g):
        excess_before = (before.abs() - 1 / LAM).clamp(min=0)
        excess_after = (after.abs() - 1 / LAM).clamp(min=0)
        assert (excess_after <= (1 - ETA * LAM) * excess_before + 1e-12).all()


def test_lion_moves_each_coordinate_by_eta_times_sign_plus_decay():
    g = torch.Generator().manual_seed(2)
    p = _param(torch.randn(64, generator=g))
    opt = Lion([p], lr=ETA, weight_decay=0.3)
    for before, after, c in _random_grad_steps(p, opt, 20, g):
        expected = ETA * (torch.sign(c) + 0.3 * before).abs()
        torch.testing.assert_close((after - before).abs(), expected, rtol=1e-12, atol=1e-15)


def test_lion_interpolates_with_beta1_and_tracks_momentum_with_beta2():
    p = _param(torch.zeros(3))
    opt = Lion([p], lr=1.0, betas=(0.5, 0.9))
    p.grad = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * p.grad)
    # m = 0.1·(1, −2, 0); c₀ = 0.5·0.1 + 0.5·(−0.05) > 0 although the gradient is negative
    p.grad = torch.tensor([-0.05, 0.0, 0.0], dtype=torch.float64)
    before = p.detach().clone()
    opt.step()
    assert (before - p.detach())[0].item() == 1.0  # sign(c₀) = +1: moves down


def test_lion_rejects_bad_settings():
    with pytest.raises(ValueError, match="betas"):
        Lion([_param(torch.zeros(1))], lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Lion([_param(torch.zeros(1))], lr=0.0)


def test_adamw_with_zero_gradient_scales_weights_by_exactly_one_minus_eta_lambda():
    lr, wd = 1e-2, 0.1
    p = torch.nn.Parameter(torch.randn(100, generator=torch.Generator().manual_seed(3)))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd)
    for _ in range(10):
        expected = p.detach() * (1 - lr * wd)
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p.detach(), expected)


def test_adam_with_l2_does_not_scale_weights():
    lr, wd = 1e-2, 0.1
    p = torch.nn.Parameter(torch.randn(100, generator=torch.Generator().manual_seed(3)))
    opt = torch.optim.Adam([p], lr=lr, weight_decay=wd)
    expected = p.detach() * (1 - lr * wd)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert (p.detach() - expected).abs().max().item() > 1e-3  # ≈ lr·sign(w): normalised away


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_linear_decay_ends_at_exactly_zero(warmup):
    total = 100
    assert lr_factor("linear_decay", total, total, warmup) == 0.0
    factors = [lr_factor("linear_decay", t, total, warmup) for t in range(total + 1)]
    assert all(a >= b for a, b in zip(factors[max(warmup - 1, 0):], factors[max(warmup, 1):]))
    assert factors[total - 1] > 0  # the last step still learns


def test_warmup_rises_linearly_from_zero_and_reaches_the_peak_at_its_last_step():
    total, warmup = 50, 8
    for name in SCHEDULES:
        factors = [lr_factor(name, t, total, warmup) for t in range(warmup)]
        assert factors == [(t + 1) / warmup for t in range(warmup)]
        assert factors[-1] == 1.0
        assert lr_factor(name, warmup, total, warmup) < 1.0 or name == "constant"


def test_no_warmup_starts_at_the_peak():
    for name in SCHEDULES:
        assert lr_factor(name, 0, 10) == 1.0 == lr_factor(name, 0, 10, warmup_steps=1)


def test_cosine_halfway_is_half_the_peak_and_ends_at_zero():
    assert lr_factor("cosine", 50, 100) == 0.5
    assert lr_factor("cosine", 100, 100) == 0.0
    # with warm-up the decay starts at the peak step 10 and runs to the end, step 110
    assert lr_factor("cosine", 10 + 50, 110, warmup_steps=11) == 0.5


def test_constant_schedule_and_errors():
    assert {lr_factor("constant", t, 20, 4) for t in range(3, 21)} == {1.0}
    with pytest.raises(ValueError, match="linear_decay, cosine, constant"):
        lr_factor("step", 0, 10)
    with pytest.raises(ValueError, match="warmup_steps 11"):
        lr_factor("linear_decay", 0, 10, 11)
