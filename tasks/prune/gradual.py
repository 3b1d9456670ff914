"""Gradual magnitude pruning (GMP) and GraNet's zero-cost neuroregeneration.

GMP: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
compression" (2017). Every ΔT steps in [t₀, t₀ + nΔT] prune globally by magnitude to
    s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(nΔT))³.
GraNet: Liu et al., "Sparse Training via Boosting Pruning Plasticity with Neuroregeneration"
(NeurIPS 2021). After each pruning step, per layer, drop a further ρ of the active weights
by magnitude and regrow as many inactive ones with the largest |∇w| (the dense gradient of
the step just taken), starting at exactly 0, so each layer's active count is unchanged. ρ
decays by cosine from ρ₀. ``initial_density < 1`` starts from a random ERK mask (RigL's
Erdős–Rényi-Kernel) at that density: the sparse-to-sparse variant, s_i = 1 − density.

Reconstructed details:
- The window is whole epochs, [start_epoch, end_epoch)·steps_per_epoch; n = ⌊window/ΔT⌋
  pruning steps after t₀. Pruning keeps exactly round((1 − s_t)·N) of the *active* weights
  (ties by index), so GMP never reactivates a weight and the last step hits s_f exactly.
- At t₀ = 0 the first pruning step (to s_i) runs before training, without regrowth: no
  gradient exists yet. GraNet's code likewise takes its first mask update at step ΔT.
- ρ follows ρ₀·½(1 + cos(π j/n)) over the n pruning steps, reaching 0 at the window's end,
  after which the mask is fixed. (GraNet's code anneals ρ over the whole run, to 0.005, and
  keeps regenerating after the pruning window.)
- Drop count per layer is ⌈ρ·active⌉ as in GraNet's code. Regrowth candidates are the
  weights inactive after the drop; a weight dropped and regrown in the same update simply
  stays (GraNet's code keeps its value), so every weight that becomes active is exactly 0.
- Masked weights *and* their optimizer state (SGD momentum, Adam/Lion moments) are zeroed
  after every optimizer step, as GraNet's ``apply_mask`` does for the momentum buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from slimforge.training import FitConfig, MaskHold, fit
from tasks.prune.common import PruneBase, PruneContext, Pruned, RecoveryParams, prunable
from tasks.prune.imp import prune_remaining
from tasks.train.inits.erk import erk_masks


class GradualConfig(PruneBase):
    method: Literal["gmp", "granet"] = "gmp"
    start: Literal["init", "trained"] = Field(
        default="init", description="train from the base's initialisation (as both papers do) or from the trained base")
    final_sparsity: float = Field(default=0.9, gt=0, lt=1, description="s_f, share of prunable weights zeroed at the end")
    initial_sparsity: float | None = Field(default=None, ge=0, lt=1,
                                           description="s_i at t0; None = 1 - initial_density (0 for a dense start)")
    initial_density: float = Field(default=1.0, gt=0, le=1,
                                   description="share of prunable weights active at the start (random ERK mask); "
                                               "1 = dense start, < 1 = sparse-to-sparse")
    prune_every: int = Field(default=100, ge=1, description="ΔT, optimizer steps between pruning steps")
    start_epoch: int = Field(default=0, ge=0, description="t0, in epochs")
    end_epoch: int = Field(default=15, ge=1, description="end of the pruning window, in epochs")
    regrow_fraction: float = Field(default=0.5, ge=0, le=1,
                                   description="ρ0, share of active weights dropped and regrown (granet only)")
    training: FitConfig = Field(default_factory=lambda: FitConfig(epochs=20), description="the training run")
    recovery_params: RecoveryParams = Field(
        default="none", description="the sparse model is trained to completion already; 'none' skips recovery")
    seed: int = Field(default=0, description="seeds the ERK mask and the data order")

    @model_validator(mode="after")
    def _consistent(self) -> GradualConfig:
        if self.start_epoch >= self.end_epoch or self.end_epoch > self.training.epochs:
            raise ValueError(f"prune: need start_epoch < end_epoch <= training.epochs, got {self.start_epoch}, "
                             f"{self.end_epoch}, {self.training.epochs}")
        if self.initial_sparsity is not None and self.initial_sparsity < 1 - self.initial_density - 1e-12:
            raise ValueError(f"prune.initial_sparsity: {self.initial_sparsity} is below the starting sparsity "
                             f"1 - initial_density = {1 - self.initial_density:g}")
        if self.start_sparsity > self.final_sparsity:
            raise ValueError(f"prune.final_sparsity: {self.final_sparsity} is below the starting sparsity "
                             f"{self.start_sparsity:g}")
        return self

    @property
    def start_sparsity(self) -> float:
        return 1 - self.initial_density if self.initial_sparsity is None else self.initial_sparsity


@dataclass
class GradualResult:
    masks: dict[str, Tensor]  # name -> bool keep-mask at the end of training
    history: list[dict] = field(default_factory=list)  # one row per pruning step
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def sparsity_schedule(t: float, t0: float, n: int, dT: float, s_i: float, s_f: float) -> float:
    """Zhu & Gupta's cubic: s_i before t0, s_f from t0 + nΔT on, s_f + (s_i − s_f)(1 − (t−t0)/(nΔT))³ between."""
    progress = (t - t0) / (n * dT)
    if progress <= 0 or progress >= 1:  # the endpoints exactly, so the last step hits s_f to the weight
        return s_i if progress <= 0 else s_f
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


