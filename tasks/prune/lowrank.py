"""Truncated-SVD low-rank factorization of Linear and Conv2d layers (baseline).

The classic baseline, as used recently in Kaushal et al., "LORD: Low Rank Decomposition Of
Monolingual Code LLMs For One-Shot Compression" (2023): W (m x n) ≈ B @ A with
B = U_r Σ_r^{1/2} (m x r) and A = Σ_r^{1/2} V_rᵀ (r x n), the best rank-r approximation in
Frobenius norm (Eckart–Young). A Linear becomes Linear(n -> r, no bias) then
Linear(r -> m, the original bias); a Conv2d, its kernel reshaped to (C_out, C_in·kh·kw),
becomes a kh x kw conv with r outputs (same stride/padding/dilation, no bias) then a 1x1
conv with the original bias.

Rank per layer: the smallest r with Σ_{i≤r} σ_i² ≥ e·Σ σ_i² (energy e), or, if ``ratio``
is set, r = max(1, round(ratio·min(m, n))). A layer is replaced only if the two factors
are smaller than the dense weight, r·(m + n) < m·n, i.e. r < mn/(m + n); otherwise it stays
dense and is absent from the returned ranks.

Decided here (not in the papers):
- The head (``model.head``) is never factorized: fine-tuning swaps heads and merging reads
  ``head.weight``, so the head must stay one ``nn.Linear``; it is also tiny (classes x F)
  and a rank below classes·F/(classes+F) < classes cuts logit directions directly.
- Grouped convs are left dense (their kernel is not one (C_out, C_in·kh·kw) matrix).
- ``nn.MultiheadAttention``'s ``out_proj`` is left dense: the attention reads its ``weight``
  directly, so a factored replacement would break the forward pass.
- The SVD runs in float64 and the factors are cast back to the weight's dtype, so the
  Eckart–Young identity holds to float32 rounding.
- ``factorize_with_ranks`` rebuilds the factored tree from a ranks dict by factorizing
  whatever weights the model holds; the values are meant to be overwritten by a saved
  state dict (the stage stores the ranks in meta.json).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from tasks.prune.common import PruneBase, PruneContext, Pruned


class SvdConfig(PruneBase):

    method: Literal["svd"] = "svd"
    energy: float = Field(default=0.9, gt=0, le=1,
                          description="share of Σσ² (squared Frobenius norm) the kept singular values must "
                                      "reach, unitless; rank = the smallest r that does")
    ratio: float | None = Field(default=None, gt=0, le=1,
                                description="if set, rank = max(1, round(ratio·min(m, n))) per layer instead "
                                            "of the energy rule, unitless share of the full rank")


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A (r, n), B (m, r) with B @ A the best rank-r approximation of ``weight`` (m, n)."""
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"svd rank {rank} is outside 1..{min(m, n)} for a {m}x{n} weight")
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)  # (m, k), (k,), (k, n)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]  # Σ_r^{1/2} V_rᵀ, (r, n)
    b = u[:, :rank] * root[None, :]  # U_r Σ_r^{1/2}, (m, r)
    return a.to(weight.dtype), b.to(weight.dtype)


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ energy·Σ σ_i² (σ sorted descending)."""
    if not 0 < energy <= 1:
        raise ValueError(f"svd energy must be in (0, 1], got {energy}")
    cum = torch.cumsum(singular_values.double() ** 2, 0)
    # the total is cum[-1] itself, so energy = 1 gives the full length, never one past it
    r = int(torch.searchsorted(cum, energy * cum[-1]).item()) + 1
    return min(r, len(singular_values))


def pays_off(rank: int, m: int, n: int) -> bool:
    """True if the factors (r·(m+n) weights) are smaller than the dense weight (m·n)."""
    return rank * (m + n) < m * n


class LowRankLinear(nn.Module):
    """x -> up(down(x)): Linear(in -> r, no bias) then Linear(r -> out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, layer: nn.Linear, rank: int) -> LowRankLinear:
        new = cls(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
        new.to(layer.weight.device, layer.weight.dtype)
        a, b = svd_factors(layer.weight, rank)
        new.down.weight.copy_(a)
        new.up.weight.copy_(b)
        if layer.bias is not None:
            new.up.bias.copy_(layer.bias)
        return new

    def forward(self, x: Tensor) -> Tensor:  # (B, in) -> (B, out)
        return self.up(self.down(x))


class LowRankConv2d(nn.Module):
    """x -> up(down(x)): kh x kw conv (C_in -> r, no bias) then 1x1 conv (r -> C_out, bias)."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        self.down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, conv: nn.Conv2d, rank: int) -> LowRankConv2d:
        new = cls(conv, rank).to(conv.weight.device, conv.weight.dtype)
        a, b = svd_factors(conv.weight.flatten(1), rank)  # kernel as (C_out, C_in·kh·kw)
        new.down.weight.copy_(a.view_as(new.down.weight))  # (r, C_in, kh, kw)
        new.up.weight.copy_(b[:, :, None, None])  # (C_out, r, 1, 1)
        if conv.bias is not None:
            new.up.bias.copy_(conv.bias)
        return new

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        return self.up(self.down(x))


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(m, n) of the weight as a matrix: (out, in) or (C_out, C_in·kh·kw)."""
    return module.weight.shape[0], module.weight[0].numel()


def factorable(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every Linear and ungrouped Conv2d outside the head and attention internals, in module order."""
    attention_out = {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
                     if isinstance(m, nn.MultiheadAttention)}
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
            and name != "head" and not name.startswith("head.") and name not in attention_out}


def choose_rank(weight: Tensor, cfg: SvdConfig) -> int:
    """The rank ``cfg`` asks for on one weight (a Linear's or a conv kernel)."""
    matrix = weight.detach().flatten(1).double()
    if cfg.ratio is not None:
        return max(1, round(cfg.ratio * min(matrix.shape)))
    return energy_rank(torch.linalg.svdvals(matrix), cfg.energy)


def factorize(model: nn.Module, cfg: SvdConfig) -> dict[str, int]:
    """Replace, in place, every factorable layer whose rank pays off; returns {module name: rank}."""
    ranks = {}
    for name, module in factorable(model).items():
        rank = choose_rank(module.weight, cfg)
        if pays_off(rank, *_matrix_shape(module)):
            ranks[name] = rank
    factorize_with_ranks(model, ranks)
    return ranks


def factorize_with_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace, in place, each named Linear/Conv2d by its rank-r factorization (from its weights)."""
    layers = factorable(model)
    for name, rank in ranks.items():
        if name not in layers:
            raise ValueError(f"svd ranks: {name!r} is not a factorable layer of this model; "
                             f"factorable: {', '.join(layers) or 'none'}")
        layer = layers[name]
        new = (LowRankLinear.from_dense(layer, rank) if isinstance(layer, nn.Linear)
               else LowRankConv2d.from_dense(layer, rank))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def prune_svd(ctx: PruneContext, cfg: SvdConfig) -> Pruned:
    """The registry entry: factorize in place; the ranks go into the artifact's model spec."""
    ranks = factorize(ctx.model, cfg)
    return Pruned(ctx.model, ranks=ranks, report={"ranks": ranks})
