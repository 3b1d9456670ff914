"""Weight fake-quantizers for QAT, the oscillation tracker, OFQ's confidence test and its
query–key reparameterized attention (``QkrAttention``, described in ``qat.py``).

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

All three run ``kernels.fake_quant.fake_quant`` (ŵ and both gradients in one op; Triton on
CUDA with ``kernel: auto``): ``ste`` and ``lsq`` with the clipped gradient to w, ``ofq`` with
the identity; only LSQ's step requires a gradient.

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
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.dispatch import Kernel
from kernels.fake_quant import fake_quant
from tasks.quantize.rtn import GridConfig, QuantizedWeight, code_range, group_size


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """x in the forward, gradient multiplied by ``scale``."""
    return x * scale + (x - x * scale).detach()


def _fp16(s: Tensor) -> Tensor:
    """s rounded to the nearest float16 (what the packed file stores), straight-through."""
    return s + (s.half().float() - s).detach()


class WeightQuantizer(nn.Module, abc.ABC):
    """Fake-quantizes one weight (N, ...) as a ``torch.nn.utils.parametrize`` parametrization,
    on the fake-quant op ``kernel`` picks (``kernels.fake_quant``)."""

    clip_grad = True  # the gradient to w: clipped to the grid's range, or the identity

    def __init__(self, weight: Tensor, cfg: GridConfig, kernel: Kernel = "auto"):
        super().__init__()
        self.kernel = kernel
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
        """ŵ with straight-through gradients to w (clipped unless ``clip_grad`` is off) and, when s
        requires one, LSQ's to s."""
        return fake_quant(wg, s, self.qmin, self.qmax, clip_grad=self.clip_grad, kernel=self.kernel)

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

    def __init__(self, weight: Tensor, cfg: GridConfig, kernel: Kernel = "auto"):
        super().__init__(weight, cfg, kernel)
        wg = self.grouped(weight.detach().float())
        init = 2 * wg.abs().mean(dim=self.dims, keepdim=True) / self.qmax**0.5  # 2·mean|w| / √Q_P
        self.step_size = nn.Parameter(init.clamp_min(1e-8))  # (N, G, 1) or (1, 1, 1)
        per_step = wg.numel() // init.numel()  # N_w: weights sharing one step
        self.gradient_scale = 1.0 / (per_step * self.qmax) ** 0.5

    def step(self, wg: Tensor) -> Tensor:
        return grad_scale(self.step_size, self.gradient_scale).clamp_min(1e-8)


class StatsQuantizer(WeightQuantizer):
    """OFQ's StatsQ: clip α = 2·mean|w| per unit (detached), step α / 2^(b−1), identity gradient to w."""

    clip_grad = False

    def step(self, wg: Tensor) -> Tensor:
        s = 2 * wg.detach().abs().mean(dim=self.dims, keepdim=True) / 2 ** (self.bits - 1)
        return torch.where(s > 0, s, torch.ones_like(s))


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


