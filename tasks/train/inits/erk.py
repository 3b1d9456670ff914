"""erk: Erdős–Rényi-Kernel sparsity, Evci et al., "Rigging the Lottery: Making All Tickets
Winners" (ICML 2020), extending the Erdős–Rényi masks of Mocanu et al. (Nat. Commun. 2018).

Layer l keeps a fraction d_l = ε·(n_in + n_out + k_h + k_w)/(n_in·n_out·k_h·k_w) of its
n_l weights (no kernel terms for a Linear). ε solves Σ d_l n_l = D·Σ n_l; a layer whose
d_l would exceed 1 is made dense and ε re-solved over the rest (RigL's appendix; making a
layer dense frees budget, so ε only grows and every capped layer stays capped). Each layer
then keeps exactly round(d_l·n_l) weights chosen uniformly by the generator, so the global
density is D to within half a weight per layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def erk_raw(shape: tuple[int, ...]) -> float:
    """d_l / ε for a (out, in) Linear or (out, in, kh, kw) kernel."""
    n_out, n_in, *kernel = shape
    return (n_in + n_out + sum(kernel)) / math.prod(shape)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """name -> kept fraction d_l in (0, 1], with Σ d_l n_l = D·Σ n_l."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: erk_raw(s) for k, s in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):
        budget = density * sum(sizes.values()) - sum(sizes[k] for k in dense)
        eps = budget / sum(raw[k] * sizes[k] for k in shapes if k not in dense)
        over = {k for k in shapes if k not in dense and eps * raw[k] > 1.0}
        if not over:
            break
        dense |= over
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def random_mask(shape: tuple[int, ...], keep: int, g: torch.Generator) -> Tensor:
    """bool mask of ``shape`` with exactly ``keep`` True entries, uniformly placed."""
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    if keep >= n:
        return mask.fill_(True).reshape(shape)
    mask[torch.randperm(n, generator=g)[:keep]] = True
    return mask.reshape(shape)


def erk_masks(shapes: dict[str, tuple[int, ...]], density: float, g: torch.Generator) -> dict[str, Tensor]:
    """name -> bool mask keeping round(d_l·n_l) weights (at least one) of each layer."""
    masks = {}
    for name, d in erk_densities(shapes, density).items():
        keep = max(1, round(d * math.prod(shapes[name])))
        masks[name] = random_mask(shapes[name], keep, g)
    return masks
