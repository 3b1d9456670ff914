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

``group_axis: output | adaptive`` is AdaDim's pairing with GPTQ (Heo et al., ICLR 2024,
``adadim.py``): per-IC groups (a scale per input column and group of output rows) suit GPTQ's
column order, since each column's grid is fitted from its error-updated values just before the
column is rounded; ``adaptive`` runs GPTQ along both axes and keeps the one of least
calibration output error, per layer.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from tasks.quantize.adadim import Axis, least_error_layer
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


def _column_grid(v: Tensor, cfg: GridConfig, g: int) -> tuple[Tensor, Tensor]:
    """Per-IC grid of one weight column v (N,): a scale and zero per group of g output rows (N/g,)."""
    s, z = fit_grid(v.reshape(1, -1, g), cfg, per_tensor=False)  # (1, N/g)
    return s[0], (z[0] if z is not None else torch.zeros_like(s[0]))


def gptq_weight(w: Tensor, h: Tensor, cfg: GptqConfig, axis: Axis = "input") -> QuantizedWeight:
    """Quantize w (N, K) against the Hessian h (K, K) of its inputs; codes in w's column order.

    ``axis: output`` (AdaDim's per-IC, ``adadim.py``) gives every input column its own scales, one
    per group of g output rows, fitted when the column comes up (from W with ``static_groups``);
    the result then holds Wᵀ's codes and scales (K, N/g), as ``layerwise.quantize_layer`` stores it.
    """
    w, h = w.detach().double().clone(), h.double().clone()
    n, k = w.shape
    per_ic = axis == "output"
    g = group_size(cfg, n if per_ic else k)  # weights per scale, along N (per-IC) or along K
    grouped = cfg.granularity == "group"
    shape = (k, n // g) if per_ic else (n, k // g)
    scales, zeros = torch.ones(shape, dtype=w.dtype), torch.zeros(shape, dtype=w.dtype)
    if not grouped and not per_ic:  # one grid for the whole row (channel) or matrix (tensor), from W as given
        s, z = fit_grid(w[:, None, :], cfg, per_tensor=cfg.granularity == "tensor")  # (N, 1)
        scales, zeros = s, (z if z is not None else zeros)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if cfg.static_groups and (grouped or per_ic):
        s, z = fit_grid(w.t().reshape(k, n // g, g) if per_ic else w.reshape(n, k // g, g), cfg, per_tensor=False)
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
            if per_ic:  # this column's own grid, repeated over the rows of each group
                src = int(perm[col])
                if not cfg.static_groups:
                    scales[src], zeros[src] = _column_grid(w1[:, i], cfg, g)
                s, z = scales[src].repeat_interleave(g), zeros[src].repeat_interleave(g)  # (N,)
            else:
                grp = int(perm[col]) // g  # the stored group of this column
                if grouped and not cfg.static_groups and col % g == 0:  # a group starts (perm is the identity)
                    gs, gz = fit_grid(w[:, None, col:col + g], cfg, per_tensor=False)
                    scales[:, grp], zeros[:, grp] = gs[:, 0], (gz[:, 0] if gz is not None else 0)
                s, z = scales[:, grp], zeros[:, grp]
            z = None if cfg.symmetric else z
            q = round_to_grid(w1[:, i], s, z, cfg)  # (N,)
            codes[:, col] = q
            e = (w1[:, i] - s * (q - (z if z is not None else 0))) / u[col, col]  # (N,)
            w1[:, i:] -= e[:, None] * u[col, col:i2][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy batch update of the columns after the block
    codes = codes[:, torch.argsort(perm)]
    if per_ic:
        codes = codes.t()
    return QuantizedWeight(codes=codes.contiguous().to(torch.int8 if cfg.symmetric else torch.uint8),
                           scales=scales.float().contiguous(),
                           zeros=None if cfg.symmetric else zeros.float().contiguous(),
                           bits=cfg.bits, group_size=g, shape=(k, n) if per_ic else (n, k))


def _gptq_layer(w: Tensor, x: Tensor, taps: int, cfg: GptqConfig) -> QuantizedLayer:
    """GPTQ along cfg's group axis; ``adaptive`` (AdaDim + GPTQ) keeps the axis of least output error."""
    h = hessian(x)
    return least_error_layer(w, x, cfg, lambda axis: QuantizedLayer(gptq_weight(w, h, cfg, axis), group_axis=axis))


def quantize_gptq(model: nn.Module, x: Tensor, cfg: GptqConfig) -> dict[str, QuantizedLayer]:
    """GPTQ every quantizable layer in forward order on calibration inputs ``x``."""
    return quantize_in_order(model, x, cfg, _gptq_layer)
