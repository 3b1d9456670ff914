"""Real low-bit execution of packed quantized layers (the modules ``packed.load_quantized`` builds).

Each quantized plain nn.Linear becomes a ``PackedLinear`` that runs a real low-bit op, chosen
once at load time by ``execution_module``:

- a ``w8a8`` layer: ``W8A8Linear``, activations quantized to int8 at every call. On CUDA
  (or ``kernel="triton"``) it runs ``kernels.w8a8_matmul``'s Triton kernel; on CPU with
  ``kernel="auto"``, fbgemm's dynamic int8 Linear (``kernels.cpu.int8_dynamic_matmul``,
  its own asymmetric 7-bit-range uint8 activation grid, per tensor or, rows normalised
  first, per token: close to but not bit-identical with ``kernels.w8a8``); with
  ``kernel="torch"`` the exact torch reference.

- CPU, 8-bit per-channel/tensor: ``Int8Linear`` -> ``kernels.cpu.int8_weight_matmul``.
  Weight-only CPU layers (this and ``Int4CpuLinear``) switch to a tile-dequantized fp32 GEMM from
  ``kernels.cpu.DENSE_FROM_ROWS`` rows on, where torch's packed ops run at half fp32's speed.
- CPU, 2/3/4-bit (codes all fit a nibble), ``kernel="auto"``: with ``cpu_int4="w4a16"`` (the
  default) ``Int4CpuLinear`` -> torch's int4pack CPU op (weight-only, bf16 activations), weights
  converted once here, when ``supports_int4_cpu``; with ``cpu_int4="w4a8"`` ``W4A8CpuLinear`` ->
  onnxruntime's MatMulNBits (``kernels.cpu_w4a8``: int8 activations per block of g, several times
  faster at small batches), when ``supports_w4a8_cpu``, else the int4pack op as before.
- CUDA, or an explicit ``kernel="torch"|"triton"``, 2/3/4-bit: ``W4A16Linear`` ->
  ``kernels.w4a16_matmul``.
- Anything else (8-bit groups, shapes the kernels reject, conv layers, and MultiheadAttention's
  out_proj where the in-projection was not quantized: its fused forward reads ``.weight``) gets
  None here and is dequantized once at load into the original module's dense weight (for a
  ``w8a8`` layer this drops the activation quantization: it runs as a weight-only layer).

An attention whose in-projection ``<attn>.in_proj`` was quantized is loaded as its
``attention.QkvAttention``: ``in_proj`` (the stacked W_q, W_k, W_v, (3·inner, width)) and
``out_proj`` are plain Linear layers there, so both become one of the modules above; a
self-attention call runs one low-bit matmul of the stacked weight and chunks it into q, k, v.

A packed module multiplies its input by ``input_scale`` before the low-bit matmul; a layer
dequantized at load gets it folded into its dense weight's columns (ŵ·diag(input_scale)).

LoRC (``lorc.py``): every packed module adds its low-rank correction y += (x V̂ᵀ) Ûᵀ in float32
on the original input x (before ``input_scale``); int8-stored factors are dequantized once at
load (the rank-r products are r·(N + K) multiply-adds per row, no low-bit kernel pays here). A
layer dequantized at load gets ÛV̂ folded into its dense weight (so does every Conv2d).

Output-axis layers (``group_axis``, AdaDim's per-IC groups, scales (N/g, K)) get None here and
are dequantized at load: every kernel above needs its groups along K.

Run a loaded model under ``torch.no_grad()``: the packed modules hold buffers, not
trainable parameters.
"""

from __future__ import annotations

import abc
from typing import Literal, get_args

import torch
from torch import Tensor, nn

