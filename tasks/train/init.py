"""Weight initialisation registry (train.init): one scheme per module in ``tasks/train/inits/``.

Dense draws (a function of one weight's shape and the generator):
  kaiming               He et al., "Delving Deep into Rectifiers" (ICCV 2015)
  xavier                Glorot & Bengio (AISTATS 2010)
  orthogonal            Saxe et al. (ICLR 2014)
  generalized_gaussian  "It Takes a Good Model to Train a Good Model: Generalized Gaussian Priors"
  effective_rank        Liu et al., "How Connectivity Structure Shapes Rich and Lazy Learning" (ICLR 2024)
Whole-model schemes:
  erk         Evci et al., "Rigging the Lottery" (ICML 2020): ERK masks over a dense draw
  rewind      Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis" (ICML 2020)
  pretrained  a safetensors checkpoint of the same architecture

A drawn init re-draws every Linear/Conv2d weight and attention in_proj_weight, zeroes
biases, sets LayerNorm to (1, 0) and the ViT position embedding ``pos`` to N(0, 0.02²).
``initialize`` returns the sparsity masks ({param name: bool tensor}) the training loop must
keep applying: ERK's, or a rewind's mask file; empty for every other scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimforge.models import ATTENTION, weight_params
from tasks.train.init_config import parse_init
from tasks.train.inits.effective_rank import effective_rank
from tasks.train.inits.erk import erk_masks
from tasks.train.inits.generalized_gaussian import generalized_gaussian
from tasks.train.inits.kaiming import kaiming
from tasks.train.inits.orthogonal import orthogonal
from tasks.train.inits.pretrained import load_pretrained
from tasks.train.inits.rewind import rewind
from tasks.train.inits.xavier import xavier

__all__ = ["DRAWS", "INITS", "initialize", "kaiming", "orthogonal", "redraw",
           "xavier", "zero_masked"]

# scheme -> draw(weight, generator, **settings) -> a new tensor of the weight's shape
DRAWS: dict[str, Callable[..., Tensor]] = {
    "kaiming": kaiming,
    "xavier": xavier,
    "orthogonal": orthogonal,
    "generalized_gaussian": generalized_gaussian,
    "effective_rank": effective_rank,
}


@torch.no_grad()
def zero_masked(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Set the weights each bool mask marks False to +0.0 exactly; kept values untouched."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].masked_fill_(~mask, 0.0)


@torch.no_grad()
def redraw(model: nn.Module, draw: Callable[[Tensor], Tensor], g: torch.Generator) -> None:
    """Weights from ``draw`` in module order, biases 0, LayerNorm (1, 0), ViT ``pos`` N(0, 0.02²)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.copy_(draw(module.weight))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, ATTENTION) and module.in_proj_weight is not None:
            module.in_proj_weight.copy_(draw(module.in_proj_weight))
            module.in_proj_bias.zero_()
    for name, p in model.named_parameters():
        if name.endswith("pos"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # ViT position embedding, (1, T, D)


def _dense(model: nn.Module, cfg: Any, g: torch.Generator, root: Path | None) -> dict[str, Tensor]:
    draw, settings = DRAWS[cfg.scheme], cfg.model_dump(exclude={"scheme"})
    redraw(model, lambda w: draw(w, g, **settings), g)
    return {}


@torch.no_grad()
def _erk(model: nn.Module, cfg: Any, g: torch.Generator, root: Path | None) -> dict[str, Tensor]:
    draw = DRAWS[cfg.base]
    redraw(model, lambda w: draw(w, g), g)
    weights = weight_params(model)
    masks = erk_masks({k: tuple(p.shape) for k, p in weights.items()}, cfg.density, g)
    zero_masked(model, masks)
    return masks


def _rewind(model: nn.Module, cfg: Any, g: torch.Generator, root: Path | None) -> dict[str, Tensor]:
    return rewind(model, cfg.run, cfg.step, cfg.mask, root)


def _pretrained(model: nn.Module, cfg: Any, g: torch.Generator, root: Path | None) -> dict[str, Tensor]:
    load_pretrained(model, cfg.path, root)
    return {}


# The registry, keyed by the YAML name (train.init.scheme).
INITS: dict[str, Callable[..., dict[str, Tensor]]] = {
    **{scheme: _dense for scheme in DRAWS},
    "erk": _erk,
    "rewind": _rewind,
    "pretrained": _pretrained,
}


def initialize(model: nn.Module, cfg: Any, g: torch.Generator, root: Path | None = None) -> dict[str, Tensor]:
    """Initialise ``model`` in place per ``cfg`` (a config, its dict or a bare scheme name).

    ``root`` is the workspace root that relative checkpoint paths (rewind, pretrained) are
    resolved against. Returns {param name: bool mask} of weights held at zero (erk, a masked
    rewind), else {}.
    """
    cfg = parse_init(cfg)
    return INITS[cfg.scheme](model, cfg, g, root)
