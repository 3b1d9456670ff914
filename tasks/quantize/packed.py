"""Packed storage and real low-bit execution of quantized models (every PTQ method, and W8A8).

Storage (``quantize_model``, ``pack_layers``): every nn.Linear and nn.Conv2d weight, viewed as
(N, K) = (out, in·kh·kw), whose K fits the granularity (group_size divides K; for 4-bit also K
even) is quantized by the variant's method and replaced in the safetensors state by

- ``<name>.qweight``: 8-bit: the codes, int8 if symmetric, uint8 if asymmetric.
  4-bit: unsigned codes packed two per byte along K by ``kernels.int4.pack_int4``
  (uint8 (N, K/2)). 2/3-bit: unsigned codes bit-packed along K by ``kernels.bitpack.pack_bits``,
  each row a little-endian bit stream zero-padded to whole bytes: 2-bit four codes per byte
  (lowest in-feature in the low bits), uint8 (N, ceil(K/4)); 3-bit eight codes in three
  bytes, uint8 (N, 3·ceil(K/8)). K is the model's (the loader reads it from the weight shape).
  Files written before bit packing hold one 2/3-bit code per uint8 byte (N, K); their
  metadata ``code_storage`` reads ``"one unsigned code per uint8 byte"`` and they still load.
  Below 8 bits, symmetric codes q ∈ [−2^(b−1), 2^(b−1)−1] are stored as q + 2^(b−1).
- ``<name>.scales``: float16 (N, K/g); per-channel and per-tensor use g = K.
- ``<name>.zeros``: uint8 (N, K/g) integer zero-points, only when asymmetric.
- ``<name>.input_scale``: float32 (C_in,), only for layers whose method scales the input
  (AWQ's 1/s): the layer computes ŵ·(x ⊙ input_scale), one factor per input feature of a
  Linear or input channel of a Conv2d. The metadata key ``input_scales`` lists these layers.
  SmoothQuant's migration is stored the same way (1/s).

The metadata key ``w8a8`` (a JSON object, absent in files from before it: read as ``{}``)
marks layers whose *activations* are quantized too, mapping each such layer to its dynamic
activation granularity, ``per_token`` or ``per_tensor`` (SmoothQuant variants mark every
packed layer). Their weights are 8-bit symmetric with one scale per output channel or tensor.

Everything else (biases, norms, layers that do not fit) stays float32 under its own name.

Execution (``load_quantized``): each quantized plain nn.Linear becomes a ``PackedLinear``
that runs a real low-bit op, chosen once at load time:

- a ``w8a8`` layer: ``W8A8Linear``, activations quantized to int8 at every call. On CUDA
  (or ``kernel="triton"``) it runs ``kernels.w8a8_matmul``'s Triton kernel; on CPU with
  ``kernel="auto"``, fbgemm's dynamic int8 Linear (``kernels.cpu.int8_dynamic_matmul``,
  its own asymmetric 7-bit-range uint8 activation grid, per tensor or, rows normalised
  first, per token: close to but not bit-identical with ``kernels.w8a8``); with
  ``kernel="torch"`` the exact torch reference.

- CPU, 8-bit per-channel/tensor: ``Int8Linear`` -> ``kernels.cpu.int8_weight_matmul``.
- CPU, 2/3/4-bit (codes all fit a nibble), ``kernel="auto"``: ``Int4CpuLinear`` ->
  torch's int4pack CPU op, weights converted once here, when ``supports_int4_cpu``.
- CUDA, or an explicit ``kernel="torch"|"triton"``, 2/3/4-bit: ``W4A16Linear`` ->
  ``kernels.w4a16_matmul``.
- Anything else (8-bit groups, shapes the kernels reject, conv layers, Linear layers that
  other modules read ``.weight`` from such as MultiheadAttention's out_proj) is
  dequantized once at load into the original module's dense weight (for a ``w8a8`` layer
  this drops the activation quantization: it runs as a weight-only layer).

A packed module multiplies its input by ``input_scale`` before the low-bit matmul; a layer
dequantized at load gets it folded into its dense weight's columns (ŵ·diag(input_scale)).

Run a loaded model under ``torch.no_grad()``: the packed modules hold buffers, not
trainable parameters.
"""