import kernels
from kernels.cpu import (
    DENSE_FROM_ROWS,
    int4_weight_matmul,
    int8_dynamic_available,
    int8_dynamic_matmul,
    int8_weight_matmul,
    prepare_int4_cpu,
    prepare_int8_dynamic,
    supports_int4_cpu,
    tiled_dense_matmul,
)
from kernels.cpu_w4a8 import (
    prepare_w4a8_cpu,
    supports_w4a8_cpu,
    w4a8_available,
    w4a8_matmul,
    w4a8_session,
)
from kernels.int4 import dequantize_int4, pack_int4
from tasks.quantize.layerwise import QuantizedLayer
from tasks.quantize.rtn import QuantizedWeight

CpuInt4 = Literal["w4a16", "w4a8"]
CPU_INT4 = get_args(CpuInt4)


def _unsigned(qw: QuantizedWeight) -> tuple[Tensor, Tensor]:
    """Codes in [0, 2^b − 1] (N, K) and float zero-points (N, K/g) for the nibble kernels."""
    if not qw.symmetric:
        return qw.codes.to(torch.uint8), qw.zeros.float()
    offset = 2 ** (qw.bits - 1)
    return (qw.codes.to(torch.int16) + offset).to(torch.uint8), torch.full_like(qw.scales, float(offset))


class PackedLinear(nn.Module, abc.ABC):
    """A Linear whose weight lives in a packed low-bit form; subclasses run the real op."""

    is_packed = True  # the evaluate harness counts this layer by its logical (out, in) size
    bias_in_op = False  # True where the kernel adds the bias itself (fbgemm per-tensor W8A8)

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device):
        super().__init__()
        self.out_features, self.in_features = layer.weight.shape
        self.bits, self.group_size = layer.weight.bits, layer.weight.group_size
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        scale = layer.input_scale
        self.register_buffer("input_scale", None if scale is None else scale.float().to(device))  # (in_features,)
        lorc = layer.lorc
        self.register_buffer("lorc_u", None if lorc is None else lorc.u.float().to(device))  # (N, r)
        self.register_buffer("lorc_v", None if lorc is None else lorc.v.float().to(device))  # (r, K)

    @abc.abstractmethod
    def _matmul(self, x: Tensor) -> Tensor:  # (M, K) -> (M, N)
        """The low-bit matmul of this layer's kernel."""

    def forward(self, x: Tensor) -> Tensor:
        lead, x0 = x.shape[:-1], x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        y = self._matmul(x.reshape(-1, self.in_features))  # (M, N)
        if self.lorc_u is not None:  # LoRC on the original input: (M, K) @ (K, r) @ (r, N)
            y = (y.float() + (x0.float() @ self.lorc_v.t()) @ self.lorc_u.t()).to(y.dtype)
        if self.bias is not None and not self.bias_in_op:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        lorc = "" if self.lorc_u is None else f", lorc_rank={self.lorc_u.shape[1]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}{lorc}")


class Int8Linear(PackedLinear):
    """Per-channel int8 weights on torch's ``_weight_int8pack_mm`` (CPU).

    Asymmetric codes u ∈ [0, 255] run as int8 u − 128 with zero z − 128; the zero term
    ``Σ_k x_k · s_n (z_n − 128)`` is added in fp32. From ``DENSE_FROM_ROWS`` rows on, where the
    packed op is slower than fp32, the weight is dequantized a tile at a time into an fp32 GEMM
    (``kernels.cpu.tiled_dense_matmul``).
    """

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device):
        super().__init__(layer, bias, device)
        qw = layer.weight
        scales = qw.scales[:, 0].float()  # (N,)
        codes = qw.codes if qw.symmetric else (qw.codes.to(torch.int16) - 128).to(torch.int8)
        zero_term = None if qw.symmetric else scales * (qw.zeros[:, 0].float() - 128)  # (N,)
        self.register_buffer("weight_int8", codes.contiguous().to(device))  # (N, K) int8
        self.register_buffer("scales", scales.to(device))
        self.register_buffer("zero_term", None if zero_term is None else zero_term.to(device))

    def _dequantize_rows(self, rows: slice, out: Tensor) -> Tensor:
        return torch.mul(self.weight_int8[rows], self.scales[rows, None], out=out)  # (r, K) codes·s

    def _matmul(self, x: Tensor) -> Tensor:
        if x.shape[0] >= DENSE_FROM_ROWS:
            y = tiled_dense_matmul(x, self.out_features, self._dequantize_rows)
        else:
            y = int8_weight_matmul(x, self.weight_int8, self.scales)  # (M, N)
        if self.zero_term is not None:
            y = (y.float() - x.float().sum(dim=1, keepdim=True) * self.zero_term).to(x.dtype)
        return y


