"""Triton W4A16 kernel: group-wise uint4 weights dequantized in registers, fp32 accumulate.

Same signature and semantics as ``kernels.int4.torch_w4a16_matmul`` (the spec):
``y = x @ (s * (q - z))ᵀ`` with the nibble layout documented in ``kernels/int4.py``.
This is the weight-only 4-bit GEMM of GPTQ/AWQ inference, in the spirit of the Triton
tutorial matmul and of the split-K GPTQ dequantization kernels (Hoque et al., "Accelerating
a Triton Fused Kernel for W4A16 Quantized Inference with SplitK Work Decomposition", 2024).

Each program owns a (BLOCK_M, BLOCK_N) output tile and walks its share of K in steps of
BLOCK_K. A step loads BLOCK_K // 2 packed bytes per output row once, splits them into the
even (low nibble) and odd (high nibble) input columns, dequantizes each half with its
group's scale and zero, and accumulates ``x_even @ w_even + x_odd @ w_odd`` with ``tl.dot``
in fp32. Because ``group_size`` is even, the two columns of a byte share one group.

Tuned for batch 1–64 (decode), where the GEMM is a read of the weights and little else:
- **Split-K.** At M ≤ 64 there are only N / BLOCK_N output tiles, too few programs to keep a
  GPU's SMs busy, so K is cut into ``SPLIT_K`` slices run by separate programs whose fp32
  partial tiles are summed with ``tl.atomic_add`` into a zeroed fp32 buffer (then cast).
- **One scale load per step.** When BLOCK_K divides the group size (``G`` is a compile-time
  constant), a step lies inside one group: its scales and zeros are one (BLOCK_N,) vector,
  not a (BLOCK_K/2, BLOCK_N) gather.
- On CUDA the tile sizes, split, warps and pipeline stages are autotuned per (M bucket, N, K);
  under ``TRITON_INTERPRET=1`` a fixed heuristic configuration runs (autotuning would time the
  interpreter). ``config=`` forces one, so tests reach every branch.
Masks cover M = 1, N not a multiple of BLOCK_N, K not a multiple of BLOCK_K and a partial
last group.

This module imports Triton at import time on purpose; ``kernels/__init__.py`` imports it
only when the Triton path is chosen. Under ``TRITON_INTERPRET=1`` (set before this module
is first imported) the kernel runs on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from kernels.dispatch import interpreting
from kernels.int4 import check_w4a16_args


@triton.jit
def _w4a16_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_pn, stride_pk,
    stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_tiles)):
        offs_b = t * HALF_K + tl.arange(0, HALF_K)  # (BK/2,) byte index along K/2
        mask_b = offs_b < K // 2
        even_k = 2 * offs_b  # (BK/2,) input column of each low nibble
        x_mask = mask_m[:, None] & mask_b[None, :]
        x_row = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_row + even_k[None, :] * stride_xk, mask=x_mask, other=0.0)  # (BM, BK/2)
        x_odd = tl.load(x_row + (even_k + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
        w_mask = mask_b[:, None] & mask_n[None, :]
        byte = tl.load(p_ptr + offs_n[None, :] * stride_pn + offs_b[:, None] * stride_pk,
                       mask=w_mask, other=0)  # (BK/2, BN) uint8
        if G % BLOCK_K == 0:  # the whole step lies in group (t·BK) // G: one (BN,) vector each
            group = (t * BLOCK_K) // G
            s = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0)
            z = tl.load(z_ptr + offs_n * stride_zn + group * stride_zg, mask=mask_n, other=0.0)
            s = s.to(tl.float32)[None, :]  # (1, BN)
            z = z.to(tl.float32)[None, :]
        else:
            group = even_k // G  # (BK/2,) both nibbles of a byte share a group (G even)
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + group[:, None] * stride_sg,
                        mask=w_mask, other=0.0).to(tl.float32)  # (BK/2, BN)
            z = tl.load(z_ptr + offs_n[None, :] * stride_zn + group[:, None] * stride_zg,
                        mask=w_mask, other=0.0).to(tl.float32)
        w_even = ((byte & 0xF).to(tl.float32) - z) * s  # (BK/2, BN); masked bytes load 0 with s 0
        w_odd = ((byte >> 4).to(tl.float32) - z) * s
        w_even = tl.where(w_mask, w_even, 0.0)
        w_odd = tl.where(w_mask, w_odd, 0.0)
        acc += tl.dot(x_even, w_even.to(x_even.dtype), out_dtype=tl.float32)
        acc += tl.dot(x_odd, w_odd.to(x_odd.dtype), out_dtype=tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:  # y is a zeroed fp32 buffer; the K slices add their partial tiles
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


class W4A16Config(NamedTuple):
    """One launch configuration of the kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


