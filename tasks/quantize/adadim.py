"""AdaDim: per-layer choice of the axis quantization groups run along (``group_axis``).

Heo, Kim, Kwon, Kim, Kwon, Lee, "Rethinking Channel Dimensions to Isolate Outliers for
Low-bit Weight Quantization of Large Language Models", ICLR 2024 (METHODS.md §5 "PTQ
options"). Weight-only quantization usually groups a weight W (N, K) along its input
dimension: each output row n has its own scales over groups of input channels (scales
(N, K/g); the paper's "per-OC"; here ``group_axis: input``). Activation outliers live in a
few input channels and the weights they meet are the sensitive ones, so the paper proposes
"per-IC" quantization: groups *within* each input channel, i.e. one scale per input column k
and group of g output rows (scales (N/g, K); here ``group_axis: output``), which isolates an
outlier input channel in its own groups instead of stretching the range of every row's group
that contains it.

AdaDim picks, per layer, the axis of least reconstruction error on a small calibration set;
here the criterion is the layer's calibration output error ‖X Wᵀ − X Ŵᵀ‖_F² (X (M, K) the
layer's inputs, the same objective GPTQ and AWQ minimise; ties keep the input axis). The
paper augments RTN and GPTQ with it; this module implements the RTN variant (``method:
adadim`` = RTN's grid with ``group_axis: adaptive``); ``method: rtn`` takes the fixed axes.

Here a layer is quantized on either axis only when its K fits the grid (``layerwise.fits``),
and on the output axis only when N fits it too (g divides N; 4-bit needs N even), else it keeps
the input axis; a layer the calibration forward never reaches keeps the input axis as well.
Output-axis layers store the codes of Wᵀ (``packed.py``) and are dequantized at load: the packed
CPU and GPU kernels need groups along K, so the per-IC layers save bytes, not latency (the
paper writes its own kernel for them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from tasks.quantize.layerwise import (
    QuantizedLayer,
    fits,
    quantize_in_order,
    quantize_layer,
    quantize_rtn,
)
from tasks.quantize.rtn import GridConfig

Axis = Literal["input", "output"]


class AdadimConfig(GridConfig):
    """One AdaDim variant: RTN's grid, the group axis picked per layer by calibration error."""

    method: Literal["adadim"]
    group_axis: Literal["input", "output", "adaptive"] = Field(
        default="adaptive", description="adaptive: per layer, the axis of least calibration output error; "
                                        "input or output fix it (as method rtn does)")


def output_error(w: Tensor, layer: QuantizedLayer, x: Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F² of a layer on its calibration inputs x (M, K)."""
    return float((x @ (w - layer.effective_weight()).t()).pow(2).sum())


def candidate_axes(w: Tensor, cfg: GridConfig) -> list[Axis]:
    """The axes w (N, K) can be grouped along on cfg's grid (K is assumed to fit)."""
    return ["input", "output"] if fits(w.shape[0], cfg) else ["input"]


def least_error_layer(w: Tensor, x: Tensor, cfg: GridConfig,
                      quantize_along: Callable[[Axis], QuantizedLayer]) -> QuantizedLayer:
    """The layer ``quantize_along(axis)`` gives on cfg's group axis; ``adaptive`` tries every
    candidate axis and keeps the least calibration output error on x (M, K) (ties: input).
    A fixed output axis falls back to input when N does not fit the grid."""
    if cfg.group_axis == "adaptive":
        axes = candidate_axes(w, cfg) if cfg.granularity != "tensor" else ["input"]
    else:
        axes = ["output"] if cfg.group_axis == "output" and fits(w.shape[0], cfg) else ["input"]
    best: tuple[float, QuantizedLayer] | None = None
    for axis in axes:
        layer = quantize_along(axis)
        err = output_error(w, layer, x) if len(axes) > 1 else 0.0
        if best is None or err < best[0]:
            best = (err, layer)
    return best[1]


def adadim_layer(w: Tensor, x: Tensor, taps: int, cfg: GridConfig) -> QuantizedLayer:
    """RTN of one layer w (N, K) along the axis of least output error on x (M, K); ``taps`` unused."""
    return least_error_layer(w, x, cfg, lambda axis: quantize_layer(w, cfg, axis))


def quantize_adadim(model: nn.Module, x: Tensor | None, cfg: AdadimConfig) -> dict[str, QuantizedLayer]:
    """AdaDim every quantizable layer in forward order on calibration inputs ``x`` (a fixed
    ``group_axis`` is plain RTN along it and needs no ``x``)."""
    if cfg.group_axis != "adaptive":
        return quantize_rtn(model, x, cfg)
    return quantize_in_order(model, x, cfg, adadim_layer)
