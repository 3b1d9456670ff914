"""Layer-adaptive sparsity: per-layer pruning ratios chosen by dynamic programming.

Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural
Networks" (ICCV 2023). The output distortion of pruning several layers at once is close to the
sum of the distortions of pruning each alone (their additivity property), so choosing per-layer
sparsities that minimise output distortion at a global budget is a knapsack solved exactly by
DP over layers:

1. For every layer l and grid sparsity g, prune only layer l by magnitude and record
   D_l(g) = mean squared logit error against the dense model on a calibration batch.
2. F[l][c] = least Σ_{j<=l} D_j(g_j) with c budget units pruned in layers 0..l; the answer is
   the best F[L][c] over c >= the target's units, traced back to one grid point per layer.
3. Prune every layer by magnitude to its allocated sparsity.

Checked against the authors' code (github.com/Akimoto-Cris/RD_PRUNE, tools/pruners.py
``gen_rd_curves`` and tools/algo.py ``dp_pruning``): the distortion is ``((Y - Y_hat)**2).mean()``
of the outputs in eval mode with one layer L1-magnitude pruned, as here. Differences, ours:
- Their DP state is the surviving-weight count at single-weight resolution; METHODS.md asks
  for 1% units. ``unit`` <= 1/N reproduces theirs (a unit is at least one weight); the
  state vector then has ~N entries, still cheap for our models.
- Their grid runs to amount 1 (a layer removed entirely); ours stops at 0.99 (METHODS.md).
- Budget rounding (ours). A grid choice prunes a real count k = n - round((1 - g)·n) (what
  ``magnitude_masks`` does); the DP credits it floor(k / u) units of u = floor(unit·N) weights
  and asks for ceil(T / u) units, T = the pruned count the global target implies. So the
  grid allocation always prunes >= T real weights. The surplus is then given back greedily
  where distortion per weight is steepest, moving along the piecewise-linear interpolation of
  each D_l between grid points, which makes the achieved count exactly T (the count
  ``magnitude_masks`` prunes at the same global sparsity, so comparisons are at equal size).
- The report's predicted joint distortion is Σ_l D_l measured at each layer's final count
  (L extra forward passes), not read off the interpolated grid, so the additivity check
  compares two measurements of the same masks.
- The grid is {0, step, 2·step, ...} below 0.99, plus 0.99: no layer is pruned away entirely.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from tasks.prune.common import PruneBase, PruneContext, Pruned, prunable
from tasks.prune.magnitude import apply_masks, magnitude_masks

GRID_MAX = 0.99  # largest per-layer sparsity the grid offers


class LayerAdaptiveConfig(PruneBase):
    method: Literal["layer_adaptive"] = "layer_adaptive"
    sparsity: float = Field(default=0.8, ge=0, le=GRID_MAX, description="share of all prunable weights set to zero")
    grid_step: float = Field(default=0.02, gt=0, le=0.5,
                             description="spacing of the per-layer sparsity grid on [0, 0.99], as a share of the layer")
    unit: float = Field(default=0.01, gt=0, le=0.1,
                        description="DP budget unit as a share of all prunable weights (at least one weight)")
    calibration_size: int = Field(default=256, ge=1, description="training examples the distortions are measured on")
    seed: int = Field(default=0, description="seeds the draw of the calibration examples (and recovery)")


def sparsity_grid(step: float) -> Tensor:
    """(G,) float64: 0, step, 2·step, ... below GRID_MAX, then GRID_MAX."""
    points = [i * step for i in range(math.ceil(GRID_MAX / step - 1e-9))]
    return torch.tensor([*points, GRID_MAX], dtype=torch.float64)


def calibration_batch(x: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A uniformly random ``size`` rows of x (all of x if it has fewer), drawn with ``generator``.

    Same draw as the prune stage's ``calibration`` (randperm, first ``size``) for the same seed.
    """
    return x[torch.randperm(len(x), generator=generator)[:size]]


def pruned_counts(sizes: list[int], grid: Tensor) -> Tensor:
    """(L, G) int64: weights ``magnitude_masks`` prunes in a layer of size n at sparsity g."""
    return torch.tensor([[n - round((1 - g) * n) for g in grid.tolist()] for n in sizes], dtype=torch.int64)


def _mse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


