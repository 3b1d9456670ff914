"""Triton W8A8 kernel: int8 × int8 with int32 accumulation, per-token × per-channel rescale.

Same signature and semantics as ``kernels.w8a8.torch_w8a8_matmul`` (the spec):
``y = (x_q @ w_qᵀ) · x_scale[m] · w_scale[n]``, the GEMM of SmoothQuant's W8A8 inference
(the per-token-activation, per-channel-weight scheme of the paper's Table/Figure on
quantization granularity), written plainly rather than tuned.

Each program owns a (BLOCK_M, BLOCK_N) output tile, walks K in steps of BLOCK_K and
accumulates ``tl.dot(int8, int8)`` into an int32 tile, exactly. The epilogue multiplies the
tile by its rows' activation scales and its columns' weight scales in float32 (or stores
the raw int32 accumulator when the output is int32). Masks cover M = 1, N and K not
multiples of the blocks.

``triton_quantize_activations`` is the run-time half of W8A8: per-token symmetric int8 codes
and scales of the activations (``kernels.w8a8.quantize_activations``, the spec) in one
kernel — each program owns BLOCK_M rows, finds their max |x| in one sweep over K and writes
codes in a second — instead of torch's abs / amax / divide / round / clamp / cast chain.
Its division is IEEE (``div_rn``) and its rounding half-to-even, as ``torch.round``, so the
codes equal the reference's exactly.

This module imports Triton at import time; ``kernels/__init__.py`` imports it only when
the Triton path is chosen. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_common import round_half_even
from kernels.w8a8 import QMAX, check_w8a8_args


@triton.jit
def _w8a8_kernel(
    x_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(tl.cdiv(K, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0)  # (BM, BK) int8
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # (BK, BN) int8
        acc += tl.dot(x, w, out_dtype=tl.int32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    if SCALED:
        sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)  # (BM,)
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptrs, acc, mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_qk,
                          QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    mask_m = offs_m < M
    top = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # sweep 1: the row maxima
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        top = tl.maximum(top, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.where(top > 0, tl.math.div_rn(top, QMAX * 1.0), 1.0)  # (BM,); an all-zero row gets 1
    tl.store(s_ptr + offs_m, scale, mask=mask_m)
    for k0 in range(0, K, BLOCK_K):  # sweep 2: the codes
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        q = round_half_even(tl.math.div_rn(x.to(tl.float32), scale[:, None]))
        q = tl.minimum(tl.maximum(q, -QMAX * 1.0), QMAX * 1.0)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, q.to(tl.int8), mask=mask)


def triton_quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: x (M, K) float -> (codes int8 (M, K), scales float32 (M,))."""
    if x.dim() != 2:
        raise ValueError(f"quantize_activations: expected x of shape (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scales = torch.ones((m,), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scales
    block_m = 4 if m >= 4 else 1
    _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
        x, q, scales, m, k, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        QMAX=QMAX, BLOCK_M=block_m, BLOCK_K=min(1024, triton.next_power_of_2(k)),
    )
    return q, scales


def _blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    """Tile sizes: tl.dot needs every dim >= 16 (32 along K for int8 on recent GPUs)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 32 if n <= 32 else 64
    block_k = 32 if k <= 32 else 64
    return block_m, block_n, block_k


def triton_w8a8_matmul(x_q: Tensor, x_scales: Tensor, w_q: Tensor, w_scales: Tensor,
                       out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Triton W8A8 matmul: x_q (M, K) int8, w_q (N, K) int8 -> (M, N) out_dtype (int32: raw accumulator)."""
    check_w8a8_args(x_q, x_scales, w_q, w_scales)
    m, k = x_q.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    block_m, block_n, block_k = _blocks(m, n, k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_kernel[grid](
        x_q, x_scales, w_q, w_scales, y,
        m, n, k,
        x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), y.stride(0), y.stride(1),
        SCALED=out_dtype != torch.int32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y
