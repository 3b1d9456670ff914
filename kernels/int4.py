"""4-bit weight packing and the torch reference for the W4A16 group-wise matmul.

This module is the *spec* for weight-only 4-bit inference (GPTQ/AWQ-style W4A16):
``y = x @ (s * (q - z))ᵀ`` with uint4 codes ``q`` in [0, 15] and one scale ``s`` and
zero-point ``z`` per group of ``group_size`` consecutive input channels. Symmetric int4
codes ``q_s`` in [-8, 7] are stored as ``q_s + 8`` with ``z = 8``. The Triton kernel in
``kernels/triton_int4.py`` has the same signature and is tested against this function.

Packed layout (``pack_int4``): a weight of codes (N, K) (out_features, in_features)
becomes uint8 (N, K // 2). Byte ``j`` of row ``n`` holds column ``2j`` in its low nibble
and column ``2j + 1`` in its high nibble::

    packed[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)

Packing along in_features keeps each output row contiguous, so a kernel tile over N
reads whole rows and unpacks both nibbles of a byte into two adjacent K positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_int4(q: Tensor) -> Tensor:
    """Pack uint8 codes in [0, 15], shape (N, K) with K even, into uint8 (N, K // 2)."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4: expected codes of shape (N, K) with K even, got {tuple(q.shape)}")
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_int4: expected uint8 codes, got {q.dtype}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4: codes must lie in [0, 15], found {int(q.max())}")
    low, high = q[:, 0::2], q[:, 1::2]  # (N, K/2) each: even and odd columns
    return (low | (high << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of ``pack_int4``: uint8 (N, K // 2) -> uint8 codes (N, K)."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8 (N, K//2), got {packed.dtype} {tuple(packed.shape)}")
    low, high = packed & 0x0F, packed >> 4  # (N, K/2) each
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)  # (N, K), interleaved


def check_w4a16_args(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> None:
    """Shape/dtype checks shared by the torch reference and the Triton kernel."""
    if x.dim() != 2 or packed.dim() != 2:
        raise ValueError(f"w4a16_matmul: x must be (M, K) and packed (N, K//2); got {tuple(x.shape)}, {tuple(packed.shape)}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"w4a16_matmul: packed weights must be uint8, got {packed.dtype}")
    n, k = packed.shape[0], 2 * packed.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"w4a16_matmul: x has K={x.shape[1]} but packed weights hold K={k}")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"w4a16_matmul: group_size must be even and >= 2, got {group_size}")
    groups = -(-k // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, groups):
            raise ValueError(f"w4a16_matmul: {name} must be (N, ceil(K/g)) = {(n, groups)}, got {tuple(t.shape)}")


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    out: Tensor | None = None) -> Tensor:
    """Dense float32 weight (N, K) = s * (q - z), each group's (s, z) repeated over its columns.

    With ``out`` (N, K) float32, for K a multiple of the group size, it is written in place with
    no (N, K) temporaries (the CPU layers' tiled large-batch path, ``kernels.cpu.tiled_dense_matmul``).
    """
    if out is not None:
        out.copy_(unpack_int4(packed))  # (N, K) codes as floats
        out.view(len(out), -1, group_size).sub_(zeros.float()[..., None]).mul_(scales.float()[..., None])
        return out
    q = unpack_int4(packed).float()  # (N, K)
    k = q.shape[1]
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    return s * (q - z)


def torch_w4a16_matmul(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Reference W4A16 matmul: x (M, K) float, packed (N, K//2) uint8 -> (M, N) in x's dtype.

    Computes in float32 and casts back, so it is the accuracy ceiling the kernels are
    measured against.
    """
    check_w4a16_args(x, packed, scales, zeros, group_size)
    w = dequantize_int4(packed, scales, zeros, group_size)  # (N, K)
    return (x.float() @ w.t()).to(x.dtype)  # (M, N)
