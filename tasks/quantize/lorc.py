"""LoRC: low-rank compensation of the quantization error, an add-on after any PTQ method.

Yao, Wu, Li, Youn, He, "ZeroQuant-V2: Exploring Post-training Quantization in LLMs from
Comprehensive Study to Low Rank Compensation", 2023 (METHODS.md §5 ``lorc``). For a layer with
weight W (N, K) and quantized effective weight Ŵ (``QuantizedLayer.effective_weight``: the
dequantized codes with AWQ's or SmoothQuant's ``input_scale`` folded into the columns):

    E = W − Ŵ = U Σ Vᵀ (SVD),    Û = U_r Σ_r^{1/2} (N, r),    V̂ = Σ_r^{1/2} V_rᵀ (r, K)

and the layer computes Ŵx + Û(V̂x). By Eckart–Young ÛV̂ is the best rank-r approximation of
E, so ‖W − (Ŵ + ÛV̂)‖_F² = Σ_{i>r} σ_i(E)², non-increasing in r. The paper stores the two
factors in 8 bits (``lorc_bits: 8``, here int8 symmetric with one scale per row of each
factor) or keeps them in 16 bits (``lorc_bits: 16``, float16); the extra storage is
r·(N + K) elements per layer, plus the row scales for int8.

How it is applied here: once, by ``apply_lorc``, to every layer a method returned, from the
float model's weights, after the method has finished (the quantize stage and
``packed.quantize_model`` call it for every variant with ``lorc_rank`` > 0). A method that
calibrates layers in order (GPTQ, AWQ) therefore calibrates each layer on inputs from earlier
layers *without* their correction; the paper likewise computes the factors from W and Ŵ alone,
with no calibration data. The factors are rounded to their storage precision here, so what
``effective_weight`` computes is exactly what the packed file reloads.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from kernels.w8a8 import quantize_activations
from tasks.quantize.layerwise import LowRank, QuantizedLayer, layer_weight
from tasks.quantize.rtn import GridConfig


def lorc_factors(e: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Û (N, r), V̂ (r, K) float32 of the error e (N, K), exact (float64 SVD), r = min(rank, N, K)."""
    u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


def low_rank(u: Tensor, v: Tensor, bits: int) -> LowRank:
    """The factors rounded to their storage: float16 values (bits 16) or int8 codes × row scales (8)."""
    if bits == 16:
        return LowRank(u.half().float(), v.half().float())
    # symmetric int8 with one scale per row, max|row| / 127: the per-token activation quantizer's grid
    (qu, su), (qv, sv) = quantize_activations(u, "per_token"), quantize_activations(v, "per_token")
    return LowRank(qu.float() * su[:, None], qv.float() * sv[:, None], su, sv)


def compensate(w: Tensor, layer: QuantizedLayer, rank: int, bits: int = 16) -> QuantizedLayer:
    """``layer`` with LoRC's rank-``rank`` correction of W − Ŵ_eff added; w (N, K) is the float weight."""
    if layer.lorc is not None:
        raise ValueError("lorc: the layer already carries a low-rank correction")
    u, v = lorc_factors(w.detach().float() - layer.effective_weight(), rank)
    return dataclasses.replace(layer, lorc=low_rank(u, v, bits))


def apply_lorc(model: nn.Module, layers: dict[str, QuantizedLayer], cfg: GridConfig) -> dict[str, QuantizedLayer]:
    """Every layer of a method's result with LoRC at cfg.lorc_rank (``layers`` itself when 0);
    ``model`` is the float model the layers were quantized from (not modified)."""
    if not cfg.lorc_rank:
        return layers
    out = {}
    for name, layer in layers.items():
        out[name] = compensate(layer_weight(model, name), layer, cfg.lorc_rank, cfg.lorc_bits)
    return out


def store_low_rank(name: str, lorc: LowRank) -> dict[str, Tensor]:
    """The packed-file tensors of layer ``name``'s factors (layout in ``packed.py``)."""
    if lorc.bits == 16:
        return {f"{name}.lorc_u": lorc.u.half().contiguous(), f"{name}.lorc_v": lorc.v.half().contiguous()}
    codes = {f: torch.round(getattr(lorc, f) / getattr(lorc, f"{f}_scales")[:, None]).to(torch.int8) for f in "uv"}
    return {f"{name}.lorc_u": codes["u"].contiguous(), f"{name}.lorc_v": codes["v"].contiguous(),
            f"{name}.lorc_u_scales": lorc.u_scales.float().contiguous(),
            f"{name}.lorc_v_scales": lorc.v_scales.float().contiguous()}


def read_low_rank(tensors: dict[str, Tensor], name: str, bits: int, n: int, k: int) -> LowRank:
    """Layer ``name``'s factors from packed-file tensors, checked against its weight (n, k).
    Raises KeyError for a missing tensor and ValueError for a wrong dtype or shape."""
    u, v = tensors[f"{name}.lorc_u"], tensors[f"{name}.lorc_v"]
    want = torch.float16 if bits == 16 else torch.int8
    if u.dtype != want or v.dtype != want:
        raise ValueError(f"{name}.lorc_u/lorc_v are {u.dtype}/{v.dtype}, expected {want} (lorc_bits {bits})")
    r = u.shape[-1]
    if u.dim() != 2 or v.dim() != 2 or tuple(u.shape) != (n, r) or tuple(v.shape) != (r, k) or r < 1:
        raise ValueError(f"{name}.lorc_u/lorc_v have shapes {tuple(u.shape)}/{tuple(v.shape)}, "
                         f"expected ({n}, r)/(r, {k})")
    if bits == 16:
        return LowRank(u.float(), v.float())
    su, sv = tensors[f"{name}.lorc_u_scales"].float(), tensors[f"{name}.lorc_v_scales"].float()
    if tuple(su.shape) != (n,) or tuple(sv.shape) != (r,):
        raise ValueError(f"{name}.lorc_u_scales/lorc_v_scales have shapes {tuple(su.shape)}/{tuple(sv.shape)}, "
                         f"expected ({n},)/({r},)")
    return LowRank(u.float() * su[:, None], v.float() * sv[:, None], su, sv)