@torch.no_grad()
def _masked_logits(model: nn.Module, x: Tensor, masks: dict[str, Tensor]) -> Tensor:
    """(B, classes) logits in eval mode with ``masks`` applied; the weights are restored after."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in masks}
    was_training = model.training
    model.eval()
    try:
        for n, m in masks.items():
            params[n].mul_(m)
        return model(x)
    finally:
        for n, w in saved.items():
            params[n].copy_(w)
        model.train(was_training)


def joint_distortion(model: nn.Module, x_calib: Tensor, masks: dict[str, Tensor]) -> float:
    """Logit MSE of the model with every mask applied against the dense model."""
    return _mse(_masked_logits(model, x_calib, masks), _masked_logits(model, x_calib, {}))


def additive_distortion(model: nn.Module, x_calib: Tensor, masks: dict[str, Tensor]) -> float:
    """Σ_l logit MSE with ONLY layer l's mask applied: the additive prediction of the joint one."""
    dense = _masked_logits(model, x_calib, {})
    return sum(_mse(_masked_logits(model, x_calib, {n: m}), dense) for n, m in masks.items())


def layer_distortions(model: nn.Module, x_calib: Tensor, grid: Tensor) -> Tensor:
    """(L, G) float64: logit MSE vs the dense model with ONLY layer l magnitude-pruned to grid[g].

    Layers are those of ``prunable(model)``, in its order; the model is left unchanged.
    """
    weights = prunable(model)
    dense = _masked_logits(model, x_calib, {})
    out = torch.zeros(len(weights), len(grid), dtype=torch.float64)
    for l, (name, w) in enumerate(weights.items()):
        for g, s in enumerate(grid.tolist()):
            if s > 0:  # at g = 0 nothing is pruned and the distortion is exactly 0
                masks = magnitude_masks({name: w}, s, "layer")
                out[l, g] = _mse(_masked_logits(model, x_calib, masks), dense)
    return out


