"""TRP: Trained Rank Pruning — low-rank truncation and a nuclear-norm penalty inside training.

Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks" (arXiv 1812.02402, 2018;
IJCAI 2020 as "TRP: ..."; code: yuhuixu1993/Trained-Rank-Pruning). Training alternates
plain steps with TRP steps: at iterations t = zm (z = 0, 1, 2, ...) every weight W is replaced
by its truncated SVD T(W) = U_rΣ_rV_rᵀ before the forward pass, r the smallest rank with
Σ_{i≤r} σ_i² ≥ e·Σ σ_i² (the code's ``EnergyThreshold``, energy on σ², "≥"), and the
gradient step then starts from the low-rank weight. A nuclear-norm penalty λ‖W‖_* is
optimised by stochastic sub-gradient descent: λ·UVᵀ is added to each weight's loss gradient.
At the end every layer is cut at its final rank into two factors, *without* fine-tuning.
A conv kernel is treated as a (C_out, C_in·kh·kw) matrix — the paper's channel-wise ("NC")
decomposition — and becomes a kh x kw conv with r outputs followed by a 1x1 conv (``lowrank``).

Reconstructed details:
- Defaults m = 100 steps, e = 0.98, λ = 1e-4 are MNIST-scale starting points. The reference
  code uses λ = 3e-4 (README), truncation energy 0.9 (hard-coded in ``low_rank_approx``)
  and a period of 5 iterations (``train_TPR.sh``); the paper's own values could not be checked.
- The sub-gradient is added at every optimizer step, from the current weight (the penalty is
  part of the objective); the reference code adds it only on TRP iterations, from the
  truncated SVD. UVᵀ keeps only the singular values above float rounding
  (σ_i > max(m, n)·eps·σ_max), so a weight just truncated to rank r gets U_rV_rᵀ, the
  minimal-norm sub-gradient, not directions picked from its rounding noise.
- It is added by a tensor hook during ``backward``, before the optimizer sees the gradient,
  so with AdamW it is normalised with the loss gradient (the reference code uses SGD,
  which is this pipeline's default for TRP too).
- A truncation that keeps the full rank leaves the weight's bits untouched.
- The final rank is the energy rank r(e) of the final weight (the code's evaluation uses a
  small value threshold instead, since the trained weights are low rank); a layer is
  replaced only if its factors are smaller (r(m + n) < mn), else it stays dense as trained.
- The head is never truncated, penalised or factored (as in ``svd``; the reference code also
  leaves the first conv and the FC layer alone); biases are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from slimforge.training import FitConfig, fit
from tasks.prune.common import PruneBase, PruneContext, Pruned, RecoveryParams
from tasks.prune.lowrank import energy_rank, factorable, factorize_with_ranks, pays_off


class TrpConfig(PruneBase):
    method: Literal["trp"] = "trp"
    energy: float = Field(default=0.98, gt=0, le=1,
                          description="e, share of Σσ² (squared Frobenius norm) each truncation keeps, unitless; "
                                      "also sets the final ranks; 1 = never truncate")
    truncate_every: int = Field(default=100, ge=1, description="m, optimizer steps between TRP truncations "
                                                               "(the first is before step 0)")
    nuclear_weight: float = Field(default=1e-4, ge=0,
                                  description="λ of the penalty λ·‖W‖_* (sum of singular values, per weight "
                                              "matrix); its sub-gradient λ·UVᵀ is added to the loss gradient")
    training: FitConfig = Field(default_factory=lambda: FitConfig(optimizer="sgd", lr=0.01, epochs=4),
                                description="the TRP training run, continuing from the trained base")
    recovery_params: RecoveryParams = Field(
        default="none", description="TRP cuts without fine-tuning; 'none' skips the stage's recovery")
    seed: int = Field(default=0, description="seeds the data order of the TRP training run")


@dataclass
class TrpResult:
    truncations: int  # TRP steps taken (each truncates every factorable weight)
    losses: list[float]  # mean training loss per epoch


def nuclear_subgradient(weight: Tensor) -> Tensor:
    """UVᵀ over the singular values above rounding: a sub-gradient of ‖W‖_* (its gradient when
    W has full rank and distinct singular values), in ``weight``'s shape and dtype."""
    matrix = weight.detach().flatten(1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, k), (k,), (k, n)
    keep = s > max(matrix.shape) * torch.finfo(weight.dtype).eps * s[0]
    return (u[:, keep] @ vh[keep]).to(weight.dtype).view_as(weight)


def truncation_rank(weight: Tensor, energy: float) -> int:
    """r(e) of ``weight`` as a matrix: the smallest rank keeping ``energy`` of Σσ²."""
    return energy_rank(torch.linalg.svdvals(weight.detach().flatten(1).double()), energy)


@torch.no_grad()
def truncate_(weight: Tensor, rank: int) -> None:
    """Replace ``weight`` in place by its best rank-r approximation U_rΣ_rV_rᵀ (no-op at full rank)."""
    matrix = weight.flatten(1).double()
    if rank >= min(matrix.shape):
        return
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    weight.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank]).view_as(weight))


def train_trp(model: nn.Module, x: Tensor, y: Tensor, cfg: TrpConfig, generator: torch.Generator) -> TrpResult:
    """Train ``model`` in place with TRP: truncation at steps 0, m, 2m, ... and the penalty's
    sub-gradient on every factorable weight (not the head)."""
    weights = [module.weight for module in factorable(model).values()]
    truncations = 0
    step = 0

    def trp_step() -> None:
        nonlocal truncations
        for w in weights:
            truncate_(w, truncation_rank(w, cfg.energy))
        truncations += 1

    def after_step(_: nn.Module) -> None:
        nonlocal step
        step += 1
        if step % cfg.truncate_every == 0:
            trp_step()

    def penalty(w: Tensor):
        return lambda grad: grad + cfg.nuclear_weight * nuclear_subgradient(w)

    handles = [w.register_hook(penalty(w)) for w in weights] if cfg.nuclear_weight > 0 else []
    try:
        trp_step()
        losses = fit(model, x, y, cfg.training, generator, after_step=after_step, label="prune trp")
    finally:
        for handle in handles:
            handle.remove()
    return TrpResult(truncations, losses)


def final_ranks(model: nn.Module, energy: float) -> dict[str, int]:
    """{layer: r(e)} for every factorable layer whose rank-r(e) factors are smaller than its weight."""
    ranks = {}
    for name, module in factorable(model).items():
        rank = truncation_rank(module.weight, energy)
        if pays_off(rank, module.weight.shape[0], module.weight[0].numel()):
            ranks[name] = rank
    return ranks


def prune_trp(ctx: PruneContext, cfg: TrpConfig) -> Pruned:
    """Registry entry: TRP training of the trained base on the stage's training set, then the
    cut into factors at the final energy ranks (no fine-tuning)."""
    result = train_trp(ctx.model, ctx.x, ctx.y, cfg, torch.Generator().manual_seed(cfg.seed))
    all_ranks = {name: truncation_rank(m.weight, cfg.energy) for name, m in factorable(ctx.model).items()}
    ranks = final_ranks(ctx.model, cfg.energy)
    factorize_with_ranks(ctx.model, ranks)
    return Pruned(ctx.model, ranks=ranks, report={"ranks": ranks, "trp_energy_ranks": all_ranks,
                                                  "trp_truncations": result.truncations,
                                                  "final_train_loss": round(result.losses[-1], 6)})
