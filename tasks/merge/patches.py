"""Weight patches: a task vector stored compactly, added, scaled or removed from a base.

Cai et al., "Robust Weight Signatures: Gaining Robustness as Easy as Patching Weights?"
(2023): the difference between a model fine-tuned on a corruption and the clean model (the
"robust weight signature", RWS) concentrates in the shallow layers, so it can be kept only
there, compressed, and then added to a base (θ₀ + s·δ), scaled, combined with other signatures
(θ₀ + Σ_i s_i·δ_i) or removed (s = −1). The paper restricts a signature to the first layers
and stores it compressed; we offer the two compressions it names (low rank, and low-bit
quantization) as settings, each of which may be used alone or together:

- ``layers``: fnmatch patterns over tensor names; other tensors are left out of the patch.
- ``rank``: a matrix delta (N, …) reshaped to (N, K) is stored as its rank-r truncated SVD
  factors U_rΣ_r^½ (N, r) and Σ_r^½V_rᵀ (r, K) (Eckart–Young: the closest rank-r matrix);
  vectors (biases) and matrices whose rank is already ≤ r are stored whole.
- ``bits``: 16 stores floats as fp16; 8 and 4 store every stored matrix (factor or whole) as
  symmetric per-row integer codes with one fp32 scale per row, s = max|row| / (2^(b−1) − 1);
  4-bit codes are packed two per byte (``kernels.pack_int4``, offset by 8).

A patch is a dict of tensors plus a layout (name -> shape and stored form) that the stage
writes as safetensors metadata; ``delta`` decodes it back to full-size tensors.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from kernels import pack_int4, unpack_int4


class PatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                              description="fnmatch patterns over tensor names kept in the patch")
    rank: int | None = Field(default=None, ge=1, description="store matrices as rank-r SVD factors")
    bits: Literal[32, 16, 8, 4] = Field(default=32, description="storage of the stored values")


@dataclass
class Patch:
    tensors: dict[str, Tensor]  # stored form
    layout: dict[str, dict]  # tensor name -> {"shape": [...], "form": "whole" | "lowrank"}
    bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _encode(matrix: Tensor, bits: int) -> dict[str, Tensor]:
    """One 2-D matrix (R, C) in the storage of ``bits``: keys '' (values) and, for ints, 'scale'."""
    if bits == 32:
        return {"": matrix.float().contiguous()}
    if bits == 16:
        return {"": matrix.half().contiguous()}
    qmax = 2 ** (bits - 1) - 1
    top = matrix.abs().amax(dim=1)  # (R,)
    scale = torch.where(top > 0, top / qmax, torch.ones_like(top)).float()
    codes = torch.round(matrix / scale[:, None]).clamp(-qmax, qmax)  # (R, C)
    if bits == 8:
        return {"": codes.to(torch.int8).contiguous(), "scale": scale}
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)  # pad C to even
    return {"": pack_int4((codes + 8).to(torch.uint8)), "scale": scale}


def _decode(stored: dict[str, Tensor], bits: int, cols: int) -> Tensor:
    values = stored[""]
    if bits in (32, 16):
        return values.float()
    codes = values.float() if bits == 8 else unpack_int4(values)[:, :cols].float() - 8
    return codes * stored["scale"][:, None]


def _parts(matrix: Tensor, rank: int | None) -> tuple[str, list[Tensor]]:
    if rank is None or matrix.shape[0] == 1 or rank >= min(matrix.shape):
        return "whole", [matrix]
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return "lowrank", [(u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()]  # (N, r), (r, K)


def make_patch(tau: dict[str, Tensor], cfg: PatchConfig) -> Patch:
    """The compact patch of task vector ``tau`` (only float tensors matching ``cfg.layers``)."""
    tensors, layout = {}, {}
    for name, delta in tau.items():
        if not delta.is_floating_point() or not any(fnmatch.fnmatchcase(name, p) for p in cfg.layers):
            continue
        matrix = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
        form, parts = _parts(matrix, cfg.rank)
        layout[name] = {"shape": list(delta.shape), "form": form}
        for part, key in zip(parts, ("u", "v") if form == "lowrank" else ("w",), strict=True):
            for suffix, t in _encode(part, cfg.bits).items():
                tensors[f"{name}.{key}{'.' + suffix if suffix else ''}"] = t
    if not layout:
        raise ValueError(f"patch: no float tensor matches layers {cfg.layers}")
    return Patch(tensors, layout, cfg.bits)


def _stored(patch: Patch, name: str, key: str, cols: int) -> Tensor:
    """Decode the stored part ``key`` (w, u or v) of tensor ``name`` to a float (R, cols) matrix."""
    prefix = f"{name}.{key}"
    parts = {k[len(prefix):].lstrip("."): v for k, v in patch.tensors.items()
             if k == prefix or k.startswith(prefix + ".")}
    return _decode(parts, patch.bits, cols)


def patch_delta(patch: Patch) -> dict[str, Tensor]:
    """The full-size tensors a patch stands for."""
    out = {}
    for name, entry in patch.layout.items():
        shape = entry["shape"]
        rows = shape[0] if len(shape) > 1 else 1
        cols = int(torch.Size(shape).numel()) // rows
        if entry["form"] == "lowrank":
            v = _stored(patch, name, "v", cols)  # (r, K)
            matrix = _stored(patch, name, "u", v.shape[0]) @ v  # (N, r) @ (r, K)
        else:
            matrix = _stored(patch, name, "w", cols)
        out[name] = matrix.reshape(shape)
    return out


def apply_patches(base: dict[str, Tensor], patches: list[tuple[Patch, float]]) -> dict[str, Tensor]:
    """θ₀ + Σ_i s_i·δ_i: add (s > 0), scale, or remove (s < 0) patches; other tensors stay θ₀'s."""
    out = {name: w.clone() for name, w in base.items()}
    for patch, scale in patches:
        for name, delta in patch_delta(patch).items():
            if name not in out:
                raise ValueError(f"patch: tensor {name!r} is not in the base model")
            if out[name].shape != delta.shape:
                raise ValueError(f"patch: tensor {name!r} has shape {tuple(delta.shape)}, "
                                 f"the base has {tuple(out[name].shape)}")
            out[name] = out[name] + scale * delta.to(out[name].dtype)
    return out
