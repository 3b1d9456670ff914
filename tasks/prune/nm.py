"""N:M semi-structured sparsity (2:4 by default).

Mishra et al., "Accelerating Sparse Deep Neural Networks" (arXiv 2104.08378, 2021): in every
group of M consecutive weights along a layer's input (reduction) dimension keep the N with the
largest |w| and zero the rest, so a sparse tensor core (or our 2:4 kernel) can skip the zeros.
The paper then retrains with the mask fixed; here that is the stage's masked fine-tune.

Input dimension (reconstructed convention, stated here because it decides the groups):
- Linear (O, I): the I inputs of each output row, groups [0..M), [M..2M), ...
- Conv2d (O, I, kh, kw): each filter flattened in torch's order to I·kh·kw values
  (channel-major, then kernel row, then column), the order ``F.unfold`` lays out the im2col
  matrix in, so a conv run as unfold + matmul sees exactly these groups. NVIDIA's ASP groups
  a conv along I at each fixed (kh, kw) instead (channels-last implicit GEMM); the two differ
  for convs and agree for Linear layers.

Ties inside a group go to the lower index, so every group keeps exactly N.

Layers whose input size is not a multiple of M cannot be N:M sparse and raise a ValueError that
names the ``skip`` setting. The default ``skip`` names the stem of our CNN and of our ViT
(``slimforge.models``): they see the raw image, so their inputs are channels × kernel area
(1·3·3 = 9 on 1-channel digits; 1·7·7 = 49 for the ViT patch embedding), never a multiple of 4,
and they hold well under 1% of the weights. Skipped layers come back with an all-True mask so
sparsity reports count them as dense; skip names absent from the model are ignored, so one
default serves every architecture.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from tasks.prune.common import PruneBase, PruneContext, Pruned, prunable
from tasks.prune.magnitude import apply_masks

STEMS = ["backbone.body.0.weight", "backbone.embed.weight"]


class NmConfig(PruneBase):
    method: Literal["nm"] = "nm"
    n: int = Field(default=2, ge=1, description="weights kept in every group of m")
    m: int = Field(default=4, ge=2, description="group size, in consecutive input weights")
    skip: list[str] = Field(default_factory=lambda: list(STEMS),
                            description="prunable weight names left dense (e.g. 'backbone.body.0.weight'); "
                                        "the default is the CNN and ViT stem, whose input size is not a multiple of 4")

    @model_validator(mode="after")
    def _n_below_m(self) -> NmConfig:
        if self.n >= self.m:
            raise ValueError(f"nm: n={self.n} must be below m={self.m} (n = m prunes nothing)")
        return self


def _input_size(w: Tensor) -> int:
    """Length of the reduction dimension: I for Linear (O, I), I·kh·kw for Conv2d (O, I, kh, kw)."""
    return w[0].numel()


def nm_mask(w: Tensor, n: int, m: int) -> Tensor:
    """Boolean keep-mask of ``w``'s shape with the n largest |w| of every m consecutive inputs."""
    rows = w.detach().abs().reshape(w.shape[0], -1)  # (O, K), K = I or I·kh·kw in torch order
    groups = rows.reshape(rows.shape[0], -1, m)  # (O, K/m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)  # ties -> lower index
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(w.shape)


def nm_masks(weights: dict[str, Tensor], n: int, m: int, skip: list[str]) -> dict[str, Tensor]:
    """name -> boolean keep-mask: N:M on every layer not in ``skip``, all True on skipped ones.

    Raises ValueError for a layer whose input size is not a multiple of m, naming the layer,
    its input size, m and the ``skip`` setting; the check runs on every layer before any mask
    is built.
    """
    skipped = set(skip)
    for name, w in weights.items():
        k = _input_size(w)
        if name not in skipped and k % m:
            shape = f"{w.shape[1]} channels x {w.shape[2]}x{w.shape[3]} kernel = " if w.dim() == 4 else ""
            raise ValueError(f"nm: layer {name!r} has {shape}{k} inputs, not a multiple of m={m}; "
                             f"add {name!r} to prune.skip to leave it dense")
    return {name: torch.ones_like(w, dtype=torch.bool) if name in skipped else nm_mask(w, n, m)
            for name, w in weights.items()}


def prune_nm(ctx: PruneContext, cfg: NmConfig) -> Pruned:
    """Registry entry: N:M masks on every prunable layer not in ``cfg.skip``."""
    masks = nm_masks(prunable(ctx.model), cfg.n, cfg.m, cfg.skip)
    apply_masks(ctx.model, masks)
    dense = [name for name in masks if name in cfg.skip]
    return Pruned(ctx.model, masks, report={"nm_pattern": f"{cfg.n}:{cfg.m}", "nm_dense_layers": dense})
