"""What every prune method shares: the recovery settings, the context a method is given and
the result it returns.

Recovery (``recovery_params``) after pruning:
  all   a masked fine-tune of every parameter (pruned weights held at zero after each step);
  perp  PERP, "Parameter-Efficient Retraining after Pruning" (Zimmer et al., 2023): retrain only
        the biases and normalisation parameters, which the paper finds recovers most of the
        accuracy at a fraction of the trainable parameters; the weights keep their mask
        trivially, since they do not move;
  perp_lora  PERP's biases and norms plus its MaskLoRA adapters on every prunable layer, whose
        update is multiplied by the pruning mask and merged back afterwards
        (``tasks.prune.perp``), so the weights move but keep exactly their mask;
  none  keep the pruned weights as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from slimforge.models import weight_params
from slimforge.training import FitConfig
from tasks.select.output import DataSource

RecoveryParams = Literal["all", "perp", "perp_lora", "none"]
LORA_RANK = 4  # perp_lora defaults for our small models, not the paper's LLM settings
LORA_ALPHA = 8.0


class PruneBase(BaseModel):
    """Fields every ``prune.method`` config has."""

    model_config = ConfigDict(extra="forbid")

    recovery: FitConfig = Field(default_factory=lambda: FitConfig(lr=5e-4, epochs=2),
                                description="fine-tune after pruning")
    recovery_params: RecoveryParams = Field(
        default="all", description="all = masked full fine-tune; perp = biases and norms only; perp_lora = perp "
                                   "plus masked LoRA adapters, merged back; none = no recovery")
    recovery_lora_rank: int | None = Field(
        default=None, ge=1, description=f"rank r of each masked LoRA adapter (perp_lora only); None = {LORA_RANK}")
    recovery_lora_alpha: float | None = Field(
        default=None, gt=0, description=f"LoRA alpha; the update is scaled by alpha/r (perp_lora only); "
                                        f"None = {LORA_ALPHA:g}")
    recovery_data: DataSource = Field(default_factory=DataSource,
                                      description="what recovery trains on (e.g. the select stage's coreset)")
    random_baseline: bool = Field(
        default=False, description="also write prune/random_baseline: a random mask with the same per-layer "
                                   "kept counts, recovered the same way (masked methods only)")
    seed: int = 0

    @model_validator(mode="after")
    def _lora_fields_need_perp_lora(self) -> PruneBase:
        for key in ("recovery_lora_rank", "recovery_lora_alpha"):
            if getattr(self, key) is not None and self.recovery_params != "perp_lora":
                raise ValueError(f"prune.{key}: set only with recovery_params: perp_lora "
                                 f"(got recovery_params: {self.recovery_params})")
        return self


@dataclass
class PruneContext:
    """What a method may use: the trained ``model`` (a private copy it may change), its
    architecture, the training set (x, y), ``initial_model()``: the base at its
    initialisation with the train stage's generator right after drawing it, and ``val``: a
    held-out (x, y) a method may report on (never train or select on)."""

    model: nn.Module
    model_config: BaseModel  # the base's architecture config (CNNConfig, MLPConfig, ViTConfig)
    input_shape: tuple[int, ...]
    num_classes: int
    x: Tensor
    y: Tensor
    generator: torch.Generator
    initial_model: Callable[[], tuple[nn.Module, torch.Generator]] | None = None
    val: tuple[Tensor, Tensor] | None = None


@dataclass
class Pruned:
    """A method's result: the pruned module, its keep-masks (None for dense structured or
    low-rank results), a replacement model config for a physically smaller model, low-rank
    ranks, the parameter names a method wants recovery to train with ``recovery_params: all``
    (None = every parameter; WeLore trains only its low-rank factors), and a report of
    method-specific figures for the metrics."""

    model: nn.Module
    masks: dict[str, Tensor] | None = None
    model_config: BaseModel | None = None
    ranks: dict[str, int] | None = None
    trainable: list[str] | None = None
    report: dict = field(default_factory=dict)


def prunable(model: nn.Module) -> dict[str, Tensor]:
    """name -> every weight pruning may zero: Linear/Conv2d weights and attention q/k/v
    projections (``slimforge.models.weight_params``); biases and norms never."""
    return weight_params(model)


def keep_largest(scores: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` largest entries of a flat tensor, ties by lower index."""
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def split_like(flat: Tensor, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """A flat mask over the concatenated weights, cut back into one tensor per weight."""
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = flat[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return out


def perp_parameters(model: nn.Module) -> list[nn.Parameter]:
    """PERP's trainable set: every bias and every normalisation layer's parameters."""
    norms = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
    out = [p for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)]
    seen = {id(p) for p in out}
    out += [p for n, p in model.named_parameters() if n.endswith("bias") and id(p) not in seen]
    return out


def sparsity_report(model: nn.Module, masks: dict[str, Tensor] | None) -> dict:
    """Zeros as a share of the prunable weights (Linear/Conv weights) and of all parameters."""
    weights = prunable(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    all_total = sum(p.numel() for p in model.parameters())
    out = {"sparsity": round(zeros / max(total, 1), 6), "sparsity_all_params": round(all_zeros / all_total, 6),
           "parameters": all_total}
    if masks is not None:
        out["masked_layers"] = len(masks)
    return out
