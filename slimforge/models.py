"""Model definitions shared by every stage: an MLP, a small CNN and a tiny ViT.

Every model is ``head(backbone(x))``: the backbone maps an input batch to features
(B, F) and the head is one ``nn.Linear(F, num_classes)``. Fine-tuning swaps heads per
task and merging works on the backbone only, so the split is part of the contract.
Inputs are (B, C, H, W) images or (B, L) sequences; sequences run as (B, 1, 1, L) images.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MLPConfig(_Strict):
    arch: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default=[256, 256], description="widths of the hidden layers")


class CNNConfig(_Strict):
    arch: Literal["cnn"] = "cnn"
    channels: list[int] = Field(default=[16, 32], description="conv widths, one 3x3 conv + 2x pool each")
    hidden: int = Field(default=128, ge=0, description="width of the FC layer before the head; 0 = none")


class ViTConfig(_Strict):
    arch: Literal["vit"] = "vit"
    patch: int = Field(default=7, ge=1, description="patch side in pixels")
    width: int = Field(default=64, ge=8)
    depth: int = Field(default=4, ge=1, le=12)
    heads: int = Field(default=4, ge=1)
    mlp: int = Field(default=128, ge=8)


ModelConfig = Annotated[MLPConfig | CNNConfig | ViTConfig, Field(discriminator="arch")]


def as_image(x: Tensor) -> Tensor:
    """(B, L) -> (B, 1, 1, L); (B, C, H, W) unchanged."""
    return x[:, None, None, :] if x.dim() == 2 else x


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _mlp(cfg: MLPConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width


def _cnn(cfg: CNNConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    c, h, w = as_image(torch.zeros(1, *input_shape)).shape[1:]
    kernel, pool = ((1, 3), (1, 2)) if h == 1 else ((3, 3), (2, 2))
    layers: list[nn.Module] = []
    for out in cfg.channels:
        layers += [nn.Conv2d(c, out, kernel, padding="same"), nn.ReLU(), nn.MaxPool2d(pool)]
        c, h, w = out, h // pool[0], w // pool[1]
        if h == 0 or w == 0:
            raise ValueError(f"cnn.channels: {len(cfg.channels)} pooling layers do not fit input {input_shape}")
    layers.append(nn.Flatten())
    width = c * h * w
    if cfg.hidden:
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    return _ImageInput(nn.Sequential(*layers)), width


class _ImageInput(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(as_image(x))


class _Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _ViTBackbone(nn.Module):
    def __init__(self, cfg: ViTConfig, input_shape: tuple[int, ...]):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"vit.width {cfg.width} is not divisible by vit.heads {cfg.heads}")
        c, h, w = as_image(torch.zeros(1, *input_shape)).shape[1:]
        patch = (1, cfg.patch) if h == 1 else (cfg.patch, cfg.patch)
        if h % patch[0] or w % patch[1]:
            raise ValueError(f"vit.patch {cfg.patch} does not divide the input {input_shape}")
        tokens = (h // patch[0]) * (w // patch[1])
        self.embed = nn.Conv2d(c, cfg.width, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, cfg.width))
        self.blocks = nn.Sequential(*[_Block(cfg.width, cfg.heads, cfg.mlp) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(as_image(x)).flatten(2).transpose(1, 2)  # (B, T, D)
        t = self.blocks(t + self.pos)
        return self.norm(t).mean(dim=1)  # mean-pooled tokens, (B, D)


def build_model(cfg: MLPConfig | CNNConfig | ViTConfig, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    """Build an uninitialised-by-policy model; the train stage applies the chosen init."""
    if isinstance(cfg, MLPConfig):
        backbone, width = _mlp(cfg, input_shape)
    elif isinstance(cfg, CNNConfig):
        backbone, width = _cnn(cfg, input_shape)
    else:
        backbone, width = _ViTBackbone(cfg, input_shape), cfg.width
    return Classifier(backbone, width, num_classes)