from __future__ import annotations

import abc
import copy
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

import kernels
from kernels.bitpack import pack_bits, packed_width, unpack_bits
from kernels.cpu import (
    int4_weight_matmul,
    int8_dynamic_available,
    int8_dynamic_matmul,
    int8_weight_matmul,
    prepare_int4_cpu,
    prepare_int8_dynamic,
    supports_int4_cpu,
)
from kernels.int4 import pack_int4, unpack_int4
from slimforge.artifacts import WEIGHTS, ArtifactError, load_tensors, save_tensors
from tasks.quantize.layerwise import QuantizedLayer
from tasks.quantize.rtn import GridConfig, QuantizedWeight

FORMAT = "slimforge.packed/1"
_SUFFIXES = ("qweight", "scales", "zeros", "input_scale")
ACTIVATIONS = ("per_token", "per_tensor")
BYTE_STORAGE = "one unsigned code per uint8 byte"  # 2/3-bit code_storage of files from before bit packing
CODE_STORAGE = {8: "int8 if symmetric else uint8, one code per byte",
                4: "uint4 nibbles, low nibble = even in-feature (kernels.int4.pack_int4)",
                3: "uint3 little-endian bit stream along K, eight codes in three bytes, "
                   "rows zero-padded to a multiple of 8 codes (kernels.bitpack.pack_bits)",
                2: "uint2, four codes per byte along K, low bits = lowest in-feature, "
                   "rows zero-padded to a multiple of 4 codes (kernels.bitpack.pack_bits)"}


def _store_codes(qw: QuantizedWeight) -> Tensor:
    if qw.bits == 8:
        return qw.codes  # int8 (symmetric) or uint8 (asymmetric), (N, K)
    unsigned = qw.codes if not qw.symmetric else (qw.codes.to(torch.int16) + 2 ** (qw.bits - 1)).to(torch.uint8)
    return pack_int4(unsigned) if qw.bits == 4 else pack_bits(unsigned, qw.bits)  # (N, K/2) or (N, packed_width(K, b))


def pack_layers(model: nn.Module, layers: dict[str, QuantizedLayer]) -> dict[str, Tensor]:
    """``model``'s safetensors-ready state with each layer in ``layers`` stored packed."""
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    for name, layer in layers.items():
        qw = layer.weight
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = _store_codes(qw).contiguous()
        state[f"{name}.scales"] = qw.scales.to(torch.float16).contiguous()  # (N, K/g)
        if qw.zeros is not None:
            state[f"{name}.zeros"] = qw.zeros.to(torch.uint8).contiguous()  # (N, K/g)
        if layer.input_scale is not None:
            state[f"{name}.input_scale"] = layer.input_scale.float().contiguous()  # (C_in,)
    return state


def quantize_model(model: nn.Module, cfg: GridConfig, x: Tensor | None = None) -> dict[str, Tensor]:
    """Quantize every fitting Linear/Conv2d weight with cfg's method, calibrated on inputs ``x``
    (RTN needs none); return a safetensors-ready state."""
    from tasks.quantize import get_method  # the registry imports this module

    return pack_layers(model, get_method(cfg.method).quantize(model, x, cfg))


def packed_layout(cfg: GridConfig, tensors: dict[str, Tensor]) -> dict[str, str]:
    """safetensors metadata describing how ``tensors`` (from ``quantize_model``) are packed."""
    packed = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    return {
        "format": FORMAT,
        "method": cfg.method,
        "bits": str(cfg.bits),
        "granularity": cfg.granularity,
        "group_size": str(cfg.group_size),
        "symmetric": str(cfg.symmetric).lower(),
        "code_storage": CODE_STORAGE[cfg.bits],
        "code_offset": str(2 ** (cfg.bits - 1) if cfg.symmetric and cfg.bits < 8 else 0),
        "packed": json.dumps(packed),
        "input_scales": json.dumps(sorted(k[: -len(".input_scale")] for k in tensors if k.endswith(".input_scale"))),
        # a config whose method quantizes activations too (SmoothQuant) has a ``w8a8`` granularity
        "w8a8": json.dumps({name: cfg.w8a8 for name in packed} if getattr(cfg, "w8a8", None) else {}),
    }


