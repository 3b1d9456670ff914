"""SmoothQuant: migrate activation outliers into the weights, then W8A8.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (METHODS.md §5 ``smoothquant``).
Activation outliers sit in a few fixed input channels, so per-token int8 activations lose
the small channels to the large ones' step; weights are easy to quantize. A per-input-channel
factor s moves part of that range from X to W without changing the product:

    Y = X·Wᵀ = (X·diag(s)⁻¹)·(W·diag(s))ᵀ,    s_j = max|X_j|^α / max|W_{:,j}|^(1−α)

with max|X_j| over the calibration tokens and max|W_{:,j}| over the output channels; the
migration strength α = 0.5 by default. α = 0 gives s_j = 1/max|W_j| (every weight column
normalised to max 1, the activations keep all the range); α = 1 gives s_j = max|X_j| (every
activation channel normalised to max 1, the weights take all the range). At α = 0.5 both
sides end with the same channel range √(max|X_j|·max|W_j|).
Then W·diag(s) is quantized int8 symmetric per output channel (or per tensor), and at run
time X·diag(s)⁻¹ is quantized int8 symmetric *dynamically*, scale = max|x_row|/127 per token
(``activations: per_token``) or max|X|/127 per call (``per_tensor``), int8×int8 → int32 and
a float rescale by (activation scale ⊗ weight scale) (``kernels.w8a8``).

Checked against the authors' reference code (mit-han-lab/smoothquant, ``smooth.py``
``smooth_ln_fcs`` and ``fake_quant.py``): the formula, weight maxima per input channel over
``weight.abs().max(dim=0)`` clamped at 1e-5, the final clamp of s at 1e-5, absmax/127
symmetric per-channel weights and per-token activations; and (``calibration.py``
``get_act_scales``) the calibration statistic, max |x| per input channel over all tokens. Differences: the
reference shares one s across the projections reading one LayerNorm (q, k, v) and folds
diag(s)⁻¹ into that LayerNorm; this stage quantizes layer by layer, so each layer keeps its
own s and stores ``input_scale`` = 1/s (as AWQ does, ``packed.py``), multiplying its input
by it before the int8 activation quantizer. A Conv2d gets one s per input channel (maxima
over its kh·kw taps). Layers are calibrated in order on inputs from the already quantized
layers (weights only: the working copy does not simulate earlier layers' int8 activations).
An attention's stacked q/k/v in-projection (``<attn>.in_proj``, ``attention.py``) is one layer,
so q, k and v share one s as in the reference; diag(s)⁻¹ would fold exactly into the ViT block's
norm1 affine (METHODS.md "Scale folding") but, as for every layer here, it stays the layer's
``input_scale`` (nothing is folded).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kernels.w8a8 import quantize_activations, torch_w8a8_matmul
from tasks.quantize.layerwise import QuantizedLayer, quantize_in_order
from tasks.quantize.rtn import GridConfig, quantize_weight

Activations = Literal["per_token", "per_tensor"]
ActivationSetting = Literal["per_token", "per_tensor", "adaptive"]


class SmoothQuantConfig(GridConfig):
    """One SmoothQuant W8A8 variant: int8 symmetric weights, int8 dynamic activations."""

    method: Literal["smoothquant"]
    bits: Literal[8] = Field(default=8, description="weights and activations are int8")
    granularity: Literal["channel", "tensor"] = Field(default="channel", description="one weight scale per output "
                                                      "channel or per tensor")
    symmetric: Literal[True] = Field(default=True, description="absmax int8, zero-point 0 (the int8 GEMM needs it)")
    alpha: float = Field(default=0.5, ge=0, le=1, description="migration strength: 0 leaves the difficulty on the "
                         "activations, 1 moves it all to the weights")
    activations: ActivationSetting = Field(
        default="per_token", description="dynamic int8 activation scale per token (row), one per call, or adaptive: "
        "per layer, per tensor where that costs at most adaptive_tolerance times the per-token layer-output error "
        "on the calibration set, per token elsewhere")
    adaptive_tolerance: float = Field(default=2.0, ge=1, description="activations: adaptive keeps a layer per tensor "
                                      "while its calibration output error is at most this multiple of per-token's")

    @property
    def w8a8(self) -> ActivationSetting:
        """The packed format's W8A8 marker (``packed.packed_layout``): the layers' activation granularity
        (``adaptive``: each layer's own, ``QuantizedLayer.activations``)."""
        return self.activations


def channel_max(x: Tensor, taps: int) -> Tensor:
    """max |x| per input channel of x (M, C·taps) -> (C,)."""
    return x.abs().reshape(len(x), -1, taps).amax(dim=(0, 2))


def smoothing_scales(act_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), per input channel (C,); weight maxima and s clamped at 1e-5.

    A channel that is 0 on every calibration input (a ReLU feature that never fires there) gets
    s_j = 1: the formula's s_j = 1e-5 would multiply that channel by 1e5 at run time, and one
    test input that does fire it would then own the whole per-tensor activation grid."""
    s = (act_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(act_max > 0, s, torch.ones_like(s))


def smoothquant_layer(w: Tensor, x: Tensor, taps: int, cfg: SmoothQuantConfig) -> QuantizedLayer:
    """SmoothQuant one layer: w (N, K), calibration x (M, K) with ``taps`` columns per input channel."""
    s = smoothing_scales(channel_max(x, taps), channel_max(w, taps), cfg.alpha)  # (C,)
    cols = s.repeat_interleave(taps)  # (K,)
    layer = QuantizedLayer(quantize_weight(w * cols, cfg), input_scale=(1 / s).float())
    if cfg.activations == "adaptive":
        return replace(layer, activations=cheapest_activations(layer, w, x, cfg.adaptive_tolerance))
    return layer


def activation_errors(layer: QuantizedLayer, w: Tensor, x: Tensor) -> dict[Activations, float]:
    """‖XWᵀ − W8A8(X)‖_F / ‖XWᵀ‖_F of the layer on calibration x (M, K), per activation granularity.

    Per tensor, the one grid spans all M calibration rows: a batch of that many tokens at run time."""
    ref = x @ w.t()  # (M, N)
    norm = ref.norm().clamp_min(1e-12)
    return {a: float((w8a8_output(layer, x, a) - ref).norm() / norm) for a in ("per_token", "per_tensor")}


def cheapest_activations(layer: QuantizedLayer, w: Tensor, x: Tensor, tolerance: float) -> Activations:
    """per_tensor (one scale per call: no per-row pass, the cheaper kernel call) where its calibration
    output error is at most ``tolerance`` × per-token's, else per_token. Not in the paper, which fixes
    one granularity for the whole model (its O1-O3 levels); outliers concentrate in a few layers
    (in all-MiniLM-L6-v2 the FFN down-projections, whose GELU outputs carry a few huge tokens), so
    those alone pay for per-token scales."""
    errors = activation_errors(layer, w, x)
    return "per_tensor" if errors["per_tensor"] <= tolerance * errors["per_token"] else "per_token"


def quantize_smoothquant(model: nn.Module, x: Tensor, cfg: SmoothQuantConfig) -> dict[str, QuantizedLayer]:
    """SmoothQuant every quantizable layer in forward order on calibration inputs ``x``."""
    return quantize_in_order(model, x, cfg, smoothquant_layer)


def w8a8_output(layer: QuantizedLayer, x: Tensor, activations: Activations = "per_token") -> Tensor:
    """What the loaded W8A8 layer computes (bias excluded) for a Linear's inputs x (M, K) -> (M, N):
    int8(x · input_scale) @ int8 weightᵀ, rescaled (the ``kernels.w8a8`` reference)."""
    qw = layer.weight
    if not qw.symmetric or qw.bits != 8 or qw.group_size != qw.shape[1]:
        raise ValueError("w8a8_output: needs symmetric int8 weights with one scale per output channel or tensor")
    if layer.input_scale is not None:
        x = x * layer.input_scale.repeat_interleave(x.shape[1] // len(layer.input_scale))
    x_q, x_s = quantize_activations(x, activations)
    return torch_w8a8_matmul(x_q, x_s, qw.codes, qw.scales[:, 0].float())