class Int4CpuLinear(PackedLinear):
    """2/3/4-bit group-wise weights on torch's ``_weight_int4pack_mm_for_cpu`` (bf16 activations).

    The op's blocked layout is opaque, so the nibble codes (``pack_int4``, half a byte per weight)
    are kept beside it for the large-batch path: from ``DENSE_FROM_ROWS`` rows on the weight is
    dequantized a tile at a time into an fp32 GEMM (``kernels.cpu.tiled_dense_matmul``).
    """

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device):
        super().__init__(layer, bias, device)
        qw = layer.weight
        codes, zeros = _unsigned(qw)
        packed, scales_and_zeros = prepare_int4_cpu(codes, qw.scales, zeros, qw.group_size)  # converted once
        self.register_buffer("weight_int4pack", packed.to(device))  # (N, K/2) uint8, torch's blocked layout
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device))  # (K/g, N, 2) bf16
        self.register_buffer("qweight", pack_int4(codes).to(device))  # (N, K/2) uint8, our nibbles
        self.register_buffer("group_scales", qw.scales.float().to(device))  # (N, K/g)
        self.register_buffer("group_zeros", zeros.float().to(device))  # (N, K/g)

    def _dequantize_rows(self, rows: slice, out: Tensor) -> Tensor:  # K % g == 0 here (supports_int4_cpu)
        return dequantize_int4(self.qweight[rows], self.group_scales[rows], self.group_zeros[rows], self.group_size,
                               out=out)

    def _matmul(self, x: Tensor) -> Tensor:
        if x.shape[0] >= DENSE_FROM_ROWS:
            return tiled_dense_matmul(x, self.out_features, self._dequantize_rows)
        return int4_weight_matmul(x, self.weight_int4pack, self.scales_and_zeros, self.group_size)


class W4A8CpuLinear(PackedLinear):
    """2/3/4-bit group-wise weights × int8 block-quantized activations on onnxruntime's MatMulNBits (CPU).

    The prepared weight lives in buffers; the onnxruntime session built from it is made on first
    use for the current ``torch.get_num_threads()`` (a session fixes its thread pool) and never
    copied or saved: a deep copy or unpickled module builds its own.
    """

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device):
        super().__init__(layer, bias, device)
        qw = layer.weight
        codes, zeros = _unsigned(qw)
        for name, tensor in prepare_w4a8_cpu(codes, qw.scales, zeros, qw.group_size).items():
            self.register_buffer(f"w4a8_{name}", tensor)
        self._sessions: dict[int, object] = {}

    def _session(self):
        threads = torch.get_num_threads()
        if threads not in self._sessions:
            weight = {name: getattr(self, f"w4a8_{name}") for name in ("B", "scales", "zero_points")}
            self._sessions[threads] = w4a8_session(weight, self.in_features, self.group_size, threads)
        return self._sessions[threads]

    def _matmul(self, x: Tensor) -> Tensor:
        return w4a8_matmul(x, self._session())

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_sessions": {}}


