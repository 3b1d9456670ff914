"""Weight initialisation registry (train.init).

kaiming: He et al., "Delving Deep into Rectifiers" (ICCV 2015), std = gain/sqrt(fan_in), gain sqrt(2).
xavier:  Glorot & Bengio (AISTATS 2010), Var = 2/(fan_in + fan_out).
orthogonal: Saxe et al. (ICLR 2014), QR of a Gaussian with sign fix, times the gain.
Biases start at zero, norms at (1, 0). Every draw uses the generator passed in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _fans(w: Tensor) -> tuple[int, int]:
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def kaiming(w: Tensor, g: torch.Generator) -> Tensor:
    fan_in, _ = _fans(w)
    return torch.randn(w.shape, generator=g) * math.sqrt(2.0 / fan_in)


def xavier(w: Tensor, g: torch.Generator) -> Tensor:
    fan_in, fan_out = _fans(w)
    return torch.randn(w.shape, generator=g) * math.sqrt(2.0 / (fan_in + fan_out))


def orthogonal(w: Tensor, g: torch.Generator, gain: float = math.sqrt(2.0)) -> Tensor:
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # sign fix: makes Q uniform (Haar) over orthogonal matrices
    q = q if rows >= cols else q.T
    return (gain * q).to(w.dtype).reshape(w.shape)


INITS = {"kaiming": kaiming, "xavier": xavier, "orthogonal": orthogonal}


@torch.no_grad()
def initialize(model: nn.Module, name: str, g: torch.Generator) -> nn.Module:
    """Re-draw every weight matrix/kernel with ``name``; zero biases; unit norms."""
    if name not in INITS:
        raise ValueError(f"train.init: {name!r} is not one of {', '.join(INITS)}")
    draw = INITS[name]
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.copy_(draw(module.weight, g))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.copy_(draw(module.in_proj_weight, g))
            module.in_proj_bias.zero_()
    for name_, p in model.named_parameters():
        if name_.endswith("pos"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # ViT position embedding
    return model
