"""EVA: data-driven LoRA init and rank allocation from the SVD of layer inputs.

Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation" (2024, arXiv 2410.07170). Calibration batches run through the frozen base;
forward hooks collect each target layer's inputs X (N×d_in, leading dims flattened, so
tokens count as rows). A's rows are X's top right-singular vectors (orthonormal), B = 0,
and ranks are redistributed across layers by explained variance.

What is implemented, checked against the authors' code (ml-jku/EVA ``src/svd.py::compute_svd``
and PEFT ``tuners/lora/eva.py::get_eva_state_dict``, both ``rho=2`` by default):

* Per-layer cap: each layer computes ``round(r·ρ)`` components (their ``max_components``),
  here also at most ``min(d_in, N)``; ρ ≥ 1, and ρ = 1 gives every layer rank r
  (when d_in, N ≥ r).
* Redistribution: pool the explained-variance ratios of all layers' capped components,
  take the global top ``r·L`` (L = number of targeted layers) and give each layer as many
  ranks as it has components among them — their ``_get_rank_distribution`` with the
  default ``"ratio"`` metric. Layers left with rank 0 get no adapter.
* Stopping rule: the paper feeds minibatches to an incremental SVD until the top
  components stop moving (cosine similarity ≥ τ = 0.99 between successive steps).
  Here the data are small, so this is replaced by one exact SVD
  (``torch.linalg.svd`` of X in float64) over a fixed number of calibration batches.
* Centering: the authors' incremental SVD is an IncrementalPCA, which subtracts the running
  column mean, so their components and ratios (``S²/‖X − μ‖²_F``) are PCA's. The default here
  follows METHODS.md ("SVD of the activations") — the SVD of X itself, ratios
  ``σ_i²/‖X‖²_F``, so A spans the top eigenvectors of XᵀX; ``center=True`` gives the
  reference code's version. The paper's own equations were not available to check this.
* Not implemented: their ``whiten`` / ``scale_by_singular_values`` options (off by default),
  de-duplication of layers that see identical inputs, and any rescaling of alpha after
  redistribution (later PEFT versions offer one; not checked here): each adapted layer
  scales by ``alpha / (its own rank)``, as in plain LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from tasks.finetune.lora import match_targets


@torch.no_grad()
def collect_inputs(model: nn.Module, names: list[str],
                   batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Each named layer's inputs over the batches, as (N, d_in) with leading dims flattened."""
    seen: dict[str, list[Tensor]] = {n: [] for n in names}

    def hook(name):
        def record(module, args, output):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))  # (B·…, d_in)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if any(not v for v in seen.values()):
        raise ValueError("EVA calibration saw no inputs: need at least one non-empty batch")
    return {n: torch.cat(v) for n, v in seen.items()}


def principal_directions(X: Tensor, k: int, center: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k right-singular vectors of X (N, d_in) as rows (k, d_in) and their explained
    variance ratios (k,): ``σ_i² / Σ_j σ_j²``, the share of ‖X‖²_F (of ‖X − μ‖²_F if centered).

    Exact SVD in float64; each row's largest-magnitude entry is made positive so the result
    does not depend on the LAPACK sign choice. ``k`` is clipped to ``min(N, d_in)``.
    """
    X64 = X.double()
    if center:
        X64 = X64 - X64.mean(dim=0, keepdim=True)
    # S: (m,), Vh: (m, d_in) with m = min(N, d_in)
    _, S, Vh = torch.linalg.svd(X64, full_matrices=False)
    k = min(k, Vh.shape[0])
    V = Vh[:k]
    signs = torch.sign(V.gather(1, V.abs().argmax(dim=1, keepdim=True)))  # (k, 1)
    V = V * torch.where(signs == 0, 1.0, signs)
    energy = S.square()
    total = energy.sum()
    ratios = energy[:k] / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    return V.to(X.dtype), ratios


def redistribute_ranks(ratios: dict[str, Tensor], budget: int) -> dict[str, int]:
    """Rank per layer: its count among the global top-``budget`` pooled ratios.

    ``ratios[name]`` holds that layer's capped components' ratios, sorted descending. Ties
    go to the earlier layer, then the earlier component (stable sort). The ranks sum to
    ``min(budget, number of pooled components)``.
    """
    owners = [name for name, r in ratios.items() for _ in range(len(r))]
    pooled = torch.cat([r.double() for r in ratios.values()])  # (Σ_l k_l,)
    order = torch.sort(pooled, descending=True, stable=True).indices[:budget]
    ranks = {name: 0 for name in ratios}
    for i in order.tolist():
        ranks[owners[i]] += 1
    return ranks


def eva_init(model: nn.Module, targets: list[str], batches: Iterable[Tensor], rank: int,
             rho: float = 2.0, center: bool = False) -> tuple[dict[str, int], dict[str, Tensor]]:
    """EVA ranks and A matrices for the targeted layers of ``model`` (left unchanged).

    Returns ``(ranks, init_A)``: ``ranks`` maps every targeted layer to its rank (sum r·L
    when enough components exist), ``init_A`` maps each layer with rank > 0 to its
    (rank, d_in) orthonormal rows — ready for ``add_adapters(model, targets, ranks, alpha,
    init_A)``.
    """
    if rank < 1 or rho < 1:
        raise ValueError(f"EVA needs rank >= 1 and rho >= 1, got rank={rank}, rho={rho}")
    names = match_targets(model, targets)
    inputs = collect_inputs(model, names, batches)
    cap = round(rank * rho)  # the reference code's max_components
    directions = {n: principal_directions(inputs[n], cap, center) for n in names}
    ranks = redistribute_ranks({n: d[1] for n, d in directions.items()}, rank * len(names))
    init_A = {n: directions[n][0][:r] for n, r in ranks.items() if r > 0}
    return ranks, init_A
