"""Torch reference for the W8A8 matmul: int8 activations × int8 weights, int32 accumulate.

This module is the *spec* for SmoothQuant-style W8A8 inference (Xiao et al., ICML 2023):
activations are quantized to int8 at run time, dynamically, with one symmetric scale per
token (row) or per tensor; weights are int8 with one scale per output channel. Then

    acc[m, n] = Σ_k x_q[m, k] · w_q[n, k]            (exact, int32)
    y[m, n]   = acc[m, n] · x_scale[m] · w_scale[n]   (float)

``w8a8_int_mm`` computes ``acc`` exactly (float32 matmuls over K-chunks short enough that
every partial sum is an exact float32 integer); ``torch_w8a8_matmul`` adds the float rescale in float32.
The Triton kernel in ``kernels/triton_w8a8.py`` has the same signature and is tested against
these. Passing ``out_dtype=torch.int32`` returns the raw accumulator and ignores the scales.
"""

from __future__ import annotations

import torch
from torch import Tensor

QMAX = 127  # symmetric int8: codes in [-127, 127], so -x quantizes to -q
_EXACT_CHUNK = 1024  # 1024·128² = 2^24: float32 sums of this many int8 products are exact


def quantize_activations(x: Tensor, granularity: str = "per_token") -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8: x (M, K) float -> (codes int8 (M, K), scales float32 (M,)).

    scale = max|x_row| / 127 per row (``per_token``) or max|x| / 127 shared by every row
    (``per_tensor``, returned repeated per row); an all-zero row or tensor gets scale 1.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_activations: expected x of shape (M, K), got {tuple(x.shape)}")
    xf = x.float()
    if granularity == "per_token":
        top = xf.abs().amax(dim=1) if x.shape[1] else xf.new_zeros(len(x))  # (M,)
    elif granularity == "per_tensor":
        top = (xf.abs().amax() if xf.numel() else xf.new_zeros(())).expand(len(x))
    else:
        raise ValueError(f"quantize_activations: granularity {granularity!r} is not one of per_token, per_tensor")
    scales = torch.where(top > 0, top / QMAX, torch.ones_like(top))  # (M,)
    codes = torch.round(xf / scales[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scales.contiguous()


def check_w8a8_args(x_q: Tensor, x_scales: Tensor, w_q: Tensor, w_scales: Tensor) -> None:
    """Shape/dtype checks shared by the torch reference and the Triton kernel."""
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"w8a8_matmul: x_q must be (M, K) and w_q (N, K); got {tuple(x_q.shape)}, {tuple(w_q.shape)}")
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise ValueError(f"w8a8_matmul: codes must be int8, got {x_q.dtype} and {w_q.dtype}")
    if tuple(x_scales.shape) != (x_q.shape[0],) or tuple(w_scales.shape) != (w_q.shape[0],):
        raise ValueError(f"w8a8_matmul: x_scales must be (M,) = ({x_q.shape[0]},) and w_scales (N,) = "
                         f"({w_q.shape[0]},); got {tuple(x_scales.shape)}, {tuple(w_scales.shape)}")


def w8a8_int_mm(x_q: Tensor, w_q: Tensor) -> Tensor:
    """Exact int32 accumulator x_q (M, K) int8 @ w_q (N, K)ᵀ int8 -> (M, N) int32.

    Every partial sum of k products is an integer of magnitude ≤ k·128², which float32
    holds exactly while k·128² ≤ 2^24, i.e. k ≤ 1024, whatever the summation order. So K is
    cut into chunks of 1024, each chunk's float32 matmul is exact, and the chunks are summed
    in int32. (torch's own int8 GEMM on CPU, ``torch._int_mm``, measured 20-30x slower than
    fp32 on this AVX2 machine, so the reference does not use it.)
    """
    acc = torch.zeros(x_q.shape[0], w_q.shape[0], dtype=torch.int32, device=x_q.device)  # (M, N)
    for k0 in range(0, x_q.shape[1], _EXACT_CHUNK):
        part = x_q[:, k0:k0 + _EXACT_CHUNK].float() @ w_q[:, k0:k0 + _EXACT_CHUNK].float().t()
        acc += part.to(torch.int32)
    return acc


def torch_w8a8_matmul(x_q: Tensor, x_scales: Tensor, w_q: Tensor, w_scales: Tensor,
                      out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference W8A8 matmul: (x_q @ w_qᵀ) · x_scales[:, None] · w_scales[None, :] -> (M, N) out_dtype."""
    check_w8a8_args(x_q, x_scales, w_q, w_scales)
    acc = w8a8_int_mm(x_q, w_q)  # (M, N) int32
    if out_dtype == torch.int32:
        return acc
    return (acc.float() * x_scales.float()[:, None] * w_scales.float()[None, :]).to(out_dtype)
