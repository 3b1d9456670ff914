"""Thin wrappers over torch's packed low-bit CPU kernels (weight-only int8 and int4, and W8A8).

These are the real low-bit GEMMs on CPU (oneDNN/AVX-512 code in ATen), so a quantized
model is timed with the kernel it would really run (DESIGN.md rule 7). Their references
are dequantize-then-matmul (``kernels.int4.torch_w4a16_matmul`` for int4).

Conventions of torch 2.13, found by reading ``torch/_meta_registrations.py`` and the
inductor passes that call these ops, and checked numerically in ``tests/kernels/test_cpu.py``:

``torch._weight_int8pack_mm(x (M, K), w int8 (N, K), scales (N,)) -> (M, N)``
  computes ``x @ (w * scales[:, None])ᵀ``. ``scales`` must have x's dtype. With bfloat16
  activations (the fast path; fp32 activations are ~10x slower than dense fp32) the op
  *crashes the process or returns garbage when K % 8 != 0*, so such layers run the same
  op with fp32 activations instead.

``torch._convert_weight_to_int4pack_for_cpu(q int32 (N, K), innerKTiles) -> uint8 (N, K//2)``
  takes *unpacked* codes in [0, 15] (int32, not our nibble bytes) and returns an opaque
  blocked layout; ``innerKTiles`` is ignored on CPU (we pass 1). Requires N % 16 == 0.

``torch._weight_int4pack_mm_for_cpu(x (M, K), w_packed, group_size, scales_and_zeros)``
  ``scales_and_zeros`` is (K // g, N, 2), in x's dtype, ``[..., 0]`` the scale and
  ``[..., 1]`` a "bias-style" float zero: the op computes ``w = (q - 8) * scale + zero``
  (tinygemm convention). Our ``s * (q - z)`` therefore maps to ``zero = s * (8 - z)``.
  Requires group_size in {32, 64, 128, 256} and K % group_size == 0. bfloat16
  activations are the fast path (fp32 is ~30x slower).

``torch.ops.quantized.linear_dynamic(x fp32, packed, reduce_range)`` (fbgemm, torch.ao's
dynamic quantized Linear) is the W8A8 CPU kernel: it quantizes x *per tensor* at run
time (asymmetric uint8; ``reduce_range=True`` keeps codes in [0, 127] so AVX2's 16-bit
pair sums cannot saturate), multiplies by int8 per-channel weights prepacked by
``linear_prepack`` with int32 accumulation, and rescales to fp32. It is *not* bit-identical
to ``kernels.w8a8`` (its activation grid differs), so it is checked by an SQNR floor.
Measured on this 2-core AVX2 machine: 3x faster than fp32 at batch 1-16 for a 4096×4096
layer, while ``torch._int_mm`` (int8×int8→int32, no activation quantizer) is 20x *slower*.
Per-token scales run on the same op (``int8_dynamic_matmul(..., per_token=True)``): each row
is divided by its max |x| first, so one per-tensor grid over the normalised rows is a
per-token grid, and the output rows are multiplied back (exact: the op is linear per row).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

INT4_CPU_GROUP_SIZES = (32, 64, 128, 256)
_FAST = torch.bfloat16
# Weight-only layers: from this many rows the packed ops lose to an fp32 GEMM of the weight
# dequantized a tile at a time. Measured on a 2-core AVX2 EPYC (2 threads) against fp32: at 256
# rows the int8/int4 ops run at 0.36-0.54x, the tiled path at 0.70-0.90x; at 1024 rows 0.41-0.46x
# against 0.84-0.97x; at 64 rows it depends on the shape (4096x4096 gains, 384x1536 loses).
DENSE_FROM_ROWS = 128
TILE_ROWS = 512  # output rows dequantized at once: 2 MiB of fp32 at K = 1024


def int8_bf16_ok(k: int) -> bool:
    """Whether the bf16 path of ``_weight_int8pack_mm`` is safe for in_features ``k``."""
    return k % 8 == 0


def int8_weight_matmul(x: Tensor, w_int8: Tensor, scales: Tensor) -> Tensor:
    """``x @ (w_int8 * scales[:, None])ᵀ`` on torch's packed int8 CPU kernel.

    x (M, K) float; w_int8 (N, K) int8; scales (N,) float. Activations are cast to
    bfloat16 around the op (fp32 activations make it slower than dense fp32), except when
    K % 8 != 0, where the bf16 kernel is unsafe. Returns (M, N) in x's dtype.
    """
    if x.dim() != 2 or w_int8.dim() != 2 or x.shape[1] != w_int8.shape[1]:
        raise ValueError(f"int8_weight_matmul: x (M, K) and w (N, K) expected, got {tuple(x.shape)}, {tuple(w_int8.shape)}")
    if w_int8.dtype != torch.int8 or scales.shape != (w_int8.shape[0],):
        raise ValueError(f"int8_weight_matmul: w must be int8 (N, K) and scales (N,), got {w_int8.dtype}, {tuple(scales.shape)}")
    dtype = _FAST if int8_bf16_ok(x.shape[1]) else torch.float32
    y = torch._weight_int8pack_mm(x.to(dtype).contiguous(), w_int8.contiguous(), scales.to(dtype))  # (M, N)
    return y.to(x.dtype)


def tiled_dense_matmul(x: Tensor, n: int, dequantize_rows: Callable[[slice, Tensor], Tensor]) -> Tensor:
    """x (M, K) @ Wᵀ -> (M, N) in x's dtype, W (N, K) rebuilt ``TILE_ROWS`` output rows at a time.

    ``dequantize_rows(rows, out)`` writes W[rows] as float32 into ``out`` (len(rows), K) and returns
    it. Only one tile of W is ever float (one reused buffer), so a packed layer keeps its memory;
    the GEMM is fp32's own, so a large batch runs at fp32 speed instead of the packed ops' half.
    """
    xf = x.float()
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    tile = torch.empty(min(TILE_ROWS, n), x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, n, TILE_ROWS):
        rows = slice(start, min(start + TILE_ROWS, n))
        y[:, rows] = xf @ dequantize_rows(rows, tile[: rows.stop - start]).t()
    return y.to(x.dtype)


def supports_int4_cpu(n: int, k: int, group_size: int) -> bool:
    """Whether torch's int4pack CPU kernel accepts an (N, K) weight with this group size."""
    return n > 0 and n % 16 == 0 and group_size in INT4_CPU_GROUP_SIZES and k % group_size == 0


