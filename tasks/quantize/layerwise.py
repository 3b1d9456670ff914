"""Layer-by-layer PTQ: which layers are quantized, the order they go in, and their inputs.

METHODS.md §5: "Layers go in order, each calibrated on inputs from the *already quantized*
layers before it." ``quantize_in_order`` runs a calibrated method that way (GPTQ's and
AWQ's reference code quantize one transformer block at a time and feed the next block the
quantized block's outputs; here the unit is one Linear/Conv2d):

1. the forward order of the quantizable layers is read from forward pre-hooks on one
   calibration example;
2. for each layer, the calibration set runs through a working copy of the model in which
   every earlier layer already holds its quantized weight; a pre-hook takes the layer's
   input and stops the forward there;
3. the input becomes the (M, K) matrix X the weight (N, K) multiplies: a Linear's rows
   (tokens), or a Conv2d's unfolded patches (``F.unfold``, K = C_in·kh·kw in the order of
   ``weight.flatten(1)``, padding included), so that W·Xᵀ is the layer's output;
4. the method quantizes the weight from (W, X); the layer's effective weight replaces W in
   the working copy before the next layer is calibrated.

The calibration inputs (``Calibration``) are one tensor, run as ``model(x)``, or a mapping of
keyword tensors, run as ``model(**x)`` (a tokenizer's ``input_ids`` + ``attention_mask`` for a
Hugging Face encoder). A mapping's ``attention_mask`` (B, T) marks the real tokens: a Linear's
input (B, T, K) contributes only those rows to X, so padding never enters GPTQ's H or AWQ's and
SmoothQuant's channel statistics, and sentences of any length calibrate together as they are
encoded (cutting them to one length instead would drop each sentence's tail and [SEP]).

The model every method works on is ``working_copy``'s: each attention split (``attention.py``)
so that its stacked q/k/v in-projection is one more Linear layer, ``<attn>.in_proj`` (weight
in_proj_weight (3·inner, width), input X the attention's query input), and its out_proj is
called as a module (nn.MultiheadAttention's fused forward reads ``out_proj.weight`` instead).
Layer names are the working copy's; ``layer_weight`` reads a layer's float weight by that name
from either model. A layer the calibration forward never calls as a module, or whose input
patches unfold cannot reproduce (grouped or non-zero-padded convs), gets no X and is quantized
by RTN. RTN itself (``quantize_rtn``) needs no calibration.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.quantize.attention import in_proj_owners, split_attentions, weight_key
from tasks.quantize.rtn import GridConfig, QuantizedWeight, dequantize, quantize_weight


@dataclass(frozen=True)
class LowRank:
    """LoRC's rank-r correction ÛV̂ of a layer's quantization error (``lorc.py``).

    u: (N, r) float32, v: (r, K) float32, the values the layer uses: already rounded to their
        storage (float16 values, or int8 codes times the row scales), so a stored and reloaded
        layer computes exactly this.
    u_scales (N,), v_scales (r,): float32 per-row scales when the factors are stored as int8
        (u = codes · u_scales row-wise); None for float16 storage.
    """

    u: Tensor
    v: Tensor
    u_scales: Tensor | None = None
    v_scales: Tensor | None = None

    @property
    def bits(self) -> int:
        return 16 if self.u_scales is None else 8


@dataclass(frozen=True)
class QuantizedLayer:
    """A method's result for one layer: the codes and, for AWQ, the input scaling.

    input_scale: (C_in,) float32 or None: the layer computes ŵ·(x ⊙ input_scale), one factor
        per input feature (Linear) or input channel (Conv2d, shared by its kh·kw taps).
    group_axis: "input" (``weight`` holds W (N, K), groups along K) or "output" (``weight`` holds
        Wᵀ (K, N), so its groups run along the output rows of W: AdaDim's per-IC, ``adadim.py``).
    lorc: LoRC's low-rank correction, or None: the layer computes ŵ_eff·x + Û(V̂x) on its
        original input x (before input_scale).
    activations: a W8A8 layer's own activation granularity ("per_token" or "per_tensor") where
        the method chose it per layer (SmoothQuant's ``activations: adaptive``), else None.
    """

    weight: QuantizedWeight
    input_scale: Tensor | None = None
    group_axis: Literal["input", "output"] = "input"
    lorc: LowRank | None = None
    activations: Literal["per_token", "per_tensor"] | None = None

    def effective_weight(self) -> Tensor:
        """(N, K) float32 dense weight computing the same function: ŵ (transposed back for an
        output-axis layer) with input_scale folded into its columns, plus ÛV̂."""
        w = dequantize(self.weight)
        if self.group_axis == "output":
            w = w.t().contiguous()
        if self.input_scale is not None:
            w = w * self.input_scale.repeat_interleave(w.shape[1] // len(self.input_scale))[None, :]
        if self.lorc is not None:
            w = w + self.lorc.u @ self.lorc.v
        return w


def quantize_layer(w: Tensor, cfg: GridConfig, axis: Literal["input", "output"] | None = None) -> QuantizedLayer:
    """RTN of w (N, K) on cfg's grid with groups along ``axis`` (default cfg.group_axis; adaptive
    means input here). An output-axis layer quantizes Wᵀ, and falls back to the input axis when
    N does not fit the grid (``fits``)."""
    axis = axis or ("output" if cfg.group_axis == "output" else "input")
    if axis == "output" and fits(w.shape[0], cfg):
        return QuantizedLayer(quantize_weight(w.t(), cfg), group_axis="output")
    return QuantizedLayer(quantize_weight(w, cfg))


Calibration = Tensor | Mapping[str, Tensor]  # model(x), or model(**x); every tensor batch-first


def run_model(model: nn.Module, x: Calibration):
    """``model(**x)`` for a mapping of keyword tensors, else ``model(x)``."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def first_example(x: Calibration) -> Calibration:
    """The first example (batch of one) of the calibration inputs."""
    return {k: v[:1] for k, v in x.items()} if isinstance(x, Mapping) else x[:1]


LayerMethod = Callable[[Tensor, Tensor, int, GridConfig], QuantizedLayer]  # (W (N, K), X (M, K), taps, cfg)


def fits(k: int, cfg: GridConfig) -> bool:
    """Whether a weight with ``k`` input columns can be stored on cfg's grid (groups divide k;
    4-bit codes pack two per byte along k)."""
    group_ok = cfg.granularity != "group" or k % cfg.group_size == 0
    return group_ok and (cfg.bits != 4 or k % 2 == 0)


def quantizable(model: nn.Module, cfg: GridConfig) -> dict[str, nn.Linear | nn.Conv2d]:
    """Every Linear/Conv2d whose weight, viewed as (out, in·kh·kw), fits cfg's grid, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and fits(m.weight[0].numel(), cfg)}


def taps(module: nn.Linear | nn.Conv2d) -> int:
    """Weight columns per input channel: kh·kw for a Conv2d, 1 for a Linear."""
    return module.weight[0].numel() // (module.in_channels if isinstance(module, nn.Conv2d) else module.in_features)


def working_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every attention split (``attention.split_attentions``): the
    model the methods quantize, where each in-projection is the Linear layer ``<attn>.in_proj``."""
    work = copy.deepcopy(model).eval()
    split_attentions(work)
    return work


def quantize_rtn(model: nn.Module, x: Tensor | None, cfg: GridConfig) -> dict[str, QuantizedLayer]:
    """The RTN method: every quantizable layer (in-projections included) rounded to the grid
    (groups along cfg.group_axis); ``x`` is not needed."""
    return {name: quantize_layer(weight_matrix(m), cfg) for name, m in quantizable(working_copy(model), cfg).items()}


def weight_matrix(module: nn.Module) -> Tensor:
    return module.weight.detach().float().reshape(module.weight.shape[0], -1)  # (N, K)


def layer_weight(model: nn.Module, name: str) -> Tensor:
    """The float weight (N, K) of layer ``name`` (a working-copy name) of ``model``, split or not."""
    w = model.get_parameter(weight_key(model, name)).detach().float()
    return w.reshape(w.shape[0], -1)


class _Stop(Exception):
    """Raised by a capture hook: nothing after the captured layer needs to run."""


@torch.no_grad()
def forward_order(model: nn.Module, x: Calibration, layers: dict[str, nn.Module]) -> list[str]:
    """Names of ``layers`` in the order a forward of ``x`` first calls them; layers it never
    calls follow in module order."""
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=name: seen.append(n) if n not in seen else None)
             for name, m in layers.items()]
    try:
        run_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in layers if n not in seen]