class QkrAttention(nn.Module):
    """OFQ's query–key reparameterization (QKR) of one attention, for QAT (see ``qat.py``).

    Replaces an nn.MultiheadAttention (batch-first, no masks, no dropout, no bias_k/v) or a
    SlimAttention in the QAT working copy and is called like it. The attention logits of head h
    come from the fake-quantized product Ŵ_qk^h = Q(W_q^hᵀ W_k^h) (C×C, C = the model width,
    stacked over heads into one (H·C, C) matrix quantized by StatsQ per row or group), not from
    separately quantized W_q and W_k:

        logits^h[n, m] = (x_n Ŵ_qk^h x_mᵀ + x_m·(W_k^hᵀ b_q^h)) / √hd

    The latent ``query_key`` = [W_q; W_k] (2·inner, C) trains through Ŵ_qk's straight-through
    gradient; W_v, the biases and ``out_proj`` (shared with the model, so its own quantizer
    keeps working) are as in the original. Float (Q = identity) it equals the original
    attention: the bias terms constant over the keys m (x_n W_qᵀ b_k, b_q·b_k) cancel in the
    softmax and x_m·(W_kᵀ b_q) is kept exactly.
    """

    def __init__(self, attn: nn.Module, cfg: GridConfig, kernel: Kernel = "auto"):
        super().__init__()
        if isinstance(attn, nn.MultiheadAttention):
            if not (attn.batch_first and attn._qkv_same_embed_dim and attn.bias_k is None
                    and not attn.add_zero_attn and attn.dropout == 0):
                raise ValueError("qkr: needs nn.MultiheadAttention(batch_first=True) with q/k/v of one width, "
                                 "no bias_k/bias_v, no add_zero_attn and dropout 0")
            self.heads, self.head_dim = attn.num_heads, attn.head_dim
        else:
            self.heads, self.head_dim = attn.heads, attn.head_dim
        inner = self.heads * self.head_dim
        w = attn.in_proj_weight.detach()  # (3·inner, C): W_q, W_k, W_v
        bias = attn.in_proj_bias.detach() if attn.in_proj_bias is not None else w.new_zeros(3 * inner)
        self.query_key = nn.Parameter(w[: 2 * inner].clone())  # (2·inner, C): the latent W_q then W_k
        self.register_buffer("value_weight", w[2 * inner:].clone())  # (inner, C)
        self.register_buffer("in_proj_bias", bias.clone())  # (3·inner,)
        self.out_proj = attn.out_proj
        self.quantizer = StatsQuantizer(self.product().detach(), cfg, kernel)
        self.boundary_range: float | None = None  # set during CGA

    def product(self) -> Tensor:
        """W_qk (H·C, C): rows h·C .. (h+1)·C − 1 hold head h's W_q^hᵀ W_k^h."""
        wq, wk = self.query_key.unflatten(0, (2, self.heads, self.head_dim)).unbind(0)  # (H, hd, C) each
        return (wq.transpose(1, 2) @ wk).flatten(0, 1)

    def quantized_product(self, wqk: Tensor) -> Tensor:
        """Ŵ_qk (H·C, C); during CGA the confident entries of ``wqk`` pass no gradient (the
        reference's ``StatsQuantizer_specific_4_qkreparam_cga``)."""
        if self.boundary_range is not None:
            wqk = torch.where(confident(self.quantizer, wqk, self.boundary_range), wqk.detach(), wqk)
        return self.quantizer(wqk)

    @torch.no_grad()
    def export_in_proj(self) -> tuple[Tensor, Tensor]:
        """(in_proj_weight (3·inner, C), in_proj_bias (3·inner,)) for the original float attention,
        holding the nearest it can to this forward: per head, Ŵ_qk^h = U S Vᵀ truncated to rank hd
        (the product of two (hd, C) matrices nearest Ŵ_qk^h in Frobenius norm, Eckart–Young), split
        W_q^h = (U S^½)ᵀ, W_k^h = S^½ Vᵀ, and b_q^h = S^−½ Vᵀ u^h, so that W_k^hᵀ b_q^h is u^h's part
        in the new keys' row space; W_v, b_k (it cancels in the softmax) and b_v unchanged."""
        h, hd = self.heads, self.head_dim
        w_hat = self.quantizer(self.product()).unflatten(0, (h, -1)).double()  # (H, C, C)
        left, sv, right = torch.linalg.svd(w_hat)  # (H, C, C), (H, C), (H, C, C)
        root = sv[:, :hd].sqrt()  # (H, hd)
        w_q = (left[:, :, :hd] * root[:, None, :]).transpose(1, 2)  # (H, hd, C)
        w_k = root[:, :, None] * right[:, :hd]  # (H, hd, C)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        latent_k = self.query_key[h * hd:].unflatten(0, (h, hd)).double()  # (H, hd, C)
        u = torch.einsum("hdc,hd->hc", latent_k, b_q.unflatten(0, (h, hd)).double())  # (H, C)
        inverse_root = torch.where(root > 1e-12, 1 / root.clamp_min(1e-12), torch.zeros_like(root))
        new_b_q = inverse_root * torch.einsum("hdc,hc->hd", right[:, :hd], u)  # (H, hd)
        weight = torch.cat([w_q.flatten(0, 1).float(), w_k.flatten(0, 1).float(), self.value_weight])
        return weight, torch.cat([new_b_q.flatten().float(), b_k, b_v])

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("QkrAttention does not return attention weights; call it with need_weights=False")
        h, hd = self.heads, self.head_dim
        wqk = self.quantized_product(self.product()).unflatten(0, (h, -1))  # (H, C, C)
        b_q, _, b_v = self.in_proj_bias.chunk(3)
        w_k = self.query_key[h * hd:].unflatten(0, (h, hd))  # (H, hd, C)
        u = torch.einsum("hdc,hd->hc", w_k, b_q.unflatten(0, (h, hd)))  # (H, C): W_k^hᵀ b_q^h
        left = torch.einsum("bnc,hcd->bhnd", query, wqk)  # (B, H, T, C): x_n Ŵ_qk^h
        logits = left @ key.transpose(1, 2)[:, None] + torch.einsum("hc,bmc->bhm", u, key)[:, :, None]  # (B, H, T, T)
        v = F.linear(value, self.value_weight, b_v).unflatten(-1, (h, hd)).transpose(1, 2)  # (B, H, T, hd)
        out = torch.softmax(logits / hd**0.5, dim=-1) @ v  # (B, H, T, hd)
        return self.out_proj(out.transpose(1, 2).flatten(2)), None  # (B, T, width)