class Layout(NamedTuple):
    """What a packed file's metadata says: the grid, the packed layers, and which carry extras."""

    bits: int
    symmetric: bool
    names: list[str]
    scaled: set[str]  # layers with an input_scale
    w8a8: dict[str, str]  # layer -> activation granularity, for W8A8 layers
    bitpacked: bool  # 2/3-bit codes bit-packed (False: one per byte, files from before bit packing)


def _read_layout(metadata: dict[str, str] | None) -> Layout:
    if not metadata or metadata.get("format") != FORMAT:
        raise ArtifactError(f"quantized weights: metadata format is not {FORMAT!r}; was the file made by quantize?")
    try:
        bits, symmetric = int(metadata["bits"]), metadata["symmetric"] == "true"
        names = json.loads(metadata["packed"])
        scaled = set(json.loads(metadata.get("input_scales", "[]")))  # files from before input scales have none
        w8a8 = json.loads(metadata.get("w8a8", "{}"))  # files from before W8A8 have none
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"quantized weights: unreadable packed-layout metadata ({e})") from None
    if bits not in (2, 3, 4, 8):
        raise ArtifactError(f"quantized weights: bits {bits} is not one of 2, 3, 4, 8")
    if not scaled <= set(names):
        raise ArtifactError(f"quantized weights: input_scales names layers that are not packed: {sorted(scaled - set(names))}")
    _check_w8a8(w8a8, names, bits, symmetric, metadata.get("granularity"))
    return Layout(bits, symmetric, names, scaled, w8a8, metadata.get("code_storage") != BYTE_STORAGE)


def _check_w8a8(w8a8, names: list[str], bits: int, symmetric: bool, granularity: str | None) -> None:
    if not isinstance(w8a8, dict):
        raise ArtifactError(f"quantized weights: w8a8 must map layer names to {' or '.join(ACTIVATIONS)}")
    if not w8a8:
        return
    if not set(w8a8) <= set(names):
        raise ArtifactError(f"quantized weights: w8a8 names layers that are not packed: {sorted(set(w8a8) - set(names))}")
    bad = sorted(v for v in set(w8a8.values()) if v not in ACTIVATIONS)
    if bad:
        raise ArtifactError(f"quantized weights: w8a8 activation granularity {bad[0]!r} is not one of {', '.join(ACTIVATIONS)}")
    if bits != 8 or not symmetric or granularity == "group":
        raise ArtifactError(f"quantized weights: w8a8 layers need 8-bit symmetric per-channel or per-tensor weights, "
                            f"the file holds {bits}-bit {'symmetric' if symmetric else 'asymmetric'} {granularity}")


def _unpack_codes(stored: Tensor, name: str, bits: int, k: int, bitpacked: bool) -> Tensor:
    """The stored codes of layer ``name`` as one code per byte (N, K), unsigned below 8 bits."""
    if bits == 4:
        return unpack_int4(stored)
    if bits == 8 or not bitpacked:
        return stored
    if stored.dim() != 2 or stored.shape[1] != packed_width(k, bits):
        raise ArtifactError(f"quantized weights: {name}.qweight has shape {tuple(stored.shape)}, expected "
                            f"(N, {packed_width(k, bits)}): {bits}-bit codes bit-packed along K={k}")
    return unpack_bits(stored, bits, k)