def prepare_int4_cpu(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Convert uint4 codes (N, K) in [0, 15] with scales/zeros (N, K//g) for the int4 CPU op.

    Done once at load time. Returns (packed uint8 in torch's blocked CPU layout,
    scales_and_zeros (K//g, N, 2) bfloat16 with bias-style zeros ``s * (8 - z)``).
    """
    n, k = codes.shape
    if not supports_int4_cpu(n, k, group_size):
        raise ValueError(f"prepare_int4_cpu: weight ({n}, {k}) with group_size {group_size} does not fit torch's "
                         f"int4 CPU kernel (needs N % 16 == 0, group_size in {INT4_CPU_GROUP_SIZES}, K % group_size == 0)")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("prepare_int4_cpu: codes must lie in [0, 15]")
    codes, z = _recenter(codes.to(torch.int32), zeros.float(), group_size)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)  # (N, K/2) uint8
    s = scales.float()  # (N, K/g)
    scales_and_zeros = torch.stack((s, s * (8.0 - z)), dim=-1).transpose(0, 1)  # (K/g, N, 2)
    return packed, scales_and_zeros.contiguous().to(_FAST)


def _recenter(codes: Tensor, zeros: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Shift each group's codes and zero together so the zero sits as close to 8 as fits.

    s * (q - z) is unchanged, but the op's bf16 terms (q - 8) * s and s * (8 - z) shrink
    to the size of the weight itself, so 2/3-bit codes in [0, 3] or [0, 7] do not lose
    precision to the cancellation of two large bf16 numbers.
    """
    n, k = codes.shape
    grouped = codes.reshape(n, k // group_size, group_size)  # (N, K/g, g)
    low, high = -grouped.amin(dim=2), 15 - grouped.amax(dim=2)  # (N, K/g) room to shift
    shift = torch.minimum(torch.maximum(8 - zeros.round().to(torch.int32), low), high)  # (N, K/g)
    return (grouped + shift[..., None]).reshape(n, k), zeros + shift


def int4_weight_matmul(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """x (M, K) float @ the int4 weight prepared by ``prepare_int4_cpu`` -> (M, N) in x's dtype."""
    y = torch._weight_int4pack_mm_for_cpu(x.to(scales_and_zeros.dtype).contiguous(), packed,
                                          group_size, scales_and_zeros)  # (M, N)
    return y.to(x.dtype)


def int8_dynamic_available() -> bool:
    """Whether torch was built with a quantized CPU engine (fbgemm/x86) for ``linear_dynamic``."""
    return any(e in torch.backends.quantized.supported_engines for e in ("fbgemm", "x86"))


def prepare_int8_dynamic(w_int8: Tensor, scales: Tensor, bias: Tensor | None = None):
    """Prepack symmetric int8 codes (N, K) with per-channel scales (N,) for ``int8_dynamic_matmul``.

    Done once at load time; returns fbgemm's opaque packed weight. A ``bias`` (N,) is added by
    the op itself, in its output stage (one pass over the output fewer); only the per-tensor
    path may take one, since per-token rescales the op's output rows afterwards.
    """
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2 or scales.shape != (w_int8.shape[0],):
        raise ValueError(f"prepare_int8_dynamic: expected int8 (N, K) and scales (N,), got {w_int8.dtype} "
                         f"{tuple(w_int8.shape)}, {tuple(scales.shape)}")
    zeros = torch.zeros(w_int8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch deprecates quantized tensors, but this op still needs one
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(w_int8.cpu(), scales.double().cpu(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float().cpu())


def int8_dynamic_matmul(x: Tensor, packed, per_token: bool = False, bias: Tensor | None = None) -> Tensor:
    """x (M, K) float @ prepacked int8 weightᵀ (+ bias), x quantized at run time -> (M, N) in x's dtype.

    Per tensor by default; ``per_token`` normalises each row by its max |x| before the op's
    per-tensor quantizer and scales the output row back, giving every token its own grid.
    ``bias`` (N,) is for the per-token path, where it joins the row rescale in one pass
    (``addcmul``); a per-tensor call gets its bias prepacked (``prepare_int8_dynamic``).
    """
    xf = x.float()
    if not per_token:
        if bias is not None:
            raise ValueError("int8_dynamic_matmul: per tensor, prepack the bias with prepare_int8_dynamic")
        return torch.ops.quantized.linear_dynamic(xf.contiguous(), packed, True).to(x.dtype)  # reduce_range: AVX2
    row_max = xf.abs().amax(dim=1, keepdim=True)  # (M, 1); 13x faster here than vector_norm(inf)
    row_max = row_max.masked_fill_(row_max == 0, 1.0)
    y = torch.ops.quantized.linear_dynamic((xf / row_max).contiguous(), packed, True)  # (M, N)
    y = y.mul_(row_max) if bias is None else torch.addcmul(bias.float(), y, row_max)
    return y.to(x.dtype)
