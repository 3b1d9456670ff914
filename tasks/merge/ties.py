"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023), §3:
1. Trim: keep the top-k% entries of each task vector by magnitude, zero the rest
   (``keep_threshold`` finds the cut; the merge op keeps |τ| >= it).
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

from torch import Tensor


def keep_threshold(magnitudes: Tensor, density: float) -> float:
    """The smallest |τ| kept when the top ``density`` share of ``magnitudes`` (flat) survive.

    The (n − keep + 1)-th smallest entry, found by numpy's partition, which *reorders
    ``magnitudes`` in place* (float32, CPU): torch.kthvalue would clone the buffer and allocate
    int64 indices, 3× a model's worth of memory in a streamed merge."""
    n = magnitudes.numel()
    keep = max(1, round(density * n))
    if keep >= n:
        return 0.0
    flat = magnitudes.detach().reshape(-1).float().numpy()
    flat.partition(n - keep)
    return float(flat[n - keep])
