"""Random pruning: the baseline every pruning method must beat.

Two forms, both with exact counts and an explicit ``torch.Generator``:

- ``random_masks``: keep a uniformly random ``round((1 - s) · n)`` of the prunable weights,
  over all of them (``scope: global``) or in every layer (``scope: layer``); the counts are
  those ``magnitude_masks`` keeps, so the two differ only in *which* weights survive.
- ``random_like``: a random mask with the same per-layer kept counts as a given mask, the
  "random pruning at equal per-layer sparsity" baseline of Liu et al., "Rethinking the Value of
  Network Pruning" (ICLR 2019). It separates what a method gains from its per-layer
  allocation (kept) from what it gains from choosing the weights (lost).

Under global scope each layer's share of survivors is hypergeometric, so layers keep about
``1 - s`` each; that is the paper's "uniform random" baseline, not an ERK-like allocation.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tasks.prune.common import PruneBase, PruneContext, Pruned, prunable, split_like
from tasks.prune.magnitude import apply_masks


class RandomConfig(PruneBase):
    method: Literal["random"] = "random"
    sparsity: float = Field(default=0.8, ge=0, lt=1, description="share of prunable weights set to zero")
    scope: Literal["global", "layer"] = Field(
        default="global", description="draw the survivors over all prunable weights, or per layer")
    seed: int = Field(default=0, description="seeds the generator that draws the mask (and recovery)")


def _random_keep(n: int, keep: int, generator: torch.Generator) -> Tensor:
    """Flat boolean mask of length n with exactly ``keep`` True at uniformly random places."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:keep]] = True
    return mask


def random_masks(weights: dict[str, Tensor], sparsity: float, scope: str,
                 generator: torch.Generator) -> dict[str, Tensor]:
    """name -> boolean keep-mask with exactly round((1-s)·n) kept in the scope.

    Layers are drawn in the order of ``weights``, so the same generator state gives the same
    masks.
    """
    if scope == "layer":
        return {n: _random_keep(w.numel(), round((1 - sparsity) * w.numel()), generator).view(w.shape)
                for n, w in weights.items()}
    if scope != "global":
        raise ValueError(f"random: scope {scope!r} is not one of global, layer")
    total = sum(w.numel() for w in weights.values())
    return split_like(_random_keep(total, round((1 - sparsity) * total), generator), weights)


def random_like(masks: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """A random keep-mask per layer with exactly as many kept weights as ``masks`` has there."""
    return {n: _random_keep(m.numel(), int(m.sum()), generator).view(m.shape) for n, m in masks.items()}


def prune_random(ctx: PruneContext, cfg: RandomConfig) -> Pruned:
    """Registry entry: random masks drawn from a generator of their own, seeded by ``cfg.seed``."""
    masks = random_masks(prunable(ctx.model), cfg.sparsity, cfg.scope, torch.Generator().manual_seed(cfg.seed))
    apply_masks(ctx.model, masks)
    return Pruned(ctx.model, masks)
