"""kaiming: He et al., "Delving Deep into Rectifiers" (ICCV 2015).

W ~ N(0, gain²/fan_in) with gain √2 for ReLU, which keeps the second moment of ReLU
activations constant through depth (the paper's eq. 10). Also the fan helpers and the
Kaiming std that other schemes match (generalized Gaussian, effective rank).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fans(w: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a (out, in, *kernel) weight: channels times the receptive field."""
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def kaiming_std(w: Tensor) -> float:
    fan_in, _ = fans(w)
    return math.sqrt(2.0 / fan_in)


def kaiming(w: Tensor, g: torch.Generator) -> Tensor:
    return torch.randn(w.shape, generator=g) * kaiming_std(w)
