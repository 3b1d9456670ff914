"""Packed storage of quantized models (every PTQ method, and W8A8), and loading them back.

Storage (``quantize_model``, ``pack_layers``): every nn.Linear and nn.Conv2d weight, viewed as
(N, K) = (out, in·kh·kw), and every attention's stacked q/k/v ``in_proj_weight`` (3·inner, width),
the layer ``<attn>.in_proj`` (``attention.py``), whose K fits the granularity (group_size divides
K; for 4-bit also K even) is quantized by the variant's method and replaced in the safetensors
state (``<name>.weight``, or ``<attn>.in_proj_weight``) by

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
- ``<name>.lorc_u`` (N, r) and ``<name>.lorc_v`` (r, K): LoRC's low-rank correction ÛV̂ of
  the quantization error (``lorc.py``, any PTQ method with ``lorc_rank`` > 0), float16, or
  int8 symmetric codes with float32 row scales ``<name>.lorc_u_scales`` (N,) and
  ``<name>.lorc_v_scales`` (r,). The layer computes ŵ·(x ⊙ input_scale) + Û(V̂x) on its
  original input x. Metadata: ``lorc`` lists these layers, ``lorc_bits`` is 16, 8 (or 0: none).
- an output-axis layer (``group_axis: output``, or chosen by ``adaptive``: AdaDim's per-IC
  groups) stores the codes, scales and zeros of Wᵀ (K, N) under the same names, so its groups
  run along the output rows of W; ``<name>.transposed`` is a one-byte uint8 marker (1,) and
  the metadata key ``group_axis_output`` lists these layers.

The metadata key ``w8a8`` (a JSON object, absent in files from before it: read as ``{}``)
marks layers whose *activations* are quantized too, mapping each such layer to its dynamic
activation granularity, ``per_token`` or ``per_tensor`` (SmoothQuant variants mark every
packed layer). Their weights are 8-bit symmetric with one scale per output channel or tensor.
With ``activations: adaptive`` each layer has its own; the writer passes them to the metadata
through one-byte uint8 markers ``<name>.per_token`` (1,), which are stored but not read back.

An in-projection's tensors are ``<attn>.in_proj.qweight`` (3·inner rows: W_q, W_k, W_v),
``<attn>.in_proj.scales`` and so on, as above; its bias stays ``<attn>.in_proj_bias``.
Everything else (biases, norms, layers that do not fit) stays float32 under its own name.
Files from before LoRC and group axes lack those keys and read as having none.

Loading (``load_quantized``) checks every stored tensor against the model, then hands each
layer to ``execution.execution_module``, which picks the real low-bit module that runs it
(documented there); a layer it declines is dequantized once at load into the original
module's dense weight (LoRC's ÛV̂ folded in). An attention whose in-projection is packed is
replaced by its ``QkvAttention`` first, so ``<attn>.in_proj`` (and its out_proj) are Linear
modules there and run packed like any other. Output-axis layers are always dequantized at load:
the CPU int8/int4 kernels and ``kernels.w4a16_matmul`` need groups along K, so such a layer
saves bytes on disk, not time.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

import kernels
from kernels.bitpack import pack_bits, packed_width, unpack_bits
from kernels.int4 import pack_int4, unpack_int4
from slimforge.artifacts import WEIGHTS, ArtifactError, load_tensors, save_tensors
from tasks.quantize.attention import in_proj_owners, split_attentions, weight_key
from tasks.quantize.execution import CpuInt4, check_cpu_int4, execution_module
from tasks.quantize.layerwise import QuantizedLayer
from tasks.quantize.lorc import apply_lorc, read_low_rank, store_low_rank
from tasks.quantize.rtn import GridConfig, QuantizedWeight

FORMAT = "slimforge.packed/1"
_SUFFIXES = ("qweight", "scales", "zeros", "input_scale", "lorc_u", "lorc_v", "lorc_u_scales", "lorc_v_scales",
             "transposed", "per_token")
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
    """``model``'s safetensors-ready state with each layer in ``layers`` stored packed.

    A training method's result may carry ``tensors``, float tensors it trained besides the
    quantized layers ({state-dict key: tensor}, e.g. QAT's QKR in-projections); they are stored
    in place of ``model``'s."""
    extra = getattr(layers, "tensors", {})
    unknown = sorted(set(extra) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"pack_layers: trained tensors {unknown} are not in the model's state dict")
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in (model.state_dict() | extra).items()}
    for name, layer in layers.items():
        qw = layer.weight
        del state[weight_key(model, name)]  # (N, K) float: <name>.weight or <attn>.in_proj_weight
        state[f"{name}.qweight"] = _store_codes(qw).contiguous()
        state[f"{name}.scales"] = qw.scales.to(torch.float16).contiguous()  # (N, K/g)
        if qw.zeros is not None:
            state[f"{name}.zeros"] = qw.zeros.to(torch.uint8).contiguous()  # (N, K/g)
        if layer.input_scale is not None:
            state[f"{name}.input_scale"] = layer.input_scale.float().contiguous()  # (C_in,)
        if layer.lorc is not None:
            state.update(store_low_rank(name, layer.lorc))  # (N, r), (r, K)
        if layer.group_axis == "output":
            state[f"{name}.transposed"] = torch.ones(1, dtype=torch.uint8)  # qweight/scales/zeros hold Wᵀ
        if layer.activations == "per_token":  # chosen per layer (adaptive): packed_layout reads it back
            state[f"{name}.per_token"] = torch.ones(1, dtype=torch.uint8)
    return state