def regrow_rate(j: int, n: int, rho0: float) -> float:
    """ρ at pruning step j of n: cosine from ρ0 (j = 0) to 0 (j = n)."""
    return rho0 * 0.5 * (1.0 + math.cos(math.pi * j / n))


@torch.no_grad()
def prune_and_regrow(model: nn.Module, masks: dict[str, Tensor], rho: float) -> dict[str, Tensor]:
    """GraNet's regeneration: per layer drop ⌈ρ·active⌉ smallest-|w| active weights, regrow as
    many inactive ones with the largest |grad|. Dropped and newly active weights are set to 0
    in ``model``; returns the new masks. Uses each weight's ``.grad`` (left as is when None)."""
    params = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        w, grad = params[name], params[name].grad
        active = int(mask.sum())
        k = min(math.ceil(rho * active), active)
        if k == 0 or grad is None:
            out[name] = mask.clone()
            continue
        flat = mask.flatten()
        mag = torch.where(flat, w.detach().abs().flatten(), math.inf)  # (numel,) inactive never dropped
        dropped = torch.argsort(mag, stable=True)[:k]
        after_drop = flat.clone()
        after_drop[dropped] = False
        score = torch.where(after_drop, -1.0, grad.abs().flatten())  # only inactive candidates compete
        grown = torch.argsort(score, descending=True, stable=True)[:k]
        new = after_drop.clone()
        new[grown] = True
        w.view(-1)[~new | ~flat] = 0.0  # dropped weights and newly active ones (which start at 0)
        out[name] = new.view_as(mask)
    return out


def initial_masks(model: nn.Module, cfg: GradualConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """All-ones masks for a dense start, else a random ERK mask at ``initial_density``."""
    weights = prunable(model)
    if cfg.initial_density >= 1:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    return erk_masks({n: tuple(w.shape) for n, w in weights.items()}, cfg.initial_density, generator)


def train_gradually(model: nn.Module, x: Tensor, y: Tensor, cfg: GradualConfig,
                    generator: torch.Generator) -> GradualResult:
    """Train ``model`` in place while pruning it gradually (GMP), with regeneration (GraNet)."""
    per_epoch = math.ceil(len(x) / cfg.training.batch_size)
    t0, window = cfg.start_epoch * per_epoch, (cfg.end_epoch - cfg.start_epoch) * per_epoch
    n = window // cfg.prune_every
    if n < 1:
        raise ValueError(f"prune.prune_every: {cfg.prune_every} steps exceeds the pruning window of {window} steps "
                         f"(epochs {cfg.start_epoch}-{cfg.end_epoch} at {per_epoch} steps per epoch)")
    weights = prunable(model)
    total = sum(w.numel() for w in weights.values())
    hold = MaskHold(model, initial_masks(model, cfg, generator))
    history: list[dict] = []
    step = 0

    def prune_step(j: int) -> None:
        s = sparsity_schedule(step, t0, n, cfg.prune_every, cfg.start_sparsity, cfg.final_sparsity)
        masks = prune_remaining(weights, hold.masks, s)
        rho = regrow_rate(j, n, cfg.regrow_fraction) if cfg.method == "granet" and step > 0 else 0.0
        if rho > 0:
            masks = prune_and_regrow(model, masks, rho)
        hold.masks = masks
        hold.apply()
        kept = sum(int(m.sum()) for m in masks.values())
        history.append({"step": step, "target_sparsity": s, "sparsity": 1 - kept / total, "rho": rho})

    def after_step(_: nn.Module) -> None:
        nonlocal step
        step += 1
        j, due = divmod(step - t0, cfg.prune_every)
        if due == 0 and 0 <= j <= n:
            prune_step(j)

    if t0 == 0:
        prune_step(0)
    losses = fit(model, x, y, cfg.training, generator, hold=hold, after_step=after_step, label=f"prune {cfg.method}")
    return GradualResult(hold.masks, history, losses)


def prune_gradual(ctx: PruneContext, cfg: GradualConfig) -> Pruned:
    """Registry entry for gmp and granet: train (from the base's init or the trained base) on
    the stage's training set while pruning; the generator seeds the ERK mask and data order."""
    if cfg.start == "init" and ctx.initial_model is None:
        raise ValueError(f"prune.method {cfg.method}: start 'init' needs the base's initialisation, "
                         "which this run lacks; use start: trained")
    model = ctx.initial_model()[0] if cfg.start == "init" else ctx.model
    result = train_gradually(model, ctx.x, ctx.y, cfg, torch.Generator().manual_seed(cfg.seed))
    return Pruned(model, result.masks, report={"pruning_steps": len(result.history),
                                               "final_train_loss": round(result.losses[-1], 6)})
