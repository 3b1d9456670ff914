"""Magnitude pruning, global or per layer, followed by a short masked fine-tune.

Han et al., "Learning both Weights and Connections for Efficient Neural Networks"
(NeurIPS 2015): keep the largest (1 - s) share of |w| among the prunable weights (the
weights of Linear and Conv layers; biases and norms are never pruned). Ties are broken by
index so the sparsity is exactly s.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

__all__ = ["MagnitudeConfig", "apply_masks", "magnitude_masks", "prunable", "prune_magnitude"]

from tasks.prune.common import PruneBase, PruneContext, Pruned, keep_largest, prunable, split_like


class MagnitudeConfig(PruneBase):
    method: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(default=0.8, ge=0, lt=1, description="share of prunable weights set to zero")
    scope: Literal["global", "layer"] = "global"


def magnitude_masks(weights: dict[str, Tensor], sparsity: float, scope: str) -> dict[str, Tensor]:
    """name -> boolean keep-mask with exactly round((1-s)·n) kept in the scope."""
    if scope == "layer":
        return {n: keep_largest(w.detach().abs().flatten(), round((1 - sparsity) * w.numel())).view_as(w)
                for n, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    return split_like(keep_largest(flat, round((1 - sparsity) * len(flat))), weights)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def prune_magnitude(ctx: PruneContext, cfg: MagnitudeConfig) -> Pruned:
    masks = magnitude_masks(prunable(ctx.model), cfg.sparsity, cfg.scope)
    apply_masks(ctx.model, masks)
    return Pruned(ctx.model, masks)