def quantize_model(model: nn.Module, cfg: GridConfig, x: Tensor | None = None) -> dict[str, Tensor]:
    """Quantize every fitting Linear/Conv2d weight with cfg's method, calibrated on inputs ``x``
    (RTN needs none), with LoRC when cfg.lorc_rank > 0; return a safetensors-ready state."""
    from tasks.quantize import get_method  # the registry imports this module

    return pack_layers(model, apply_lorc(model, get_method(cfg.method).quantize(model, x, cfg), cfg))


def packed_layout(cfg: GridConfig, tensors: dict[str, Tensor]) -> dict[str, str]:
    """safetensors metadata describing how ``tensors`` (from ``quantize_model``) are packed."""
    packed, lorc = _layers_with(tensors, "qweight"), _layers_with(tensors, "lorc_u")
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
        "w8a8": json.dumps(w8a8_granularity(cfg, tensors, packed)),
        "group_axis": cfg.group_axis,
        "group_axis_output": json.dumps(_layers_with(tensors, "transposed")),
        "lorc": json.dumps(lorc),
        "lorc_bits": str(0 if not lorc else 8 if tensors[f"{lorc[0]}.lorc_u"].dtype == torch.int8 else 16),
    }


def w8a8_granularity(cfg: GridConfig, tensors: dict[str, Tensor], packed: list[str]) -> dict[str, str]:
    """layer -> activation granularity for a config whose method quantizes activations too (SmoothQuant's
    ``w8a8``); ``adaptive`` resolves per layer from the ``<layer>.per_token`` markers ``pack_layers`` wrote."""
    setting = getattr(cfg, "w8a8", None)
    if not setting:
        return {}
    if setting != "adaptive":
        return {name: setting for name in packed}
    per_token = set(_layers_with(tensors, "per_token"))
    return {name: "per_token" if name in per_token else "per_tensor" for name in packed}


def _layers_with(tensors: dict[str, Tensor], suffix: str) -> list[str]:
    return sorted(k[: -len(suffix) - 1] for k in tensors if k.endswith(f".{suffix}"))


class Layout(NamedTuple):
    """What a packed file's metadata says: the grid, the packed layers, and which carry extras."""

    bits: int
    symmetric: bool
    names: list[str]
    scaled: set[str]  # layers with an input_scale
    w8a8: dict[str, str]  # layer -> activation granularity, for W8A8 layers
    bitpacked: bool  # 2/3-bit codes bit-packed (False: one per byte, files from before bit packing)
    transposed: set[str]  # output-axis layers: the codes are those of Wᵀ
    lorc: set[str]  # layers with LoRC factors
    lorc_bits: int  # their storage: 16 (float16) or 8 (int8 + row scales)


