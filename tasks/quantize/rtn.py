"""RTN: round-to-nearest weight quantization with the uniform quantizer (the PTQ baseline).

Every PTQ method in this stage is compared with RTN (METHODS.md §5 ``rtn``). The
quantizer is the one in METHODS.md "Shared definitions":

    q = clamp(round(w / s) + z, qmin, qmax),    ŵ = s · (q − z)

- symmetric b-bit: z = 0, q ∈ [−2^(b−1), 2^(b−1) − 1], s = max|w| / (2^(b−1) − 1);
- asymmetric b-bit: q ∈ [0, 2^b − 1], s = (max − min) / (2^b − 1), z = round(−min / s).
  The range is widened to include 0 (min ≤ 0 ≤ max, as PyTorch's observers do) so
  that z is itself a valid code and 0 is represented exactly.

Statistics are taken per tensor, per output channel (row), or per group of
``group_size`` consecutive input channels. An all-zero range gets s = 1 (any positive
scale reproduces it exactly). Codes, scales and zero-points are returned (not only ŵ)
so the packed storage and ``kernels/`` can run the real low-bit matmul.

``GridConfig`` holds the grid settings every PTQ method's config shares, so GPTQ and AWQ are
compared with RTN on the same grid; ``fit_grid`` and ``round_to_grid`` are the two halves of
the quantizer that GPTQ calls column by column. Two options of the grid apply to every method
but are implemented once outside it: ``lorc_rank``/``lorc_bits`` (``lorc.py``, after any PTQ
method) and ``group_axis`` (``adadim.py``; rtn, adadim and gptq).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

AXIS_METHODS = {"output": ("rtn", "adadim", "gptq"), "adaptive": ("adadim", "gptq")}  # methods that take group_axis != input
NO_LORC_METHODS = ("qat",)  # methods that train their weights: LoRC's post-training correction does not apply


class GridConfig(BaseModel):
    """The uniform grid every PTQ variant quantizes onto (``quantize.variants[*]``); each
    method's config adds its own settings to these."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="variant name used for the artifact, e.g. 'int8' or 'w4g32'")
    method: str = Field(description="the registry key of the method: rtn, gptq or awq")
    bits: Literal[2, 3, 4, 8] = Field(description="bits per weight code")
    granularity: Literal["tensor", "channel", "group"] = Field(
        default="channel", description="one scale per tensor, per output channel, or per input-channel group")
    group_size: int = Field(default=32, ge=2, description="input channels per group (granularity: group)")
    symmetric: bool = Field(default=True, description="zero-point fixed at 0 (True) or fitted per range (False)")
    group_axis: Literal["input", "output", "adaptive"] = Field(
        default="input",
        description="the axis a scale's weights run along: 'input' = one scale per output row and group of "
                    "input channels (scales (N, K/g)); 'output' = one scale per input column and group of output "
                    "rows (scales (N/g, K), AdaDim's per-IC); 'adaptive' = the one of least calibration output "
                    "error per layer (methods rtn [input, output], adadim and gptq; adaptive needs adadim or gptq)")
    lorc_rank: int = Field(
        default=0, ge=0,
        description="LoRC (ZeroQuant-V2): rank r of the SVD correction of each layer's quantization error, "
                    "added after any PTQ method; 0 = off, 2/4/8 typical")
    lorc_bits: Literal[8, 16] = Field(
        default=16, description="storage of LoRC's factors: 16 = float16, 8 = int8 symmetric per row")

    @model_validator(mode="after")
    def _group_size_is_power_of_two(self) -> GridConfig:
        g = self.group_size
        if self.granularity == "group" and (g < 16 or g & (g - 1)):
            raise ValueError(f"quantize.group_size: {g} is not a power of two >= 16 "
                             "(16, 32, 64, 128, ...); granularity 'group' needs one")
        return self

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> GridConfig:
        if self.group_axis != "input" and self.method not in AXIS_METHODS[self.group_axis]:
            raise ValueError(f"quantize.group_axis: {self.group_axis!r} is supported by method "
                             f"{' or '.join(AXIS_METHODS[self.group_axis])}, not {self.method!r}")
        if self.lorc_rank and self.method in NO_LORC_METHODS:
            # QAT trains its latent weights: an SVD of (base W − Ŵ) would pull the result back toward
            # the untrained base; ZeroQuant-V2 defines LoRC as a post-training add-on
            raise ValueError(f"quantize.lorc_rank: LoRC corrects post-training quantization error; "
                             f"method {self.method!r} trains its weights, set lorc_rank: 0")
        return self


