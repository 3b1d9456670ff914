"""GPTQ: column-by-column quantization with second-order error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (METHODS.md §5 ``gptq``). For a weight W
(N, K) with calibration inputs X (M, K), GPTQ minimises ‖W Xᵀ − Ŵ Xᵀ‖² one input column at a
time (the paper's Algorithm 1):

    H = 2 XᵀX / M + δ I,    δ = damp · mean(diag H)          (layer Hessian, dampened)
    U = chol(H⁻¹) upper,    H⁻¹ = UᵀU
    for column i: q_i = Q(w_i);  e = (w_i − q_i) / U_ii;  W[:, i+1:] −= e ⊗ U[i, i+1:]

with the error of each column pushed onto the columns not yet quantized ("lazy batch
updates": inside a block of ``block_size`` columns the update is applied column by column,
to the rest of the matrix once per block as E · U[block, rest]).

Reconstructed from the authors' reference code (IST-DASLab/gptq, ``gptq.py`` ``fasterquant``)
and checked line by line against it:

- dead inputs (diag H = 0, an input that is always 0 on the calibration set): H_ii = 1 and
  the weight column is set to 0 before anything else;
- H⁻¹'s upper Cholesky factor is chol(H⁻¹, upper) with H⁻¹ solved from chol(H) (the reference
  calls ``cholesky_inverse``; ``cholesky_solve`` against I gives the same matrix, faster here);
- H and the updates are in float64 (the reference: float32);
- ``act_order`` quantizes columns by descending diag H and undoes the permutation before
  storage; ``static_groups`` fits every group's grid up front from W (after dead columns are
  zeroed); otherwise a group's grid is fitted when its first column comes up, from the
  reference's ``W[:, i:i+g]``: the weights with every earlier block's update applied but not
  the updates from earlier columns of the current block (the reference's behaviour, kept);
- per-channel and per-tensor grids are fitted once from the whole W before the dead columns
  are zeroed, as the reference's ``find_params(W)``.

Not the reference's: the grid is this stage's (``rtn.fit_grid``, METHODS.md "Shared
definitions"), so GPTQ and RTN are compared on the same grid; and since packed storage keeps
contiguous groups (no per-column group index), ``act_order`` with groups needs
``static_groups``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from tasks.quantize.layerwise import QuantizedLayer, quantize_in_order
from tasks.quantize.rtn import GridConfig, QuantizedWeight, fit_grid, group_size, round_to_grid


class GptqConfig(GridConfig):
    """One GPTQ variant: the grid plus GPTQ's own settings."""

    method: Literal["gptq"]
    block_size: int = Field(default=128, ge=1, description="columns per lazy batch update")
    damp: float = Field(default=0.01, gt=0, description="dampening δ as a fraction of mean(diag H)")
    act_order: bool = Field(default=False, description="quantize columns by descending diag H (activation order)")
    static_groups: bool = Field(default=False, description="fit every group's grid from W before any update")

    @model_validator(mode="after")
    def _act_order_groups_are_static(self) -> GptqConfig:
        if self.act_order and self.granularity == "group" and not self.static_groups:
            raise ValueError("quantize.variants: act_order with granularity 'group' needs static_groups: true "
                             "(packed storage keeps contiguous groups)")
        return self


def hessian(x: Tensor) -> Tensor:
    """H = 2 XᵀX / M of calibration inputs x (M, K) -> (K, K), accumulated in float64."""
    x = x.double()
    return (2.0 / len(x)) * (x.t() @ x)


def _upper_inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """U upper with H⁻¹ = UᵀU, H dampened by damp · mean(diag H) (modified in place)."""
    h.diagonal().add_(damp * h.diagonal().mean())
    eye = torch.eye(len(h), dtype=h.dtype)
    # H⁻¹ from chol(H) by triangular solves: what the reference's cholesky_inverse computes, which
    # takes ~11 s for K = 1568 on this CPU build against 0.4 s here
    h_inv = torch.cholesky_solve(eye, torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


def gptq_weight(w: Tensor, h: Tensor, cfg: GptqConfig) -> QuantizedWeight:
    """Quantize w (N, K) against the Hessian h (K, K) of its inputs; codes in w's column order."""
    w, h = w.detach().double().clone(), h.double().clone()
    n, k = w.shape
    g = group_size(cfg, k)
    grouped = cfg.granularity == "group"
    scales, zeros = torch.ones(n, k // g, dtype=w.dtype), torch.zeros(n, k // g, dtype=w.dtype)
    if not grouped:  # one grid for the whole row (channel) or matrix (tensor), from W as given
        s, z = fit_grid(w[:, None, :], cfg, per_tensor=cfg.granularity == "tensor")  # (N, 1)
        scales, zeros = s, (z if z is not None else zeros)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if grouped and cfg.static_groups:
        s, z = fit_grid(w.reshape(n, k // g, g), cfg, per_tensor=False)  # (N, G)
        scales, zeros = s, (z if z is not None else zeros)
    perm = torch.argsort(h.diagonal(), descending=True) if cfg.act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    u = _upper_inverse_cholesky(h, cfg.damp)
    codes = torch.zeros_like(w)  # (N, K) in quantization order
    for i1 in range(0, k, cfg.block_size):
        i2 = min(i1 + cfg.block_size, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype)
        for i in range(i2 - i1):
            col = i1 + i
            grp = int(perm[col]) // g  # the stored group of this column
            if grouped and not cfg.static_groups and col % g == 0:  # a group starts (perm is the identity here)
                s, z = fit_grid(w[:, None, col:col + g], cfg, per_tensor=False)
                scales[:, grp], zeros[:, grp] = s[:, 0], (z[:, 0] if z is not None else 0)
            s, z = scales[:, grp], (zeros[:, grp] if not cfg.symmetric else None)
            q = round_to_grid(w1[:, i], s, z, cfg)  # (N,)
            codes[:, col] = q
            e = (w1[:, i] - s * (q - (z if z is not None else 0))) / u[col, col]  # (N,)
            w1[:, i:] -= e[:, None] * u[col, col:i2][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy batch update of the columns after the block
    codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes=codes.to(torch.int8 if cfg.symmetric else torch.uint8),
                           scales=scales.float().contiguous(),
                           zeros=None if cfg.symmetric else zeros.float().contiguous(),
                           bits=cfg.bits, group_size=g, shape=(n, k))


def _gptq_layer(w: Tensor, x: Tensor, taps: int, cfg: GptqConfig) -> QuantizedLayer:
    return QuantizedLayer(gptq_weight(w, hessian(x), cfg))


def quantize_gptq(model: nn.Module, x: Tensor, cfg: GptqConfig) -> dict[str, QuantizedLayer]:
    """GPTQ every quantizable layer in forward order on calibration inputs ``x``."""
    return quantize_in_order(model, x, cfg, _gptq_layer)
