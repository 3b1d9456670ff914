"""Fake quantization with its QAT gradients: the spec (torch reference) and the one dispatch.

This module is the *spec* for the fused fake-quant op of quantization-aware training:
``ŵ = clamp(round(w / s), qmin, qmax) · s`` with the two gradients QAT needs, in one
autograd op instead of a chain of elementwise ones. The Triton kernels in
``kernels/triton_fake_quant.py`` have the same signature and are tested against it.

Shapes: ``w`` (N, G, g) float, the weight viewed as G groups of g per output channel; ``s``
(N, G, 1) (one step per group, or per channel when G = 1) or (1, 1, 1) (per tensor; any
one-element shape, a 0-dim scalar included), positive. ``round`` is ``torch.round``: half
to even. All arithmetic is float32 (``w`` in bfloat16/float16 is upcast); ŵ and ∂L/∂w come
back in ``w``'s dtype, ∂L/∂s in ``s``'s.

Gradients, with u = w / s:

- to w: the clipped straight-through estimator (Bengio et al. 2013; Jacob et al., CVPR 2018)
  ``∂L/∂w = ∂L/∂ŵ · 1[qmin ≤ u ≤ qmax]`` when ``clip_grad``, else the plain identity
  ``∂L/∂w = ∂L/∂ŵ`` (OFQ's StatsQ passes it unclipped).
- to s (only when ``s.requires_grad``): Esser et al., "Learned Step Size Quantization"
  (ICLR 2020), eq. 3, ``∂ŵ/∂s = round(u) − u`` inside the range, ``qmin`` below, ``qmax``
  above, summed with ∂L/∂ŵ over the entries sharing each step. LSQ's gradient scale and
  the float16 rounding of s are not part of the op: the quantizers apply them to s before
  passing it in (``tasks/quantize/qat_quantizers.py``), so autograd carries them.

These are the gradients of the composition ``round_pass(clamp(w / s)) · s`` that the QAT
quantizers used before (which forms ∂L/∂w as (∂L/∂ŵ·s)/s, so equal up to float rounding),
computed from ``w`` and ``s`` alone: nothing but w and s is saved for the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import Kernel, resolve_kernel


def check_fake_quant_args(w: Tensor, s: Tensor, qmin: int, qmax: int) -> None:
    """Shape/dtype checks shared by the torch reference and the Triton kernel."""
    if w.dim() != 3 or not w.dtype.is_floating_point:
        raise ValueError(f"fake_quant: w must be a float (N, G, g) tensor, got {w.dtype} {tuple(w.shape)}")
    n, groups, _ = w.shape
    per_tensor = s.numel() == 1 and s.dim() <= 3
    if not (per_tensor or tuple(s.shape) == (n, groups, 1)) or not s.dtype.is_floating_point:
        raise ValueError(f"fake_quant: s must be a float (N, G, 1) = {(n, groups, 1)} or one-element (1, 1, 1) "
                         f"tensor, got {s.dtype} {tuple(s.shape)}")
    if not qmin < qmax:
        raise ValueError(f"fake_quant: need qmin < qmax, got qmin={qmin}, qmax={qmax}")


def fake_quant_forward(w: Tensor, s: Tensor, qmin: int, qmax: int) -> Tensor:
    """ŵ = clamp(round(w / s), qmin, qmax) · s (N, G, g) in w's dtype, computed in float32."""
    s32 = s.float()
    q = torch.clamp(torch.round(w.float() / s32), qmin, qmax)  # (N, G, g) integer codes as floats
    return (q * s32).to(w.dtype)


def fake_quant_backward(grad: Tensor, w: Tensor, s: Tensor, qmin: int, qmax: int, clip_grad: bool,
                        need_s: bool = True) -> tuple[Tensor, Tensor | None]:
    """(∂L/∂w (N, G, g) in w's dtype, ∂L/∂s shaped and typed like s, or None unless ``need_s``)."""
    s32 = s.float()
    u = w.float() / s32  # (N, G, g), in steps
    inside = (u >= qmin) & (u <= qmax)
    grad_w = torch.where(inside, grad, torch.zeros_like(grad)) if clip_grad else grad
    if not need_s:
        return grad_w.to(w.dtype), None
    q = torch.clamp(torch.round(u), qmin, qmax)
    dq_ds = torch.where(inside, q - u, q)  # LSQ eq. 3: round(u) − u inside, qmin below, qmax above
    per_entry = grad.float() * dq_ds  # (N, G, g)
    grad_s = per_entry.sum() if s.numel() == 1 else per_entry.sum(dim=2)  # per tensor, or per row of g
    return grad_w.to(w.dtype), grad_s.reshape(s.shape).to(s.dtype)


class _TorchFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, qmin: int, qmax: int, clip_grad: bool) -> Tensor:
        ctx.save_for_backward(w, s)
        ctx.qmin, ctx.qmax, ctx.clip_grad = qmin, qmax, clip_grad
        return fake_quant_forward(w, s, qmin, qmax)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, s = ctx.saved_tensors
        grad_w, grad_s = fake_quant_backward(grad, w, s, ctx.qmin, ctx.qmax, ctx.clip_grad,
                                             need_s=ctx.needs_input_grad[1])
        return (grad_w if ctx.needs_input_grad[0] else None), grad_s, None, None, None


def torch_fake_quant(w: Tensor, s: Tensor, qmin: int, qmax: int, clip_grad: bool) -> Tensor:
    """Reference fake quantization of w (N, G, g) with step s (N, G, 1) or (1, 1, 1); differentiable
    in w (clipped or identity STE) and s (LSQ eq. 3). See the module docstring."""
    check_fake_quant_args(w, s, qmin, qmax)
    return _TorchFakeQuant.apply(w, s, qmin, qmax, clip_grad)


def fake_quant(w: Tensor, s: Tensor, qmin: int, qmax: int, clip_grad: bool = True, kernel: Kernel = "auto") -> Tensor:
    """``clamp(round(w / s), qmin, qmax) · s`` with QAT's gradients, on the kernel ``kernel`` resolves to.

    w (N, G, g) float; s (N, G, 1) or (1, 1, 1) positive float; returns (N, G, g) in w's dtype.
    """
    if resolve_kernel(kernel, w.device) == "triton":
        from kernels.triton_fake_quant import triton_fake_quant  # lazy: imports triton

        return triton_fake_quant(w, s, qmin, qmax, clip_grad)
    return torch_fake_quant(w, s, qmin, qmax, clip_grad)
