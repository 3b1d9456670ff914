"""orthogonal: Saxe, McClelland & Ganguli, "Exact Solutions to the Nonlinear Dynamics of
Learning in Deep Linear Neural Networks" (ICLR 2014).

QR of a Gaussian with the sign fix (Mezzadri 2007), so Q is Haar-distributed; times the gain.
A (out, in, kh, kw) kernel is treated as the (out, in·kh·kw) matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def orthogonal(w: Tensor, g: torch.Generator, gain: float = math.sqrt(2.0)) -> Tensor:
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # sign fix: makes Q uniform (Haar) over orthogonal matrices
    q = q if rows >= cols else q.T  # (rows, cols) with orthonormal rows or columns
    return (gain * q).to(w.dtype).reshape(w.shape)