class RtnConfig(GridConfig):
    """One RTN variant: round every weight to the nearest point of the grid, no calibration."""

    method: Literal["rtn"] = "rtn"


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes plus the grid that maps them back: ŵ = scales · (codes − zeros), group-wise.

    codes: (N, K), int8 when symmetric (signed codes), uint8 when asymmetric.
    scales: (N, K // group_size) float32; per-tensor and per-channel use group_size = K
        (a single column; per-tensor rows all hold the same scale).
    zeros: (N, K // group_size) float32 integer-valued zero-points, or None when symmetric.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def group_size(cfg: GridConfig, k: int) -> int:
    """Input channels per scale for a weight with ``k`` input columns (k itself unless grouped)."""
    if cfg.granularity != "group":
        return k
    if k % cfg.group_size:
        raise ValueError(f"quantize.group_size: {cfg.group_size} does not divide in_features {k}")
    return cfg.group_size


def fit_grid(wg: Tensor, cfg: GridConfig, per_tensor: bool) -> tuple[Tensor, Tensor | None]:
    """Scale and zero-point per group row of ``wg`` (N, G, g) -> (N, G) each."""
    dims = (0, 1, 2) if per_tensor else (2,)
    if cfg.symmetric:
        s = wg.abs().amax(dim=dims, keepdim=True) / (2 ** (cfg.bits - 1) - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s.expand(*wg.shape[:2], 1).squeeze(-1), None
    lo = wg.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = wg.amax(dim=dims, keepdim=True).clamp(min=0)
    s = (hi - lo) / (2**cfg.bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s)
    return s.expand(*wg.shape[:2], 1).squeeze(-1), z.expand(*wg.shape[:2], 1).squeeze(-1)


def round_to_grid(w: Tensor, s: Tensor, z: Tensor | None, cfg: GridConfig) -> Tensor:
    """Float codes clamp(round(w / s) + z, qmin, qmax); s and z broadcast against w."""
    q = torch.round(w / s)
    if z is not None:
        q = q + z
    return q.clamp(*code_range(cfg.bits, cfg.symmetric))


def quantize_weight(w: Tensor, cfg: GridConfig) -> QuantizedWeight:
    """Round-to-nearest a weight matrix (N, K) = (out_features, in_features)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D weight (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    g = group_size(cfg, k)
    wg = w.detach().float().reshape(n, k // g, g)  # (N, G, g)
    s, z = fit_grid(wg, cfg, per_tensor=cfg.granularity == "tensor")  # (N, G) each
    q = round_to_grid(wg, s[..., None], None if z is None else z[..., None], cfg).reshape(n, k)  # (N, K)
    codes = q.to(torch.int8 if cfg.symmetric else torch.uint8)
    return QuantizedWeight(codes=codes, scales=s.contiguous(), zeros=None if z is None else z.contiguous(),
                           bits=cfg.bits, group_size=g, shape=(n, k))


def dequantize(qw: QuantizedWeight) -> Tensor:
    """ŵ = s · (q − z) as a float32 (N, K) tensor."""
    n, k = qw.shape
    q = qw.codes.float().reshape(n, k // qw.group_size, qw.group_size)  # (N, G, g)
    if qw.zeros is not None:
        q = q - qw.zeros.float()[..., None]
    return (q * qw.scales.float()[..., None]).reshape(n, k)


def fake_quantize(w: Tensor, cfg: GridConfig) -> Tensor:
    """Q(w) = dequantize(quantize_weight(w)) in w's shape and dtype."""
    return dequantize(quantize_weight(w, cfg)).to(w.dtype)
