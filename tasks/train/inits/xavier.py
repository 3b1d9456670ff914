"""xavier: Glorot & Bengio, "Understanding the Difficulty of Training Deep Feedforward
Neural Networks" (AISTATS 2010).

W ~ N(0, 2/(fan_in + fan_out)): the compromise between preserving the forward and the
backward variance (the paper's eq. 12, here in its Gaussian form).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tasks.train.inits.kaiming import fans


def xavier(w: Tensor, g: torch.Generator) -> Tensor:
    fan_in, fan_out = fans(w)
    return torch.randn(w.shape, generator=g) * math.sqrt(2.0 / (fan_in + fan_out))