def _conv_columns(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B·L, C·kh·kw): the patches the kernel multiplies, one row per position."""
    padding = conv.padding
    if isinstance(padding, str):  # 'valid', or 'same' (torch puts an odd extra pad at the end)
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]  # (h, w)
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = 0
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)  # (B, K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _unfoldable(module: nn.Module) -> bool:
    return not isinstance(module, nn.Conv2d) or (module.groups == 1 and module.padding_mode == "zeros")


@torch.no_grad()
def module_call(model: nn.Module, module: nn.Module, x: Calibration) -> tuple[tuple, dict] | None:
    """The (args, kwargs) ``module`` is first called with when ``model`` runs ``x`` (the forward
    stops there), or None if it is never called as a module."""
    seen: list[tuple[tuple, dict]] = []

    def capture(_m, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    hook = module.register_forward_pre_hook(capture, with_kwargs=True)
    with contextlib.suppress(_Stop):
        try:
            run_model(model, x)
        finally:
            hook.remove()
    return seen[0] if seen else None


@torch.no_grad()
def layer_inputs(model: nn.Module, module: nn.Linear | nn.Conv2d, x: Calibration) -> Tensor | None:
    """X (M, K) of ``module`` when ``model`` runs ``x``, or None if it is never called as a module.

    With an ``attention_mask`` (B, T) in ``x``, a Linear input (B, T, K) keeps only the rows of
    real tokens (mask != 0)."""
    call = module_call(model, module, x) if _unfoldable(module) else None
    if call is None:
        return None
    inp = call[0][0].detach().float()
    if isinstance(module, nn.Conv2d):
        return _conv_columns(module, inp)
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    if mask is not None and inp.shape[:-1] == mask.shape:
        return inp[mask != 0]  # (real tokens, K)
    return inp.reshape(-1, inp.shape[-1])


def quantize_in_order(model: nn.Module, x: Calibration | None, cfg: GridConfig,
                      method: LayerMethod) -> dict[str, QuantizedLayer]:
    """Run a calibrated per-layer ``method`` over ``model``'s quantizable layers in forward order,
    each on inputs from the already quantized layers before it. ``model`` is not modified."""
    if x is None:
        raise ValueError(f"quantize.variants: {cfg.name!r} (method {cfg.method}) needs calibration inputs")
    work = working_copy(model)
    layers = quantizable(work, cfg)
    out: dict[str, QuantizedLayer] = {}
    for name in forward_order(work, first_example(x), layers):
        module = layers[name]
        w, cols = weight_matrix(module), layer_inputs(work, module, x)
        out[name] = QuantizedLayer(quantize_weight(w, cfg)) if cols is None else method(w, cols, taps(module), cfg)
        with torch.no_grad():
            module.weight.copy_(out[name].effective_weight().reshape(module.weight.shape))
    return {name: out[name] for name in layers}


@torch.no_grad()
def layer_outputs(model: nn.Module, x: Calibration, names: list[str]) -> dict[str, Tensor]:
    """The output of each named layer when ``model`` runs ``x``; layers not called as modules are left out.
    Names of in-projections of attentions ``model`` holds unsplit are read from its working copy."""
    if in_proj_owners(model, names):
        model = working_copy(model)
    outputs: dict[str, Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, _a, y, n=name: outputs.setdefault(n, y.detach().float())) for name in names]
    try:
        run_model(model.eval(), x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def layer_output_errors(reference: nn.Module, model: nn.Module, x: Calibration, names: list[str]) -> dict[str, float]:
    """‖Y_l − Ŷ_l‖_F / ‖Y_l‖_F of each named layer's output, ``model`` vs ``reference`` on the same
    inputs ``x`` (each layer sees its own model's earlier layers)."""
    ref, got = layer_outputs(reference, x, names), layer_outputs(model, x, names)
    return {n: float((ref[n] - got[n]).norm() / ref[n].norm().clamp_min(1e-12)) for n in ref if n in got}