def knapsack(cost: Tensor, units: Tensor, budget: int) -> list[int]:
    """Grid index per layer minimising Σ_l cost[l, g_l] subject to Σ_l units[l, g_l] >= budget.

    cost (L, G) float, units (L, G) non-negative int. F[c] after layer l is the least summed
    cost of layers 0..l with exactly c units; ties go to the smaller grid index and then to
    the fewest units, so the result is deterministic.
    """
    num_layers, num_grid = cost.shape
    cap = int(units.max(dim=1).values.sum())
    if cap < budget:
        raise ValueError(f"layer_adaptive: the budget needs {budget} units but pruning every layer to "
                         f"{GRID_MAX} gives only {cap}; lower prune.sparsity or prune.unit")
    best = torch.full((cap + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for l in range(num_layers):
        cand = torch.full((num_grid, cap + 1), math.inf, dtype=torch.float64)  # (G, units)
        for g in range(num_grid):
            u = int(units[l, g])
            cand[g, u:] = best[: cap + 1 - u] + float(cost[l, g])
        best, arg = cand.min(dim=0)
        picks.append(arg)
    c = budget + int(torch.argmin(best[budget:]))
    choice = []
    for l in reversed(range(num_layers)):
        g = int(picks[l][c])
        choice.append(g)
        c -= int(units[l, g])
    return choice[::-1]


def _segment(counts: Tensor, k: int) -> int:
    """Index a of the grid segment [counts[a], counts[a+1]] holding k, with counts[a] < k."""
    return int(torch.searchsorted(counts, k, side="left")) - 1


def interpolate(distortion: Tensor, counts: Tensor, k: int) -> float:
    """D_l at k pruned weights, linear between the grid points of one layer ((G,) each)."""
    if k <= int(counts[0]):
        return float(distortion[0])
    a = _segment(counts, k)
    slope = (distortion[a + 1] - distortion[a]) / int(counts[a + 1] - counts[a])
    return float(distortion[a] + slope * (k - int(counts[a])))


def give_back(distortion: Tensor, counts: Tensor, pruned: list[int], surplus: int) -> list[int]:
    """Un-prune ``surplus`` weights where the interpolated distortion falls fastest per weight.

    distortion, counts (L, G); pruned: per-layer pruned counts. Greedy along the segments, which
    is optimal when each D_l is convex in k.
    """
    pruned = list(pruned)
    while surplus > 0:
        best, best_slope = -1, -math.inf
        for l, k in enumerate(pruned):
            if k > int(counts[l, 0]):
                a = _segment(counts[l], k)
                slope = float((distortion[l, a + 1] - distortion[l, a]) / int(counts[l, a + 1] - counts[l, a]))
                if slope > best_slope:
                    best, best_slope = l, slope
        a = _segment(counts[best], pruned[best])
        step = min(surplus, pruned[best] - int(counts[best, a]))
        pruned[best] -= step
        surplus -= step
    return pruned


def allocate(distortion: Tensor, sizes: list[int], grid: Tensor, sparsity: float, unit: float) -> Tensor:
    """(L,) float64 per-layer sparsities pruning exactly the global target's count.

    The DP picks one grid point per layer on whole budget units (rounded so the real pruned
    count is >= the target), then ``give_back`` trims the rounding surplus.
    """
    counts = pruned_counts(sizes, grid)  # (L, G)
    total = sum(sizes)
    target = total - round((1 - sparsity) * total)  # the count magnitude pruning would remove
    per_unit = max(1, math.floor(unit * total))
    choice = knapsack(distortion, counts // per_unit, -(-target // per_unit))
    pruned = [int(counts[l, g]) for l, g in enumerate(choice)]
    pruned = give_back(distortion, counts, pruned, sum(pruned) - target)
    return torch.tensor(pruned, dtype=torch.float64) / torch.tensor(sizes, dtype=torch.float64)


def interpolated_distortion(distortion: Tensor, sizes: list[int], grid: Tensor, sparsities: Tensor) -> float:
    """Σ_l D_l(s_l) read off the (L, G) table, linear between grid points (the model ``allocate`` uses)."""
    counts = pruned_counts(sizes, grid)
    return sum(interpolate(distortion[l], counts[l], n - round((1 - float(s)) * n))
               for l, (n, s) in enumerate(zip(sizes, sparsities)))


def layer_adaptive_masks(model: nn.Module, x_calib: Tensor,
                         cfg: LayerAdaptiveConfig) -> tuple[dict[str, Tensor], dict]:
    """Per-layer magnitude masks at DP-allocated sparsities, and a JSON-ready report.

    Report: achieved and per-layer sparsity; ``predicted_distortion`` = Σ_l D_l measured with
    only layer l pruned to its final count (the additive prediction), ``measured_distortion`` =
    all layers pruned together (their ratio is the additivity check); the same two for the
    uniform allocation (every layer at ``cfg.sparsity``); ``interpolated_distortion``, the
    value the allocator minimised on the grid table; and the table itself.
    """
    weights = prunable(model)
    sizes = [w.numel() for w in weights.values()]
    grid = sparsity_grid(cfg.grid_step)
    table = layer_distortions(model, x_calib, grid)  # (L, G)
    alloc = allocate(table, sizes, grid, cfg.sparsity, cfg.unit)
    masks = {}
    for (name, w), s in zip(weights.items(), alloc.tolist()):
        masks |= magnitude_masks({name: w}, s, "layer")
    uniform = magnitude_masks(weights, cfg.sparsity, "layer")
    kept = sum(int(m.sum()) for m in masks.values())
    report = {
        "sparsity": 1 - kept / sum(sizes),
        "layer_sparsity": dict(zip(weights, alloc.tolist())),
        "predicted_distortion": additive_distortion(model, x_calib, masks),
        "measured_distortion": joint_distortion(model, x_calib, masks),
        "uniform_predicted_distortion": additive_distortion(model, x_calib, uniform),
        "uniform_measured_distortion": joint_distortion(model, x_calib, uniform),
        "interpolated_distortion": interpolated_distortion(table, sizes, grid, alloc),
        "grid": grid.tolist(),
        "layer_distortions": dict(zip(weights, table.tolist())),
    }
    return masks, report


def prune_layer_adaptive(ctx: PruneContext, cfg: LayerAdaptiveConfig) -> Pruned:
    """Registry entry: calibration rows drawn from the training set with ``cfg.seed``, DP masks."""
    x_calib = calibration_batch(ctx.x, cfg.calibration_size, torch.Generator().manual_seed(cfg.seed))
    masks, report = layer_adaptive_masks(ctx.model, x_calib, cfg)
    apply_masks(ctx.model, masks)
    keep = ("layer_sparsity", "predicted_distortion", "measured_distortion",
            "uniform_predicted_distortion", "uniform_measured_distortion")  # the stage reports sparsity
    return Pruned(ctx.model, masks, report={k: _rounded(report[k]) for k in keep})


def _rounded(value: float | dict) -> float | dict:
    return {k: round(v, 6) for k, v in value.items()} if isinstance(value, dict) else round(value, 6)
