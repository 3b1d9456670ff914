"""Weight fake-quantizers for QAT, the oscillation tracker, and OFQ's confidence test.

Every quantizer fake-quantizes a weight, viewed as (N, G, g) groups of its (N, K) =
(out, in·kh·kw) matrix, onto the symmetric grid of METHODS.md "Shared definitions":
ŵ = s·q, q = clamp(round(w / s), qmin, qmax), qmin = −2^(b−1), qmax = 2^(b−1) − 1, one step s
per tensor, output channel or group. They differ in where s comes from and in the gradient:

- ``ste`` (Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018): s = max|w| / qmax from the current weights,
  no gradient; ∂ŵ/∂w = 1 inside [qmin·s, qmax·s], 0 outside (the clipped straight-through
  estimator).
- ``lsq`` (Esser et al., "Learned Step Size Quantization", ICLR 2020): s is a parameter,
  initialised to 2·mean|w| / √Q_P (Q_P = qmax, Q_N = −qmin); ∂ŵ/∂w as for ste; ∂ŵ/∂s =
  −w/s + round(w/s) inside the range, −Q_N below, Q_P above (the paper's eq. 3), the gradient
  of s scaled by g = 1/√(N_w·Q_P) (its section 2.2), N_w = the number of weights sharing that
  step (the layer's weight count when per tensor, as in the paper).
- ``ofq`` StatsQ (Liu et al., "Oscillation-free Quantization for Low-bit Vision Transformers",
  ICML 2023, section 5.1; checked against its reference ``StatsQuantizer``): the clip value
  comes from weight statistics, α = 2·mean|w| per unit, detached, and the 2^b levels split
  [−α, α) into steps s = α / 2^(b−1); the gradient to w is the plain identity (the reference
  passes it unclipped). **Deviation:** the paper's levels sit at half steps, s·(k + ½) with no
  zero level; ours are s·k, k ∈ [qmin, qmax] (same range, step and level count, shifted half a
  step) because the packed format and the low-bit kernels store integer codes with zero-point 0.

Steps are rounded to float16 in the forward (straight-through) because the packed artifact
stores scales as float16: the exported model then computes exactly the fake-quant forward.

Oscillation (Nagel et al., "Overcoming Oscillations in Quantization-Aware Training", ICML 2022,
as OFQ's reference ``TrackOscillation`` implements it): at step t a weight oscillates when its
integer code changes in the direction opposite to its previous change; its frequency is the EMA
f_t = m·o_t + (1 − m)·f_{t−1}. ``confident`` is CGA's test (OFQ section 5.2, reference
``freeze_outside_boundary_weight_idx``): a weight whose pre-rounding value w/s lies farther than
``boundary_range`` (in steps) from every rounding threshold between two levels is confident.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from tasks.quantize.rtn import GridConfig, QuantizedWeight, code_range, group_size


def round_pass(x: Tensor) -> Tensor:
    """round(x) in the forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """x in the forward, gradient multiplied by ``scale``."""
    return x * scale + (x - x * scale).detach()


def _fp16(s: Tensor) -> Tensor:
    """s rounded to the nearest float16 (what the packed file stores), straight-through."""
    return s + (s.half().float() - s).detach()


class WeightQuantizer(nn.Module, abc.ABC):
    """Fake-quantizes one weight (N, ...) as a ``torch.nn.utils.parametrize`` parametrization."""

    def __init__(self, weight: Tensor, cfg: GridConfig):
        super().__init__()
        self.bits = cfg.bits
        self.qmin, self.qmax = code_range(cfg.bits, symmetric=True)
        self.group = group_size(cfg, weight[0].numel())
        self.dims = (0, 1, 2) if cfg.granularity == "tensor" else (2,)  # what one step is shared over

    def grouped(self, w: Tensor) -> Tensor:
        return w.reshape(w.shape[0], -1, self.group)  # (N, G, g)

    @abc.abstractmethod
    def step(self, wg: Tensor) -> Tensor:
        """The step s, broadcastable to ``wg`` (N, G, g): (N, G, 1), or (1, 1, 1) per tensor."""

    def quantize(self, wg: Tensor, s: Tensor) -> Tensor:
        """ŵ with clipped straight-through gradients to w (and, through s, to a learned step)."""
        return round_pass(torch.clamp(wg / s, self.qmin, self.qmax)) * s

    def forward(self, w: Tensor) -> Tensor:
        wg = self.grouped(w)
        return self.quantize(wg, _fp16(self.step(wg))).reshape(w.shape)

    @torch.no_grad()
    def scaled(self, w: Tensor) -> Tensor:
        """w / s (N, G, g): the pre-rounding values, in steps."""
        wg = self.grouped(w.detach().float())
        return wg / self.step(wg).half().float()

    @torch.no_grad()
    def codes(self, w: Tensor) -> Tensor:
        """The integer codes (N, G, g) as floats."""
        return torch.clamp(torch.round(self.scaled(w)), self.qmin, self.qmax)

    @torch.no_grad()
    def export(self, w: Tensor) -> QuantizedWeight:
        """The codes and steps of ``w`` (the latent weight) in the layout every PTQ method returns."""
        wg = self.grouped(w.detach().float())
        n, k = wg.shape[0], wg.shape[1] * wg.shape[2]
        s = self.step(wg).half().float().expand(n, wg.shape[1], 1)  # (N, G, 1)
        codes = torch.clamp(torch.round(wg / s), self.qmin, self.qmax).reshape(n, k)
        return QuantizedWeight(codes=codes.to(torch.int8), scales=s[..., 0].contiguous(), zeros=None,
                               bits=self.bits, group_size=self.group, shape=(n, k))


