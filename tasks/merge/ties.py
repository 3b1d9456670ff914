"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023), §3:
1. Trim: keep the top-k% entries of each task vector by magnitude, zero the rest.
2. Elect: γ = sgn(Σ_k τ̂_k) per entry (the sign with the larger total mass wins).
3. Disjoint merge: τ_m = mean of the τ̂_k that are nonzero and agree with γ.
The merged model is θ₀ + λ·τ_m.

Checked against the authors' code (``ties_merging`` in prateeksha/TIES-Merging): the trim ranks
each task vector flattened over the whole model (``trim_scope: model``, the default here);
mergekit ranks per tensor (``trim_scope: tensor``). Ties at the threshold are kept (the
reference's ``>= kth value`` rule), so a few more than k% may survive on exact ties. An entry
whose total signed mass is exactly 0 merges to 0; the reference resolves such entries to the
model-wide majority sign, which needs the whole model at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_threshold(magnitudes: Tensor, density: float) -> float:
    """The smallest |τ| kept when the top ``density`` share of ``magnitudes`` (flat) survive."""
    n = magnitudes.numel()
    keep = max(1, round(density * n))
    if keep >= n:
        return 0.0
    return float(torch.kthvalue(magnitudes.float(), n - keep + 1).values)


def trim(delta: Tensor, threshold: float) -> Tensor:
    """τ with every entry of magnitude below ``threshold`` set to 0."""
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def disjoint_mean(deltas: list[Tensor]) -> Tensor:
    """Elect γ = sgn(Σ_k τ_k) and average, per entry, the τ_k that are nonzero with sign γ."""
    stacked = torch.stack(deltas)  # (K, ...)
    sign = torch.sign(stacked.sum(dim=0))  # (...)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)  # (K, ...)
    count = agree.sum(dim=0)  # (...)
    total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