def _read_layout(metadata: dict[str, str] | None) -> Layout:
    if not metadata or metadata.get("format") != FORMAT:
        raise ArtifactError(f"quantized weights: metadata format is not {FORMAT!r}; was the file made by quantize?")
    try:
        bits, symmetric = int(metadata["bits"]), metadata["symmetric"] == "true"
        names = json.loads(metadata["packed"])
        scaled = set(json.loads(metadata.get("input_scales", "[]")))  # files from before input scales have none
        w8a8 = json.loads(metadata.get("w8a8", "{}"))  # files from before W8A8 have none
        transposed = set(json.loads(metadata.get("group_axis_output", "[]")))  # nor these, before group axes
        lorc, lorc_bits = set(json.loads(metadata.get("lorc", "[]"))), int(metadata.get("lorc_bits", "0"))  # or LoRC
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"quantized weights: unreadable packed-layout metadata ({e})") from None
    if bits not in (2, 3, 4, 8):
        raise ArtifactError(f"quantized weights: bits {bits} is not one of 2, 3, 4, 8")
    if not scaled <= set(names):
        raise ArtifactError(f"quantized weights: input_scales names layers that are not packed: {sorted(scaled - set(names))}")
    for key, listed in (("group_axis_output", transposed), ("lorc", lorc)):
        if not listed <= set(names):
            raise ArtifactError(f"quantized weights: {key} names layers that are not packed: {sorted(listed - set(names))}")
    if lorc and lorc_bits not in (8, 16):
        raise ArtifactError(f"quantized weights: lorc_bits {lorc_bits} is not 8 or 16")
    if transposed & set(w8a8):
        raise ArtifactError(f"quantized weights: w8a8 layers cannot be output-axis: {sorted(transposed & set(w8a8))}")
    _check_w8a8(w8a8, names, bits, symmetric, metadata.get("granularity"))
    return Layout(bits, symmetric, names, scaled, w8a8, metadata.get("code_storage") != BYTE_STORAGE,
                  transposed, lorc, lorc_bits)


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
    n_out, k_in = module.weight.shape[0], module.weight[0].numel()
    axis = "output" if name in layout.transposed else "input"
    n, k = (k_in, n_out) if axis == "output" else (n_out, k_in)  # the stored matrix: W or Wᵀ
    c_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
    try:
        stored, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"].float()
        zeros = None if symmetric else tensors[f"{name}.zeros"].float()
        input_scale = tensors[f"{name}.input_scale"].float() if scaled else None
        lorc = read_low_rank(tensors, name, layout.lorc_bits, n_out, k_in) if name in layout.lorc else None
    except ValueError as e:
        raise ArtifactError(f"quantized weights: {e}") from None
    except KeyError as e:
        raise ArtifactError(f"quantized weights: {e.args[0]} is missing") from None
    want = torch.int8 if bits == 8 and symmetric else torch.uint8
    if stored.dtype != want:
        raise ArtifactError(f"quantized weights: {name}.qweight is {stored.dtype}, expected {want}")
    codes = _unpack_codes(stored, name, bits, k, layout.bitpacked)  # (N, K)
    if tuple(codes.shape) != (n, k) or scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
        raise ArtifactError(f"quantized weights: {name} holds codes {tuple(codes.shape)} / scales "
                            f"{tuple(scales.shape)}, which do not fit the model's weight ({n_out}, {k_in})"
                            + (" transposed (group_axis_output)" if axis == "output" else ""))
    if input_scale is not None and tuple(input_scale.shape) != (c_in,):
        raise ArtifactError(f"quantized weights: {name}.input_scale has shape {tuple(input_scale.shape)}, "
                            f"expected ({c_in},), one per input channel")
    if symmetric and bits < 8:
        codes = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    return QuantizedLayer(QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits,
                                          group_size=k // scales.shape[1], shape=(n, k)), input_scale, axis, lorc)


def _load_rest(model: nn.Module, tensors: dict[str, Tensor], names: list[str]) -> None:
    quantized = {f"{n}.{s}" for n in names for s in _SUFFIXES}
    rest = {k: v for k, v in tensors.items() if k not in quantized}
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ArtifactError(f"quantized weights do not match the model: {e}") from None
    weights = {weight_key(model, n) for n in names}  # <name>.weight, or <attn>.in_proj_weight
    if unexpected or set(missing) != weights:
        extra = sorted(set(missing) - weights)
        raise ArtifactError(f"quantized weights do not match the model: missing {extra[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")


def read_layers(model: nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> dict[str, QuantizedLayer]:
    """The QuantizedLayer of every packed layer in ``tensors``, checked against ``model``'s shapes."""
    layout = _read_layout(metadata)
    owners = in_proj_owners(model, layout.names)
    if owners:  # packed in-projections are Linear modules of the split attentions
        model = copy.deepcopy(model)
        split_attentions(model, owners)
    try:
        modules = {name: model.get_submodule(name) for name in layout.names}
    except AttributeError as e:
        raise ArtifactError(f"quantized weights do not match the model: {e}") from None
    return {name: _read_quantized(tensors, name, layout, m) for name, m in modules.items()}


def load_quantized(model: nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str] | None,
                   kernel: kernels.Kernel = "auto", cpu_int4: CpuInt4 = "w4a16") -> nn.Module:
    """Load ``quantize_model`` output into ``model`` (same architecture), in place.

    Every tensor is checked before the model is touched, so a bad file raises an
    ArtifactError and leaves ``model`` unchanged.

    ``kernel`` picks the W4A16 and W8A8 implementation (``kernels.resolve_kernel``); on CPU,
    ``"auto"`` uses torch's packed CPU ops instead (for W8A8, fbgemm where it applies), and
    ``cpu_int4`` picks the 2/3/4-bit one there: torch's weight-only int4pack op (``w4a16``) or
    onnxruntime's int4 × int8 MatMulNBits (``w4a8``, ``execution.W4A8CpuLinear``).
    """
    params = next(model.parameters(), None)
    device = params.device if params is not None else torch.device("cpu")
    kernels.resolve_kernel(kernel, device)  # fail early on a bad setting
    check_cpu_int4(cpu_int4)
    layers = read_layers(model, tensors, metadata)
    w8a8 = _read_layout(metadata).w8a8
    _load_rest(copy.deepcopy(model), tensors, list(layers))  # validate everything before touching the model
    _load_rest(model, tensors, list(layers))
    split_attentions(model, in_proj_owners(model, layers))
    for name, layer in layers.items():
        module = model.get_submodule(name)
        packed = (execution_module(layer, module.bias, device, kernel, w8a8.get(name), cpu_int4)
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


def read_packed(directory) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """A packed artifact directory's stored tensors and the layout in its safetensors metadata."""
    path = Path(directory) / WEIGHTS
    tensors = load_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return tensors, f.metadata()
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: unreadable safetensors metadata ({e})") from None


def dequantized_state(model: nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> dict[str, Tensor]:
    """The float state dict a packed file stands for: each packed layer's weight (an attention's
    ``in_proj_weight`` for its in-projection) is its effective weight; every other stored tensor
    is kept as stored; codes, scales and the other packing tensors are dropped."""
    layers = read_layers(model, tensors, metadata)
    keys = set(model.state_dict())
    storage = {k for k in tensors for layer in layers if k.startswith(f"{layer}.") and k not in keys}
    state = {k: v for k, v in tensors.items() if k not in storage}
    for name, layer in layers.items():
        key = weight_key(model, name)
        state[key] = layer.effective_weight().float().reshape(model.get_parameter(key).shape).contiguous()
    return state


def load_packed_artifact(directory, model: nn.Module, kernel: kernels.Kernel = "auto",
                         cpu_int4: CpuInt4 = "w4a16") -> nn.Module:
    """A packed quantized artifact directory loaded into ``model`` (same architecture)."""
    tensors, metadata = read_packed(directory)
    return load_quantized(model, tensors, metadata, kernel, cpu_int4).eval()
