"""effective_rank: Liu et al., "How Connectivity Structure Shapes Rich and Lazy
Learning in Neural Circuits" (ICLR 2024).

W₀ = U Vᵀ with Gaussian U ∈ ℝ^{out×r}, V ∈ ℝ^{in·kh·kw×r}, rescaled to the Frobenius norm of a
Kaiming draw of the same shape (its expectation σ_kaiming·√numel, around which a draw's
norm concentrates) so that only the rank differs between settings. r is capped at
min(out, in·kh·kw); 'full' is that cap. ``entropy_rank`` is the effective rank of Roy &
Vetterli, "The Effective Rank: A Measure of Effective Dimensionality" (EUSIPCO 2007).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from tasks.train.inits.kaiming import kaiming_std


def effective_rank(w: Tensor, g: torch.Generator, rank: int | Literal["full"] = 4) -> Tensor:
    rows, cols = w.shape[0], math.prod(w.shape[1:])  # a kernel as (out, in·kh·kw)
    r = min(rows, cols) if rank == "full" else min(int(rank), rows, cols)
    u = torch.randn(rows, r, generator=g, dtype=torch.float64)  # (out, r)
    v = torch.randn(cols, r, generator=g, dtype=torch.float64)  # (in·kh·kw, r)
    m = u @ v.T  # (out, in·kh·kw), rank r almost surely
    target = kaiming_std(w) * math.sqrt(w.numel())  # E‖W_kaiming‖_F (to O(1/numel))
    return (m * (target / m.norm())).reshape(w.shape).to(w.dtype)


def entropy_rank(w: Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values (1 ≤ value ≤ rank)."""
    s = torch.linalg.svdvals(w.detach().double().reshape(w.shape[0], -1))
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())
