"""slimforge kernels: torch reference ops, Triton GPU kernels, and the one dispatch.

Every op has a torch reference (``torch_*``, the spec) and, where it pays, a Triton
kernel (``triton_*``) with the same signature. Callers pick with an explicit
``kernel: auto | torch | triton`` argument, resolved by ``kernels.dispatch.resolve_kernel``
and nowhere else:

- ``"torch"`` always runs the reference.
- ``"triton"`` runs the Triton kernel; on a CPU tensor that is only possible through
  Triton's interpreter, so it requires ``TRITON_INTERPRET=1`` (set before Triton is first
  imported) and raises a ValueError otherwise.
- ``"auto"`` picks Triton only for CUDA tensors when Triton is installed, else torch.

Ops:

- ``w4a16_matmul``: group-wise uint4 weights, float activations (``kernels.int4``).
- ``w8a8_matmul``: int8 weights and int8 per-token or per-tensor activations, int32
  accumulate (``kernels.w8a8``), with ``quantize_activations`` for the run-time int8 codes.
- ``fake_quant``: QAT's fake quantization with its STE and LSQ gradients, one op forward and
  one backward (``kernels.fake_quant``).
- ``task_vector_merge``: TIES/DARE/task arithmetic of K task vectors (trim, drop and rescale
  with counter-based masks, sign election, disjoint mean) in one pass (``kernels.merge``).

2:4 sparse Linear layers (``kernels.sparse24``) run on torch's semi-structured sparse
tensors (the GPU's sparse tensor cores), with their own ``auto | torch | semi`` setting.

Triton is imported lazily, inside the ``kernels.triton_*`` modules, the first time a Triton
path runs; importing ``kernels`` never imports Triton. The packed CPU ops (torch's int8/int4
``_weight_*pack_mm`` kernels, fbgemm's dynamic int8 Linear, and the tiled fp32 path that weight-only
layers take at large batches) live in ``kernels.cpu``, and onnxruntime's W4A8 ``MatMulNBits`` (int4
weights × int8 activations, with its torch reference) in ``kernels.cpu_w4a8``; the quantize
stage's packed modules call them directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import KERNELS, Kernel, resolve_kernel, triton_available
from kernels.fake_quant import fake_quant
from kernels.int4 import pack_int4, torch_w4a16_matmul, unpack_int4
from kernels.merge import task_vector_merge
from kernels.w8a8 import quantize_activations as torch_quantize_activations
from kernels.w8a8 import torch_w8a8_matmul

__all__ = ["KERNELS", "Kernel", "fake_quant", "pack_int4", "quantize_activations", "resolve_kernel", "task_vector_merge",
           "triton_available", "unpack_int4", "w4a16_matmul", "w8a8_matmul"]


def w4a16_matmul(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 kernel: Kernel = "auto") -> Tensor:
    """``x @ (scales * (q - zeros))ᵀ`` for uint4 codes ``q`` packed by ``pack_int4``.

    x (M, K) float; packed (N, K//2) uint8; scales, zeros (N, ceil(K/g)); returns (M, N) in
    x's dtype. See ``kernels.int4`` for the layout.
    """
    if resolve_kernel(kernel, x.device) == "triton":
        from kernels.triton_int4 import triton_w4a16_matmul  # lazy: imports triton

        return triton_w4a16_matmul(x, packed, scales, zeros, group_size)
    return torch_w4a16_matmul(x, packed, scales, zeros, group_size)


def w8a8_matmul(x_q: Tensor, x_scales: Tensor, w_q: Tensor, w_scales: Tensor,
                out_dtype: torch.dtype = torch.float32, kernel: Kernel = "auto") -> Tensor:
    """``(x_q @ w_qᵀ) · x_scales[:, None] · w_scales[None, :]`` with an exact int32 accumulator.

    x_q (M, K) int8 with x_scales (M,) (one per token; per-tensor repeats one value);
    w_q (N, K) int8 with w_scales (N,). Returns (M, N) in ``out_dtype``; ``torch.int32``
    returns the raw accumulator. See ``kernels.w8a8``.
    """
    if resolve_kernel(kernel, x_q.device) == "triton":
        from kernels.triton_w8a8 import triton_w8a8_matmul  # lazy: imports triton

        return triton_w8a8_matmul(x_q, x_scales, w_q, w_scales, out_dtype)
    return torch_w8a8_matmul(x_q, x_scales, w_q, w_scales, out_dtype)


def quantize_activations(x: Tensor, granularity: str = "per_token", kernel: Kernel = "auto") -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 activations: x (M, K) -> (codes int8 (M, K), scales float32 (M,)).

    Per token, the Triton path computes the reference's codes exactly in one kernel; per tensor
    always runs the reference (a whole-tensor maximum first). See ``kernels.w8a8``.
    """
    if granularity == "per_token" and resolve_kernel(kernel, x.device) == "triton":
        from kernels.triton_w8a8 import triton_quantize_activations  # lazy: imports triton

        return triton_quantize_activations(x)
    return torch_quantize_activations(x, granularity)