def _read_quantized(tensors: dict[str, Tensor], name: str, layout: Layout, module: nn.Module) -> QuantizedLayer:
    """Rebuild the QuantizedLayer of layer ``name`` (weight (N, K)) from stored tensors."""
    bits, symmetric, scaled = layout.bits, layout.symmetric, name in layout.scaled
    n, k = module.weight.shape[0], module.weight[0].numel()
    c_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
    try:
        stored, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"].float()
        zeros = None if symmetric else tensors[f"{name}.zeros"].float()
        input_scale = tensors[f"{name}.input_scale"].float() if scaled else None
    except KeyError as e:
        raise ArtifactError(f"quantized weights: {e.args[0]} is missing") from None
    want = torch.int8 if bits == 8 and symmetric else torch.uint8
    if stored.dtype != want:
        raise ArtifactError(f"quantized weights: {name}.qweight is {stored.dtype}, expected {want}")
    codes = _unpack_codes(stored, name, bits, k, layout.bitpacked)  # (N, K)
    if tuple(codes.shape) != (n, k) or scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
        raise ArtifactError(f"quantized weights: {name} holds codes {tuple(codes.shape)} / scales "
                            f"{tuple(scales.shape)}, which do not fit the model's weight ({n}, {k})")
    if input_scale is not None and tuple(input_scale.shape) != (c_in,):
        raise ArtifactError(f"quantized weights: {name}.input_scale has shape {tuple(input_scale.shape)}, "
                            f"expected ({c_in},), one per input channel")
    if symmetric and bits < 8:
        codes = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    return QuantizedLayer(QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits,
                                          group_size=k // scales.shape[1], shape=(n, k)), input_scale)


def _unsigned(qw: QuantizedWeight) -> tuple[Tensor, Tensor]:
    """Codes in [0, 2^b − 1] (N, K) and float zero-points (N, K/g) for the nibble kernels."""
    if not qw.symmetric:
        return qw.codes.to(torch.uint8), qw.zeros.float()
    offset = 2 ** (qw.bits - 1)
    return (qw.codes.to(torch.int16) + offset).to(torch.uint8), torch.full_like(qw.scales, float(offset))


class PackedLinear(nn.Module, abc.ABC):
    """A Linear whose weight lives in a packed low-bit form; subclasses run the real op."""

    is_packed = True  # the evaluate harness counts this layer by its logical (out, in) size

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device):
        super().__init__()
        self.out_features, self.in_features = layer.weight.shape
        self.bits, self.group_size = layer.weight.bits, layer.weight.group_size
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        scale = layer.input_scale
        self.register_buffer("input_scale", None if scale is None else scale.float().to(device))  # (in_features,)

    @abc.abstractmethod
    def _matmul(self, x: Tensor) -> Tensor:  # (M, K) -> (M, N)
        """The low-bit matmul of this layer's kernel."""

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        y = self._matmul(x.reshape(-1, self.in_features))  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class Int8Linear(PackedLinear):
    """Per-channel int8 weights on torch's ``_weight_int8pack_mm`` (CPU).

    Asymmetric codes u ∈ [0, 255] run as int8 u − 128 with zero z − 128; the zero term
    ``Σ_k x_k · s_n (z_n − 128)`` is added in fp32.
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

    def _matmul(self, x: Tensor) -> Tensor:
        y = int8_weight_matmul(x, self.weight_int8, self.scales)  # (M, N)
        if self.zero_term is not None:
            y = (y.float() - x.float().sum(dim=1, keepdim=True) * self.zero_term).to(x.dtype)
        return y


class Int4CpuLinear(PackedLinear):
    """2/3/4-bit group-wise weights on torch's ``_weight_int4pack_mm_for_cpu`` (bf16 activations)."""

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, device: torch.device):
        super().__init__(layer, bias, device)
        qw = layer.weight
        codes, zeros = _unsigned(qw)
        packed, scales_and_zeros = prepare_int4_cpu(codes, qw.scales, zeros, qw.group_size)  # converted once
        self.register_buffer("weight_int4pack", packed.to(device))  # (N, K/2) uint8, torch's blocked layout
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device))  # (K/g, N, 2) bf16

    def _matmul(self, x: Tensor) -> Tensor:
        return int4_weight_matmul(x, self.weight_int4pack, self.scales_and_zeros, self.group_size)


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
        self._prepacked = prepare_int8_dynamic(qw.codes, self.scales.cpu()) if fbgemm else None

    def _matmul(self, x: Tensor) -> Tensor:
        if self._prepacked is not None:
            return int8_dynamic_matmul(x, self._prepacked, per_token=self.activations == "per_token")
        x_q, x_scales = kernels.quantize_activations(x, self.activations)  # (M, K) int8, (M,)
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


