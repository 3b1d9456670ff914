"""generalized_gaussian: "It Takes a Good Model to Train a Good Model: Generalized Gaussian
Priors for Optimized LLMs".

Weights follow p(w) ∝ exp(-|w/α|^β). Sampling: if G ~ Gamma(1/β, 1) then G^(1/β) has density
∝ exp(-x^β) on x > 0, so w = α·sign·G^(1/β) with a fair random sign. E[w²] =
α²·Γ(3/β)/Γ(1/β), hence α = σ_kaiming·√(Γ(1/β)/Γ(3/β)) gives Kaiming's variance.
β = 2 is a Gaussian, β = 1 a Laplace. Excess kurtosis Γ(5/β)Γ(1/β)/Γ(3/β)² − 3.

torch's Gamma sampler takes no generator in its public API, so Gamma(k, 1) is drawn here
with Marsaglia & Tsang, "A Simple Method for Generating Gamma Variables" (ACM TOMS 2000),
vectorised, from the generator passed in; for k < 1 their boost Gamma(k) = Gamma(k+1)·U^(1/k).
``fit_beta`` estimates β from weights by the moment ratio E|w|/√E[w²] =
Γ(2/β)/√(Γ(1/β)Γ(3/β)) (Mallat 1989), e.g. per layer of a trained reference model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tasks.train.inits.kaiming import kaiming_std

_F64 = torch.float64


def sample_gamma(n: int, k: float, g: torch.Generator) -> Tensor:
    """n draws of Gamma(shape k, scale 1), float64, exact (rejection sampling)."""
    if k < 1.0:
        boost = (1.0 - torch.rand(n, generator=g, dtype=_F64)).pow(1.0 / k)  # U in (0, 1]
        return sample_gamma(n, k + 1.0, g) * boost
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=_F64)
    pending = torch.arange(n)
    while pending.numel():  # each round accepts > 95% of the pending draws
        x = torch.randn(pending.numel(), generator=g, dtype=_F64)
        u = 1.0 - torch.rand(pending.numel(), generator=g, dtype=_F64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[pending[ok]] = d * v[ok]
        pending = pending[~ok]
    return out


def gg_scale(w: Tensor, beta: float) -> float:
    """α with E[w²] equal to Kaiming's σ² for this weight's fan-in."""
    return kaiming_std(w) * math.exp(0.5 * (math.lgamma(1.0 / beta) - math.lgamma(3.0 / beta)))


def generalized_gaussian(w: Tensor, g: torch.Generator, beta: float = 1.0) -> Tensor:
    n = w.numel()
    magnitude = sample_gamma(n, 1.0 / beta, g).pow(1.0 / beta)  # (n,), density ∝ exp(-x^β)
    sign = torch.randint(0, 2, (n,), generator=g, dtype=_F64) * 2.0 - 1.0
    return (gg_scale(w, beta) * sign * magnitude).reshape(w.shape).to(w.dtype)


def excess_kurtosis(beta: float) -> float:
    """Γ(5/β)Γ(1/β)/Γ(3/β)² − 3: 3 for the Laplace, 0 for the Gaussian."""
    lg = math.lgamma
    return math.exp(lg(5.0 / beta) + lg(1.0 / beta) - 2.0 * lg(3.0 / beta)) - 3.0


def _moment_ratio(beta: float) -> float:
    lg = math.lgamma
    return math.exp(lg(2.0 / beta) - 0.5 * (lg(1.0 / beta) + lg(3.0 / beta)))


def fit_beta(w: Tensor, lo: float = 0.05, hi: float = 20.0) -> float:
    """β whose moment ratio E|w|/√E[w²] matches the sample's (the ratio rises with β)."""
    w = w.detach().double().flatten()
    target = (w.abs().mean() / w.pow(2).mean().sqrt()).item()
    for _ in range(100):  # bisection on log β
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _moment_ratio(mid) < target else (lo, mid)
    return math.sqrt(lo * hi)