class SteQuantizer(WeightQuantizer):
    """Jacob et al. 2018: step from the current max|w|, no gradient to it."""

    def step(self, wg: Tensor) -> Tensor:
        s = wg.detach().abs().amax(dim=self.dims, keepdim=True) / self.qmax
        return torch.where(s > 0, s, torch.ones_like(s))


class LsqQuantizer(WeightQuantizer):
    """Esser et al. 2020: a learned step per unit, its gradient scaled by 1/√(N_w·Q_P)."""

    def __init__(self, weight: Tensor, cfg: GridConfig):
        super().__init__(weight, cfg)
        wg = self.grouped(weight.detach().float())
        init = 2 * wg.abs().mean(dim=self.dims, keepdim=True) / self.qmax**0.5  # 2·mean|w| / √Q_P
        self.step_size = nn.Parameter(init.clamp_min(1e-8))  # (N, G, 1) or (1, 1, 1)
        per_step = wg.numel() // init.numel()  # N_w: weights sharing one step
        self.gradient_scale = 1.0 / (per_step * self.qmax) ** 0.5

    def step(self, wg: Tensor) -> Tensor:
        return grad_scale(self.step_size, self.gradient_scale).clamp_min(1e-8)


class StatsQuantizer(WeightQuantizer):
    """OFQ's StatsQ: clip α = 2·mean|w| per unit (detached), step α / 2^(b−1), identity gradient to w."""

    def step(self, wg: Tensor) -> Tensor:
        s = 2 * wg.detach().abs().mean(dim=self.dims, keepdim=True) / 2 ** (self.bits - 1)
        return torch.where(s > 0, s, torch.ones_like(s))

    def quantize(self, wg: Tensor, s: Tensor) -> Tensor:
        return wg + (torch.clamp(torch.round(wg / s), self.qmin, self.qmax) * s - wg).detach()


QUANTIZERS: dict[str, type[WeightQuantizer]] = {"ste": SteQuantizer, "lsq": LsqQuantizer, "ofq": StatsQuantizer}


def confident(quantizer: WeightQuantizer, w: Tensor, boundary_range: float) -> Tensor:
    """CGA's frozen set, shaped like ``w``: True where w/s is farther than ``boundary_range``
    steps from every rounding threshold qmin + ½, …, qmax − ½ (clipped weights are confident)."""
    u = quantizer.scaled(w).clamp(quantizer.qmin, quantizer.qmax)  # (N, G, g)
    near = ((u - torch.floor(u) - 0.5).abs() <= boundary_range) & (u > quantizer.qmin) & (u < quantizer.qmax)
    return (~near).reshape(w.shape)


class OscillationTracker:
    """Per-weight oscillation of integer codes across optimizer steps.

    ``update(codes)`` after each step; ``count`` holds each weight's oscillations so far,
    ``frequency`` the EMA with ``momentum``; ``close_window`` returns the share of weights that
    oscillated at least once since the last call and starts a new window.
    """

    def __init__(self, codes: Tensor, momentum: float):
        self.momentum = momentum
        self.previous = codes.clone()
        self.direction = torch.zeros_like(codes)  # sign of the last code change, 0 before any
        self.frequency = torch.zeros_like(codes)
        self.count = torch.zeros_like(codes, dtype=torch.long)
        self.window = torch.zeros_like(codes, dtype=torch.bool)

    def update(self, codes: Tensor) -> Tensor:
        """Record the codes after one step; returns the mask of weights that oscillated in it."""
        change = torch.sign(codes - self.previous)
        oscillated = change * self.direction == -1
        self.direction = torch.where(change != 0, change, self.direction)
        self.previous = codes.clone()
        self.frequency = self.momentum * oscillated.float() + (1 - self.momentum) * self.frequency
        self.count += oscillated
        self.window |= oscillated
        return oscillated

    def close_window(self) -> tuple[int, int]:
        """(weights that oscillated in the window, weights tracked); clears the window."""
        hit = int(self.window.sum())
        self.window.zero_()
        return hit, self.window.numel()