def _execution_module(layer: QuantizedLayer, bias: Tensor | None, device: torch.device,
                      kernel: kernels.Kernel, activations: str | None = None) -> PackedLinear | None:
    """The packed module that will run this layer, or None to dequantize to dense."""
    qw = layer.weight
    n, k = qw.shape
    if activations is not None:
        return W8A8Linear(layer, bias, device, kernel, activations)
    if qw.bits == 8:
        return Int8Linear(layer, bias, device) if device.type == "cpu" and qw.group_size == k else None
    if device.type == "cpu" and kernel == "auto":
        return Int4CpuLinear(layer, bias, device) if supports_int4_cpu(n, k, qw.group_size) else None
    if k % 2 or qw.group_size % 2:
        return None
    return W4A16Linear(layer, bias, device, kernel)


def _load_rest(model: nn.Module, tensors: dict[str, Tensor], names: list[str]) -> None:
    quantized = {f"{n}.{s}" for n in names for s in _SUFFIXES}
    rest = {k: v for k, v in tensors.items() if k not in quantized}
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ArtifactError(f"quantized weights do not match the model: {e}") from None
    if unexpected or set(missing) != {f"{n}.weight" for n in names}:
        extra = sorted(set(missing) - {f"{n}.weight" for n in names})
        raise ArtifactError(f"quantized weights do not match the model: missing {extra[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")


def read_layers(model: nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> dict[str, QuantizedLayer]:
    """The QuantizedLayer of every packed layer in ``tensors``, checked against ``model``'s shapes."""
    layout = _read_layout(metadata)
    try:
        modules = {name: model.get_submodule(name) for name in layout.names}
    except AttributeError as e:
        raise ArtifactError(f"quantized weights do not match the model: {e}") from None
    return {name: _read_quantized(tensors, name, layout, m) for name, m in modules.items()}


def load_quantized(model: nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str] | None,
                   kernel: kernels.Kernel = "auto") -> nn.Module:
    """Load ``quantize_model`` output into ``model`` (same architecture), in place.

    Every tensor is checked before the model is touched, so a bad file raises an
    ArtifactError and leaves ``model`` unchanged.

    ``kernel`` picks the W4A16 and W8A8 implementation (``kernels.resolve_kernel``); on CPU,
    ``"auto"`` uses torch's packed CPU ops instead (for W8A8, fbgemm where it applies).
    """
    params = next(model.parameters(), None)
    device = params.device if params is not None else torch.device("cpu")
    kernels.resolve_kernel(kernel, device)  # fail early on a bad setting
    layers = read_layers(model, tensors, metadata)
    w8a8 = _read_layout(metadata).w8a8
    _load_rest(copy.deepcopy(model), tensors, list(layers))  # validate everything before touching the model
    _load_rest(model, tensors, list(layers))
    for name, layer in layers.items():
        module = model.get_submodule(name)
        packed = (_execution_module(layer, module.bias, device, kernel, w8a8.get(name))
                  if type(module) is nn.Linear else None)
        if packed is None:
            with torch.no_grad():
                module.weight.copy_(layer.effective_weight().reshape(module.weight.shape))
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
    return model


def save_packed(path, tensors: dict[str, Tensor], cfg: GridConfig) -> None:
    """Write ``quantize_model`` output with its layout in the safetensors metadata."""
    save_tensors(path, tensors, metadata=packed_layout(cfg, tensors))


def load_packed_artifact(directory, model: nn.Module, kernel: kernels.Kernel = "auto") -> nn.Module:
    """A packed quantized artifact directory loaded into ``model`` (same architecture)."""
    path = Path(directory) / WEIGHTS
    tensors = load_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: unreadable safetensors metadata ({e})") from None
    return load_quantized(model, tensors, metadata, kernel).eval()
