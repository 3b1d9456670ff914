"""Triton fake quantization for QAT: one fused pass forward, one fused pass backward.

Same signature and semantics as ``kernels.fake_quant.torch_fake_quant`` (the spec):
ŵ = clamp(round(w / s), qmin, qmax) · s, with the clipped (or identity) straight-through
gradient to w and LSQ's step gradient (Esser et al., ICLR 2020, eq. 3) to s. The point is
cost: the composed autograd version runs several elementwise passes and saves masks; here
the forward reads w and s and writes ŵ, and saves only w and s; the backward reads ∂L/∂ŵ,
w and s once and writes ∂L/∂w and the per-step sums ∂L/∂s.

Layout: w (N, G, g) is viewed as (R, g) rows, R = N·G, one row per step for per-group and
per-channel s (s viewed as (R,), stride 1) or every row reading the one step (stride 0) for a
per-tensor s. Each program owns BLOCK_R whole rows and walks g in BLOCK_G chunks (masked, so
g need not be a power of two nor R a multiple of BLOCK_R). The backward reduces each row's
∂L/∂s in fp32 registers, so per-group and per-channel steps need no atomics; a per-tensor
step sums the R per-row partials with one torch ``sum`` afterwards.

Exactness: w / s uses ``div_rn`` (IEEE round-to-nearest, like torch; Triton's plain ``/`` is
an approximate division on NVIDIA GPUs) and rounding is half to even like ``torch.round``,
written with ``floor`` because libdevice's ``rint`` does not run under the interpreter. So ŵ
and ∂L/∂w equal the reference bit for bit; ∂L/∂s differs only by summation order.

This module imports Triton at import time on purpose; ``kernels.fake_quant.fake_quant``
imports it only when the Triton path is chosen. Under ``TRITON_INTERPRET=1`` (set before this
module is first imported) the kernels run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.fake_quant import check_fake_quant_args
from kernels.triton_common import round_half_even


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> float32 holding the nearest bfloat16, ties to even: the interpreter's own
    float32 -> bfloat16 cast truncates, the GPU's rounds; after this both are exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round the low 16 bits away
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr, s_ptr, out_ptr,
    R, g, s_stride, qmin, qmax,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    mask_r = rows < R
    s = tl.load(s_ptr + rows * s_stride, mask=mask_r, other=1.0).to(tl.float32)[:, None]  # (BR, 1)
    row_start = rows.to(tl.int64)[:, None] * g  # (BR, 1)
    for c0 in range(0, g, BLOCK_G):
        cols = c0 + tl.arange(0, BLOCK_G)  # (BG,)
        mask = mask_r[:, None] & (cols < g)[None, :]
        offs = row_start + cols[None, :]  # (BR, BG)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(w, s)), qmin), qmax)
        w_hat = q * s
        if out_ptr.dtype.element_ty == tl.bfloat16:
            w_hat = _round_to_bfloat16(w_hat)
        tl.store(out_ptr + offs, w_hat.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_bwd_kernel(
    grad_ptr, w_ptr, s_ptr, grad_w_ptr, grad_s_ptr,
    R, g, s_stride, qmin, qmax,
    STORE_W: tl.constexpr, NEED_S: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    mask_r = rows < R
    s = tl.load(s_ptr + rows * s_stride, mask=mask_r, other=1.0).to(tl.float32)[:, None]  # (BR, 1)
    row_start = rows.to(tl.int64)[:, None] * g  # (BR, 1)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)  # each row's ∂L/∂s
    for c0 in range(0, g, BLOCK_G):
        cols = c0 + tl.arange(0, BLOCK_G)  # (BG,)
        mask = mask_r[:, None] & (cols < g)[None, :]
        offs = row_start + cols[None, :]  # (BR, BG)
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.math.div_rn(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), s)  # in steps
        inside = (u >= qmin) & (u <= qmax)
        if STORE_W:  # the clipped STE; the identity one needs no pass
            tl.store(grad_w_ptr + offs, tl.where(inside, grad, 0.0).to(grad_w_ptr.dtype.element_ty), mask=mask)
        if NEED_S:
            q = tl.minimum(tl.maximum(round_half_even(u), qmin), qmax)
            acc += tl.sum(grad * tl.where(inside, q - u, q), axis=1)  # masked entries have grad 0
    if NEED_S:
        tl.store(grad_s_ptr + rows, acc, mask=mask_r)


def _blocks(rows: int, g: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_G): a chunk of at most 1024 of a row, about 4096 elements per step."""
    block_g = min(triton.next_power_of_2(g), 1024)
    block_r = max(1, min(4096 // block_g, triton.next_power_of_2(rows)))
    return block_r, block_g


class _TritonFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, qmin: int, qmax: int, clip_grad: bool) -> Tensor:
        ctx.save_for_backward(w, s)
        ctx.qmin, ctx.qmax, ctx.clip_grad = qmin, qmax, clip_grad
        w2 = w.reshape(-1, w.shape[-1]).contiguous()  # (R, g)
        s1 = s.reshape(-1).contiguous()  # (R,) or (1,)
        out = torch.empty_like(w2)
        rows, g = w2.shape
        if out.numel():
            block_r, block_g = _blocks(rows, g)
            _fake_quant_fwd_kernel[(triton.cdiv(rows, block_r),)](
                w2, s1, out, rows, g, 0 if s1.numel() == 1 else 1, qmin, qmax,
                BLOCK_R=block_r, BLOCK_G=block_g,
            )
        return out.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, s = ctx.saved_tensors
        need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        store_w = need_w and ctx.clip_grad
        grad_w = grad.to(w.dtype) if need_w and not ctx.clip_grad else None  # identity STE
        if not (store_w or need_s) or w.numel() == 0:
            grad_s = torch.zeros_like(s) if need_s else None
            return (torch.zeros_like(w) if store_w else grad_w), grad_s, None, None, None
        w2 = w.reshape(-1, w.shape[-1]).contiguous()  # (R, g)
        s1 = s.reshape(-1).contiguous()  # (R,) or (1,)
        grad2 = grad.reshape(w2.shape).contiguous()
        rows, g = w2.shape
        grad_w2 = torch.empty_like(w2) if store_w else w2  # w2 is a dummy pointer when unused
        partial = torch.empty(rows if need_s else 1, dtype=torch.float32, device=w.device)  # per-row ∂L/∂s
        block_r, block_g = _blocks(rows, g)
        _fake_quant_bwd_kernel[(triton.cdiv(rows, block_r),)](
            grad2, w2, s1, grad_w2, partial, rows, g, 0 if s1.numel() == 1 else 1, ctx.qmin, ctx.qmax,
            STORE_W=store_w, NEED_S=need_s, BLOCK_R=block_r, BLOCK_G=block_g,
        )
        if store_w:
            grad_w = grad_w2.reshape(w.shape)
        grad_s = None
        if need_s:
            grad_s = (partial if s1.numel() > 1 else partial.sum()).reshape(s.shape).to(s.dtype)
        return grad_w, grad_s, None, None, None


def triton_fake_quant(w: Tensor, s: Tensor, qmin: int, qmax: int, clip_grad: bool) -> Tensor:
    """Triton fake quantization of w (N, G, g) with step s (N, G, 1) or (1, 1, 1); same gradients
    as ``torch_fake_quant``."""
    check_fake_quant_args(w, s, qmin, qmax)
    return _TritonFakeQuant.apply(w, s, qmin, qmax, clip_grad)
