"""Triton W4A16 kernel: group-wise uint4 weights dequantized in registers, fp32 accumulate.

Same signature and semantics as ``kernels.int4.torch_w4a16_matmul`` (the spec):
``y = x @ (s * (q - z))ᵀ`` with the nibble layout documented in ``kernels/int4.py``.
This is the weight-only 4-bit GEMM of GPTQ/AWQ inference (in the spirit of the MARLIN and
the Triton tutorial matmul kernels), written plainly rather than tuned.

Each program owns a (BLOCK_M, BLOCK_N) output tile and walks K in steps of BLOCK_K. A
step loads BLOCK_K // 2 packed bytes per output row once, splits them into the even
(low nibble) and odd (high nibble) input columns, dequantizes each half with its group's
scale and zero, and accumulates ``x_even @ w_even + x_odd @ w_odd`` with ``tl.dot`` in
fp32. Because ``group_size`` is even, the two columns of a byte share one group.
Masks cover M = 1, N not a multiple of BLOCK_N and K not a multiple of BLOCK_K.

This module imports Triton at import time on purpose; ``kernels/__init__.py`` imports it
only when the Triton path is chosen. Under ``TRITON_INTERPRET=1`` (set before this module
is first imported) the kernel runs on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.int4 import check_w4a16_args


@triton.jit
def _w4a16_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, G,
    stride_xm, stride_xk, stride_pn, stride_pk,
    stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.cdiv(K, BLOCK_K)):
        offs_b = k0 * HALF_K + tl.arange(0, HALF_K)  # (BK/2,) byte index along K/2
        mask_b = offs_b < K // 2
        even_k = 2 * offs_b  # (BK/2,) input column of each low nibble
        x_mask = mask_m[:, None] & mask_b[None, :]
        x_row = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_row + even_k[None, :] * stride_xk, mask=x_mask, other=0.0)  # (BM, BK/2)
        x_odd = tl.load(x_row + (even_k + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
        w_mask = mask_b[:, None] & mask_n[None, :]
        byte = tl.load(p_ptr + offs_n[None, :] * stride_pn + offs_b[:, None] * stride_pk,
                       mask=w_mask, other=0)  # (BK/2, BN) uint8
        group = even_k // G  # (BK/2,) both nibbles of a byte share a group (G even)
        s = tl.load(s_ptr + offs_n[None, :] * stride_sn + group[:, None] * stride_sg,
                    mask=w_mask, other=0.0).to(tl.float32)  # (BK/2, BN)
        z = tl.load(z_ptr + offs_n[None, :] * stride_zn + group[:, None] * stride_zg,
                    mask=w_mask, other=0.0).to(tl.float32)
        w_even = ((byte & 0xF).to(tl.float32) - z) * s  # (BK/2, BN), masked entries are 0
        w_odd = ((byte >> 4).to(tl.float32) - z) * s
        acc += tl.dot(x_even, w_even.to(x_even.dtype), out_dtype=tl.float32)
        acc += tl.dot(x_odd, w_odd.to(x_odd.dtype), out_dtype=tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    """Tile sizes: tl.dot needs every dim >= 16; small M (decode) gets the smallest tile."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 32 if n <= 32 else 64
    block_k = 32 if k <= 32 else 64
    return block_m, block_n, block_k


def triton_w4a16_matmul(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Triton W4A16 matmul: x (M, K) float, packed (N, K//2) uint8 -> (M, N) in x's dtype."""
    check_w4a16_args(x, packed, scales, zeros, group_size)
    m, k = x.shape
    n = packed.shape[0]
    if not zeros.dtype.is_floating_point:
        zeros = zeros.to(scales.dtype)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, block_k = _blocks(m, n, k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a16_kernel[grid](
        x, packed, scales, zeros, y,
        m, n, k, group_size,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y
