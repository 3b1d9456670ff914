"""The Lion optimizer and the learning-rate schedules of the training loop.

Lion: Chen et al., "Symbolic Discovery of Optimization Algorithms" (NeurIPS 2023), Alg. 2:
    c = β1·m + (1 − β1)·g              the update direction interpolates momentum and gradient
    x ← x − η·(sign(c) + λ·x)          every coordinate moves by η·|sign(c) + λx|
    m ← β2·m + (1 − β2)·g              the momentum is tracked with the other β
With decoupled weight decay λ and ηλ ≤ 1, Lion keeps ‖x‖∞ ≤ 1/λ once inside that box and
shrinks any excess |x| − 1/λ by a factor ≤ 1 − ηλ per step (Chen, Liu, Liang & Liu, "Lion
Secretly Solves Constrained Optimization: As Lyapunov Predicts", 2023): it solves
min f(x) s.t. ‖x‖∞ ≤ 1/λ. Paper defaults β = (0.9, 0.99); lr 3–10× below and weight decay
3–10× above AdamW's (e.g. lr 3e-4, wd 0.1).

Schedules (a multiplier of the peak lr per optimizer step): ``linear_decay`` to exactly 0
("Straight to Zero: Why Linearly Decaying the Learning Rate to Zero Works Best", Bergsma et
al. 2025; Defazio et al., "When, Why and How Much? Adaptive Learning Rate Scheduling by
Refinement", 2023), ``cosine`` (Loshchilov & Hutter, "SGDR", ICLR 2017) and ``constant``,
each after an optional linear warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class Lion(torch.optim.Optimizer):
    """Lion: sign of an interpolated momentum, with decoupled weight decay.

    State per parameter: ``exp_avg`` (m), same shape and dtype as the parameter.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                c = m.mul(beta1).add_(g, alpha=1 - beta1)  # update direction, p's shape
                p.sub_(c.sign_().add_(p, alpha=wd), alpha=lr)  # x − η(sign(c) + λx)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss


def _linear(i: int, n: int) -> float:
    return 1.0 - i / n


def _cosine(i: int, n: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * i / n))


def _constant(i: int, n: int) -> float:
    return 1.0


# schedule name (FitConfig.schedule) -> multiplier after i of the n post-warm-up steps
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "linear_decay": _linear,
    "cosine": _cosine,
    "constant": _constant,
}


def lr_factor(schedule: str, step: int, total: int, warmup_steps: int = 0) -> float:
    """Multiplier of the peak lr used by optimizer step ``step`` (0-based) of ``total``.

    ``step == total`` is the end of training: linear decay is exactly 0 there. A warm-up of
    W steps runs steps 0..W−1 at (t + 1)/W of the peak, so it rises linearly from 0 and its
    last step runs at exactly the peak; the decay then starts from that step. W ∈ {0, 1}
    means no warm-up.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps <= total:
        raise ValueError(f"warmup_steps {warmup_steps} must lie in [0, {total}], the total optimizer steps")
    peak = max(warmup_steps - 1, 0)  # the first step at the peak lr
    if step < peak:
        return (step + 1) / warmup_steps
    return SCHEDULES[schedule](step - peak, total - peak)