class W8A8Linear(PackedLinear):
    """SmoothQuant W8A8: int8 weights per output channel, activations quantized to int8 at every call.

    ``activations`` is the dynamic scale's granularity (``per_token`` or ``per_tensor``).
    ``engine`` (fixed at load): ``"fbgemm"`` runs ``kernels.cpu.int8_dynamic_matmul`` (CPU,
    ``kernel="auto"``), otherwise ``kernels.w8a8_matmul`` with that kernel setting.
    """

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device, kernel: kernels.Kernel,
                 activations: str):
        super().__init__(layer, bias, device)
        qw = layer.weight
        self.kernel, self.activations = kernel, activations
        self.register_buffer("weight_int8", qw.codes.contiguous().to(device))  # (N, K) int8
        self.register_buffer("scales", qw.scales[:, 0].float().to(device))  # (N,)
        fbgemm = device.type == "cpu" and kernel == "auto" and int8_dynamic_available()
        self.engine = "fbgemm" if fbgemm else kernels.resolve_kernel(kernel, device)
        # per tensor, fbgemm adds the bias in its output stage; per token, the row rescale after the op does
        self.bias_in_op = fbgemm and bias is not None
        prepacked_bias = bias if self.bias_in_op and activations == "per_tensor" else None
        self._prepacked = prepare_int8_dynamic(qw.codes, self.scales.cpu(), prepacked_bias) if fbgemm else None

    def _matmul(self, x: Tensor) -> Tensor:
        if self._prepacked is not None:
            if self.activations == "per_tensor":
                return int8_dynamic_matmul(x, self._prepacked)
            return int8_dynamic_matmul(x, self._prepacked, per_token=True, bias=self.bias)
        x_q, x_scales = kernels.quantize_activations(x, self.activations, self.kernel)  # (M, K) int8, (M,)
        return kernels.w8a8_matmul(x_q, x_scales, self.weight_int8, self.scales, out_dtype=x.dtype, kernel=self.kernel)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations={self.activations}, engine={self.engine}"


class W4A16Linear(PackedLinear):
    """2/3/4-bit group-wise weights in our nibble layout on ``kernels.w4a16_matmul`` (GPU path)."""

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device, kernel: kernels.Kernel):
        super().__init__(layer, bias, device)
        qw = layer.weight
        codes, zeros = _unsigned(qw)
        self.kernel = kernel
        self.register_buffer("qweight", pack_int4(codes).to(device))  # (N, K/2) uint8
        self.register_buffer("scales", qw.scales.to(torch.float16).to(device))  # (N, K/g)
        self.register_buffer("zeros", zeros.to(torch.float16).to(device))  # (N, K/g)

    def _matmul(self, x: Tensor) -> Tensor:
        return kernels.w4a16_matmul(x, self.qweight, self.scales, self.zeros, self.group_size, kernel=self.kernel)


def check_cpu_int4(cpu_int4: str) -> None:
    """Fail early on a bad ``cpu_int4`` setting, or on ``w4a8`` without onnxruntime installed."""
    if cpu_int4 not in CPU_INT4:
        raise ValueError(f"cpu_int4: {cpu_int4!r} is not one of {', '.join(CPU_INT4)}")
    if cpu_int4 == "w4a8" and not w4a8_available():
        raise ValueError("cpu_int4: 'w4a8' runs on onnxruntime, which is not installed "
                         "(pip install 'slimforge[cpu]'), or use 'w4a16'")


def execution_module(layer: QuantizedLayer, bias: Tensor | None, device: torch.device,
                      kernel: kernels.Kernel, activations: str | None = None,
                      cpu_int4: CpuInt4 = "w4a16") -> PackedLinear | None:
    """The packed module that will run this layer, or None to dequantize to dense."""
    qw = layer.weight
    n, k = qw.shape
    if layer.group_axis == "output":
        return None
    if activations is not None:
        return W8A8Linear(layer, bias, device, kernel, activations)
    if qw.bits == 8:
        return Int8Linear(layer, bias, device) if device.type == "cpu" and qw.group_size == k else None
    if device.type == "cpu" and kernel == "auto":
        if cpu_int4 == "w4a8" and supports_w4a8_cpu(qw.group_size, _unsigned(qw)[1]):
            return W4A8CpuLinear(layer, bias, device)
        return Int4CpuLinear(layer, bias, device) if supports_int4_cpu(n, k, qw.group_size) else None
    if k % 2 or qw.group_size % 2:
        return None
    return W4A16Linear(layer, bias, device, kernel)