def _block_m(m: int) -> int:
    """Rows per tile: tl.dot needs at least 16; decode batches get the smallest that covers them."""
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def heuristic_config(m: int, n: int, k: int, group_size: int, programs: int = 264) -> W4A16Config:
    """A configuration without timing: group-aligned K steps, and a K split that gives about
    ``programs`` programs (two per SM of an H100's 132) when the output tiles alone are fewer."""
    block_m = _block_m(m)
    block_n = 32 if n <= 32 else 64
    block_k = next((b for b in (128, 64, 32) if group_size % b == 0 and b <= max(32, k)), 32)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    while m <= 64 and split * 2 <= k_tiles and tiles * split < programs:
        split *= 2
    return W4A16Config(block_m, block_n, block_k, split)


def _cuda_configs(block_m: int, group_size: int) -> list[W4A16Config]:
    """The autotuning space on CUDA: group-aligned K steps, splits only at decode sizes."""
    splits = (1, 2, 4, 8) if block_m <= 64 else (1,)
    block_ks = [b for b in (64, 128) if group_size % b == 0] or [32]
    return [W4A16Config(block_m, bn, bk, sk, warps, stages)
            for bn, bk, sk, (warps, stages) in itertools.product((64, 128, 256), block_ks, splits,
                                                                  ((4, 3), (8, 3), (4, 4)))
            if not (bn == 256 and warps == 4)]


_TUNED: dict[tuple, W4A16Config] = {}


def _launch(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
            cfg: W4A16Config) -> Tensor:
    m, k = x.shape
    n = packed.shape[0]
    out_dtype = torch.float32 if cfg.split_k > 1 else x.dtype
    y = (torch.zeros if cfg.split_k > 1 else torch.empty)((m, n), dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w4a16_kernel[grid](
        x, packed, scales, zeros, y,
        m, n, k,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), y.stride(0), y.stride(1),
        G=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.to(x.dtype)


def _autotuned(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> W4A16Config:
    """The fastest CUDA configuration for this (M bucket, N, K, g, dtype), timed once and remembered."""
    m, k = x.shape
    key = (_block_m(m), packed.shape[0], k, group_size, x.dtype, x.device)
    if key not in _TUNED:
        timings = {}
        for cfg in _cuda_configs(key[0], group_size):
            try:
                timings[cfg] = triton.testing.do_bench(lambda c=cfg: _launch(x, packed, scales, zeros, group_size, c),
                                                       warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:  # too many registers or too much shared memory
                continue
        _TUNED[key] = min(timings, key=timings.get)
    return _TUNED[key]


def triton_w4a16_matmul(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                        config: W4A16Config | None = None) -> Tensor:
    """Triton W4A16 matmul: x (M, K) float, packed (N, K//2) uint8 -> (M, N) in x's dtype.

    ``config`` forces a launch configuration; otherwise CUDA autotunes and the interpreter
    uses ``heuristic_config``.
    """
    check_w4a16_args(x, packed, scales, zeros, group_size)
    m, k = x.shape
    n = packed.shape[0]
    if not zeros.dtype.is_floating_point:
        zeros = zeros.to(scales.dtype)
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if config is None:
        config = (heuristic_config(m, n, k, group_size) if interpreting() or x.device.type != "cuda"
                  else _autotuned(x, packed, scales, zeros, group_size))
    return _launch(x, packed, scales, zeros, group_size, config)
