"""Model definitions shared by every stage: an MLP, a small CNN and a tiny ViT.

Every model is ``head(backbone(x))``: the backbone maps an input batch to features
(B, F) and the head is one ``nn.Linear(F, num_classes)``. Fine-tuning swaps heads per
task and merging works on the backbone only, so the split is part of the contract.
Inputs are (B, C, H, W) images or (B, L) sequences; sequences run as (B, 1, 1, L) images.

A ViT block whose head count was pruned (``ViTConfig.block_heads``) attends with
``SlimAttention``, which keeps nn.MultiheadAttention's parameter names and layout but an inner
width of kept_heads·head_dim; every other block keeps nn.MultiheadAttention, so an unpruned
ViT's modules, state dict and outputs are those of a ViT without the field. ``block_mlp``
likewise narrows each block's MLP.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
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
    block_heads: list[int] | None = Field(
        default=None, exclude_if=lambda v: v is None,
        description="attention heads of each block, one count per block, each 1..heads (what head pruning "
                    "leaves); None = `heads` in every block. The head dimension stays width // heads. "
                    "Left out of the dump when None, so an unpruned ViT's spec is unchanged")
    block_mlp: list[int] | None = Field(
        default=None, exclude_if=lambda v: v is None,
        description="MLP hidden width of each block, one per block, each 1..mlp (what MLP pruning leaves); "
                    "None = `mlp` in every block. Left out of the dump when None")

    @field_validator("block_heads", "block_mlp")
    @classmethod
    def _one_count_per_block(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        limit_key = "heads" if info.field_name == "block_heads" else "mlp"
        depth, limit = info.data.get("depth"), info.data.get(limit_key)
        if value is None or depth is None or limit is None:  # a bad depth/heads/mlp is reported on its own key
            return value
        if len(value) != depth or not all(1 <= n <= limit for n in value):
            raise ValueError(f"{info.field_name} {value} must give one count per block ({depth} = depth), "
                             f"each 1..{limit} (= {limit_key})")
        return value

    def heads_of(self, block: int) -> int:
        """Attention heads of block ``block`` (0-based)."""
        return self.heads if self.block_heads is None else self.block_heads[block]

    def mlp_of(self, block: int) -> int:
        """MLP hidden width of block ``block`` (0-based)."""
        return self.mlp if self.block_mlp is None else self.block_mlp[block]


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


class SlimAttention(nn.Module):
    """Multi-head attention whose inner width heads·head_dim may be below the model width.

    Parameters as nn.MultiheadAttention names, lays out and initialises them: ``in_proj_weight``
    (3·inner, width) stacks the q, k and v projections, head h owning rows h·head_dim ..
    (h+1)·head_dim − 1 of each; ``in_proj_bias`` (3·inner,); ``out_proj`` Linear(inner, width),
    head h owning its input columns of the same range. Called like
    nn.MultiheadAttention(batch_first=True) without masks or dropout, and it calls ``out_proj``
    as a module, so hooks and layer swaps on it (LoRA, packed quantized layers) take effect.
    """

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = nn.Linear(inner, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention._reset_parameters
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("SlimAttention does not return attention weights; call it with need_weights=False")
        weights, biases = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(t, w, b).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
                   for t, w, b in zip((query, key, value), weights, biases, strict=True))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √hd) v, (B, H, T, hd)
        return self.out_proj(out.transpose(1, 2).flatten(2)), None  # (B, T, width)


class _Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)) with ``mlp`` hidden units.
    A block with fewer than ``heads`` heads (head-pruned) attends with SlimAttention of the same
    head dimension."""

    def __init__(self, width: int, heads: int, mlp: int, kept_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = (nn.MultiheadAttention(width, heads, batch_first=True) if kept_heads == heads
                     else SlimAttention(width, kept_heads, width // heads))
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
        self.blocks = nn.Sequential(*[_Block(cfg.width, cfg.heads, cfg.mlp_of(i), cfg.heads_of(i))
                                      for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(as_image(x)).flatten(2).transpose(1, 2)  # (B, T, D)
        t = self.blocks(t + self.pos)
        return self.norm(t).mean(dim=1)  # mean-pooled tokens, (B, D)


ATTENTION = (nn.MultiheadAttention, SlimAttention)


def weight_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrices/kernels of a model by parameter name: every Linear/Conv2d weight and
    every attention's stacked q/k/v ``in_proj_weight``; what inits draw and pruning may zero."""
    out = {}
    for prefix, module in model.named_modules():
        attr = ("weight" if isinstance(module, (nn.Linear, nn.Conv2d))
                else "in_proj_weight" if isinstance(module, ATTENTION) else None)
        if attr and getattr(module, attr) is not None:
            out[f"{prefix}.{attr}" if prefix else attr] = getattr(module, attr)
    return out


def build_model(cfg: MLPConfig | CNNConfig | ViTConfig, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    """Build an uninitialised-by-policy model; the train stage applies the chosen init."""
    if isinstance(cfg, MLPConfig):
        backbone, width = _mlp(cfg, input_shape)
    elif isinstance(cfg, CNNConfig):
        backbone, width = _cnn(cfg, input_shape)
    else:
        backbone, width = _ViTBackbone(cfg, input_shape), cfg.width
    return Classifier(backbone, width, num_classes)
