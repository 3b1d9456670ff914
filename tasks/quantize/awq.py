"""AWQ: activation-aware per-input-channel scaling before quantization, plus clipping.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024 (METHODS.md §5 ``awq``).
Weights that meet large activations matter most; scaling their input channel up by s before
quantization and the activation down by 1/s keeps the product but shrinks their relative
rounding error. For a weight W (N, K) with calibration inputs X (M, K):

    s_x = mean |x| per input channel;  for α in {0, 1/n, …, (n−1)/n}  (n = ``grid`` = 20):
        s = clamp(s_x^α, 1e-4) / √(max s · min s)
        err(α) = mean (Q(W·diag(s))·diag(s)⁻¹ Xᵀ − W Xᵀ)²
    keep the α of least error (α = 0 is s = 1: RTN exactly, so never worse than RTN here).

Then (``clip``) each (row, group) of W·diag(s) is clamped to ±shrink·max|w| for the shrink in
{1, 1 − 1/20, …, 1 − max_shrink + 1/20} whose group partial output Σ_{k∈group} ŵ_k x_k/s_k has
least mean squared error on the calibration rows (all of them by default; ``clip_rows`` evenly
spaced ones if set).

Checked against the authors' reference code (mit-han-lab/llm-awq, ``auto_scale.py``
``_search_module_scale`` and ``auto_clip.py`` ``auto_clip_layer``): the 20-point α grid from 0,
the clamp at 1e-4 and the √(max·min) normalisation, the MSE score, the clip grid, and that
clipping sees the scaled weight and the x/s inputs. The reference scores clipping on 512
tokens taken by stride; at this scale all rows are cheap, and a stride over conv positions
aliases with the image width (it kept 2 of 64 positions per image). Here the score is
the layer's own output (the reference scores a whole attention or MLP block where several
projections share one input), the grid is this stage's (``rtn.fit_grid``), and the clip search
covers channel and group grids (a tensor grid gets the scale search only).

Where 1/s goes: the reference folds it into the previous LayerNorm or Linear. This stage
quantizes layers in order, so the previous layer is already quantized; instead the layer keeps
``input_scale`` = 1/s (per input feature of a Linear, per input channel of a Conv2d, where s_x
averages |x| over the channel's kh·kw taps, padding included) and multiplies its input by it:
the loaded model computes exactly Q(W·diag(s))·(x/s). An attention's stacked q/k/v
in-projection (``<attn>.in_proj``, ``attention.py``) is one layer here, so q, k and v share one s
(from the attention's input, as the reference's block-level search does). Its previous op is the
ViT block's LayerNorm norm1, into whose affine 1/s would fold exactly (METHODS.md "Scale
folding"); it is not folded either: the in-projection keeps ``input_scale`` like every other
layer, so every layer's input scaling is stored one way and LoRC's V̂ stays on the unscaled input.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from tasks.quantize.layerwise import QuantizedLayer, quantize_in_order
from tasks.quantize.rtn import GridConfig, fake_quantize, group_size, quantize_weight


class AwqConfig(GridConfig):
    """One AWQ variant: the grid plus AWQ's search settings."""

    method: Literal["awq"]
    grid: int = Field(default=20, ge=1, description="α values tried in [0, 1), and the clip grid's denominator")
    clip: bool = Field(default=True, description="search a per-group clipping range after the scales")
    max_shrink: float = Field(default=0.5, gt=0, le=1, description="largest fraction of max|w| the clip search removes")
    clip_rows: int | None = Field(
        default=None, ge=1,
        description="calibration rows (tokens, conv positions) the clip search scores, evenly spaced; None = all")


def input_channel_means(x: Tensor, taps: int) -> Tensor:
    """s_x: mean |x| per input channel of x (M, C·taps) -> (C,)."""
    return x.abs().reshape(len(x), -1, taps).mean(dim=(0, 2))


def search_scales(w: Tensor, x: Tensor, taps: int, cfg: AwqConfig) -> tuple[Tensor, float]:
    """The per-input-channel scales s (C,) of least output error, and the α that gave them."""
    s_x = input_channel_means(x, taps)
    target = x @ w.t()  # (M, N)
    best: tuple[float, Tensor, float] | None = None
    for i in range(cfg.grid):
        alpha = i / cfg.grid
        s = s_x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        cols = s.repeat_interleave(taps)  # (K,)
        w_hat = fake_quantize(w * cols, cfg) / cols
        err = float((x @ w_hat.t() - target).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def clip_weight(w: Tensor, x: Tensor, cfg: AwqConfig) -> Tensor:
    """w (N, K) clamped per (row, group) to the shrunk range of least partial-output error on x (M, K)."""
    n, k = w.shape
    g = group_size(cfg, k)
    rows = x if cfg.clip_rows is None or cfg.clip_rows >= len(x) else x[torch.linspace(0, len(x) - 1, cfg.clip_rows).long()]  # (T, K)
    wg, xg = w.reshape(n, k // g, g), rows.reshape(len(rows), k // g, g)
    target = torch.einsum("ngk,tgk->ntg", wg, xg)  # (N, T, G) partial outputs per group
    top = wg.abs().amax(dim=2, keepdim=True)  # (N, G, 1)
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    for i in range(int(cfg.max_shrink * cfg.grid)):
        bound = top * (1 - i / cfg.grid)
        q = fake_quantize(torch.clamp(wg, -bound, bound).reshape(n, k), cfg).reshape(n, k // g, g)
        err = (torch.einsum("ngk,tgk->ntg", q, xg) - target).pow(2).mean(dim=1)[..., None]  # (N, G, 1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, bound, best)
    return torch.clamp(wg, -best, best).reshape(n, k)


def awq_layer(w: Tensor, x: Tensor, taps: int, cfg: AwqConfig) -> QuantizedLayer:
    """AWQ one layer: w (N, K), x (M, K) with ``taps`` columns per input channel."""
    s, _ = search_scales(w, x, taps, cfg)
    cols = s.repeat_interleave(taps)
    scaled = w * cols
    if cfg.clip and cfg.granularity != "tensor":
        scaled = clip_weight(scaled, x / cols, cfg)
    return QuantizedLayer(quantize_weight(scaled, cfg), input_scale=(1 / s).float())


def quantize_awq(model: nn.Module, x: Tensor, cfg: AwqConfig) -> dict[str, QuantizedLayer]:
    """AWQ every quantizable layer in forward order on calibration inputs ``x``."""
    return quantize_in_order(model, x, cfg, awq_layer)
