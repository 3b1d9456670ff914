"""W4A8 on CPU: group-wise uint4 weights × int8 activations, on onnxruntime's ``MatMulNBits``.

torch's int4pack CPU op (``kernels.cpu``) keeps activations in bf16 and unpacks the nibbles
to floats; on an AVX2 machine without AVX-512 that unpacking, not memory, bounds it (about
2.3× fp32 for a 4096×4096 layer at batch 1). onnxruntime's ``com.microsoft.MatMulNBits``
with ``accuracy_level=4`` (MLAS's SQNBit "CompInt8" path) quantizes the activations too and
multiplies int4 by int8 with integer dot products (``vpmaddubsw``), which runs near memory
speed: 7–9× fp32 at batch 1 on 2 threads here (``benchmarks/kernels.py``).

What it computes (the spec, ``torch_w4a8_matmul``): the weight is ours, unchanged,
``ŵ[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g])`` with integer zero points in [0, 15]; each row
of x is cut along K into blocks of the same g, and every block is quantized symmetric int8
on its own grid, ``a = round(x / d)``, ``d = max|x_block| / 127`` (round half to even); then
``y = Σ_blocks d · (a · ŵ_blockᵀ)``. So the activations get per-token-per-group scales, finer
than SmoothQuant's per-token ones. onnxruntime's output matches this reference to fp32
rounding (> 90 dB SQNR in ``tests/kernels/test_cpu_w4a8.py``), not to the dense fp32 product
(about 44 dB on random weights: that is the int8 activation grid's own error).

Layout given to onnxruntime (built once at load by ``prepare_w4a8_cpu``): B uint8
(N, ⌈K/g⌉, g/2), our ``pack_int4`` nibbles (low nibble the even k) cut per block, the last
block zero-padded;
scales fp32 (N, ⌈K/g⌉); zero points uint8 (N, ⌈⌈K/g⌉/2⌉), two per byte, low nibble first.
``block_size`` must be a power of two in [16, 256]. One ``InferenceSession`` per weight and
thread count (sessions fix their thread pool; ``w4a8_session``), with spinning off so idle
onnxruntime threads do not steal the cores from the torch ops that run between layers.

onnxruntime is an optional dependency (the ``[cpu]`` extra); ``w4a8_available`` says whether
it imports, and the quantize stage only picks this path when asked (``quantize.cpu_int4``).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.int4 import pack_int4
from kernels.w8a8 import quantize_activations

W4A8_BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVEL_INT8 = 4  # MatMulNBits: compute with int8 activations (MLAS CompInt8)


def w4a8_available() -> bool:
    """Whether onnxruntime and onnx (the ``[cpu]`` extra) are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def supports_w4a8_cpu(group_size: int, zeros: Tensor) -> bool:
    """Whether a weight with this group size and these zero points fits ``MatMulNBits``."""
    integral = bool(((zeros - zeros.round()).abs() == 0).all() and zeros.min() >= 0 and zeros.max() <= 15)
    return group_size in W4A8_BLOCK_SIZES and integral


def prepare_w4a8_cpu(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> dict[str, Tensor]:
    """The three weight inputs of ``MatMulNBits`` from codes (N, K) in [0, 15] and scales, zeros (N, ⌈K/g⌉).

    Returns {"B": uint8 (N, ⌈K/g⌉, g/2), "scales": fp32 (N, ⌈K/g⌉), "zero_points": uint8 (N, ⌈⌈K/g⌉/2⌉)}.
    """
    n, k = codes.shape
    blocks = -(-k // group_size)
    if not supports_w4a8_cpu(group_size, zeros):
        raise ValueError(f"prepare_w4a8_cpu: group_size must be one of {W4A8_BLOCK_SIZES} and zero points integers "
                         f"in [0, 15], got group_size {group_size}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("prepare_w4a8_cpu: codes must lie in [0, 15]")
    if scales.shape != (n, blocks) or zeros.shape != (n, blocks):
        raise ValueError(f"prepare_w4a8_cpu: scales and zeros must be ({n}, {blocks}), got "
                         f"{tuple(scales.shape)}, {tuple(zeros.shape)}")
    padded = F.pad(codes.to(torch.uint8), (0, blocks * group_size - k))  # (N, blocks·g)
    z = F.pad(zeros.round().to(torch.uint8), (0, blocks % 2))  # (N, even)
    return {"B": pack_int4(padded).reshape(n, blocks, group_size // 2),  # our nibble layout, cut per block
            "scales": scales.float().contiguous(), "zero_points": pack_int4(z)}


def w4a8_session(weight: dict[str, Tensor], in_features: int, group_size: int, threads: int):
    """An onnxruntime session computing x (M, K) fp32 -> (M, N) with the prepared weight baked in."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    b, scales, zero_points = (weight[k].cpu().numpy() for k in ("B", "scales", "zero_points"))
    n = b.shape[0]
    inits = [helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True),
             helper.make_tensor("zero_points", TensorProto.UINT8, zero_points.shape, zero_points.tobytes(), raw=True)]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=in_features, N=n, bits=4, block_size=group_size, accuracy_level=ACCURACY_LEVEL_INT8)
    graph = helper.make_graph([node], "w4a8", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", in_features])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def w4a8_matmul(x: Tensor, session) -> Tensor:
    """x (M, K) float through a ``w4a8_session`` -> (M, N) in x's dtype."""
    y = session.run(None, {"A": x.detach().float().contiguous().cpu().numpy()})[0]
    return torch.from_numpy(y).to(x.dtype)


def quantize_activation_blocks(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """x (M, K) -> int8 codes (M, ⌈K/g⌉, g) and scales (M, ⌈K/g⌉, 1): symmetric absmax/127 per block,
    i.e. ``kernels.w8a8.quantize_activations`` per token with every block of g a token of its own."""
    m, k = x.shape
    blocks = -(-k // group_size)
    xb = F.pad(x.float(), (0, blocks * group_size - k)).reshape(m * blocks, group_size)
    codes, scales = quantize_activations(xb, "per_token")  # (M·blocks, g), (M·blocks,)
    return codes.reshape(m, blocks, group_size), scales.reshape(m, blocks, 1)


def torch_w4a8_matmul(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """The reference: int8 block-quantized x times the dequantized uint4 weight, in fp32 -> x's dtype."""
    m, k = x.shape
    a, d = quantize_activation_blocks(x, group_size)
    x_hat = (a.float() * d).reshape(m, -1)[:, :k]  # (M, K) the activations the kernel multiplies
    s, z = (t.float().repeat_interleave(group_size, dim=1)[:, :k] for t in (scales, zeros))  # (N, K) each
    w_hat = s * (codes.float() - z)
    return (x_hat @ w_hat.t()).to(x.dtype)
