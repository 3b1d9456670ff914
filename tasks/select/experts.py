"""Expert trajectories for trajectory matching: networks trained on the real data, one
flattened parameter vector saved at initialisation and after every epoch.

Cazenavette et al., "Dataset Distillation by Matching Training Trajectories" (CVPR 2022),
reference ``buffer.py`` (GeorgeCazenavette/mtt-distillation): each expert is a fresh network
trained with plain SGD (lr 0.01, no momentum, no weight decay, batch 256); the trajectory
is [θ*_0, θ*_1, ..., θ*_T], θ*_0 the initialisation.

Smoothing (``regularization``) from Shen, Yang & Lam, "Efficient Dataset Distillation through
Alignment with Smooth and High-Quality Expert Trajectories" (AST, arXiv 2310.10541), as in
their reference code (shenjiyuan123/AST-Alignment-with-Smooth-Expert, ``buffer.py`` with
``--gp True`` and ``utils.epoch_gp``), so that the parameters move in small, even steps:
  clipping loss     the cross-entropy of epoch e is scaled by c_e, c = (0.5, 0.6, 0.7, 0.8,
                    0.9), 1 afterwards: the early epochs, which move the weights most, are damped;
  gradient penalty  λ · mean (‖∇_x Σ_k f_k(x)‖₂ − 1)², λ = 0.1, on the training batch, in
                    every epoch. As in the reference the 2-norm is taken over dim 1 of the input
                    gradient: per pixel across channels for (B, C, H, W) images, per example for
                    (B, L) vectors; the mean runs over the rest.
Reconstructed / checked here: the paper text with the two formulas could not be read; the
schedule, λ and the norm come from the code. The per-example WGAN-GP norm (Gulrajani et al.
2017) would be the textbook form, but on our small MNIST CNN its input-gradient norms are 4–8,
so λ = 0.1 makes the penalty outweigh the cross-entropy and the experts got jumpier (measured);
the reference's per-pixel form leaves training close to the clipping loss alone. The same holds
for (B, L) vectors, where the reference form *is* per example: there use ``gradient_penalty: 0``
(measured on sklearn digits with an MLP: first-epoch jump 0.89 with λ = 0.1 vs 0.47 plain).
The reference's other expert changes (SGD momentum 0.9, L2 1e-3, lr × 0.6 at mid-training, DC
augmentation) are settings here (``momentum``, ``weight_decay``) or left out.

Default lr: MTT's 0.01 (plain SGD). On a 3,500-image split an epoch is only 14 steps, so these
experts reach ~87% test accuracy by epoch 7 and cap what IPC 10 can reach (measured 87.5%);
lr-0.05 experts lifted IPC 10 to 89.6% but made IPC 1 diverge at ``lr_img`` 10 (67.9% with
α_0 = 0.01), so they are a setting, not the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from slimforge.data import batches
from slimforge.training import progress_bar

AST_CLIP_SCHEDULE = (0.5, 0.6, 0.7, 0.8, 0.9)  # AST buffer.py ``loss_decay``, one factor per epoch
AST_GRADIENT_PENALTY = 0.1  # AST utils.epoch_gp ``LAMBDA``


class ExpertConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=5, ge=1, description="E: expert networks trained on the real data")
    train_epochs: int = Field(default=10, ge=1, description="epochs per expert; parameters saved after each "
                              "(only epochs ≤ max_start_epoch + expert_epochs are ever matched)")
    lr: float = Field(default=0.01, gt=0, description="SGD step size of the experts")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum (MTT 0; AST 0.9)")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 weight decay (MTT 0; AST 1e-3)")
    batch_size: int = Field(default=256, ge=1, description="real examples per expert step")
    regularization: bool = Field(default=False,
                                 description="AST smoothing: clipping loss + gradient penalty while training")
    clip_schedule: list[float] = Field(default=list(AST_CLIP_SCHEDULE),
                                       description="loss factor c_e of epoch e (each in (0, 1]); 1 after the list")
    gradient_penalty: float = Field(default=AST_GRADIENT_PENALTY, ge=0,
                                    description="λ of the input-gradient penalty; 0 = clipping loss only")

    @field_validator("clip_schedule")
    @classmethod
    def _factors_in_range(cls, schedule: list[float]) -> list[float]:
        bad = [c for c in schedule if not 0 < c <= 1]
        if bad:
            raise ValueError(f"factors {bad} are not in (0, 1]")
        return schedule


def flat_parameters(model: nn.Module) -> Tensor:
    """All parameters in ``model.parameters()`` order, detached and concatenated, (P,)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def clip_factor(cfg: ExpertConfig, epoch: int) -> float:
    """c_e: the loss factor of ``epoch`` (0-based); 1 without regularization or past the schedule."""
    if not cfg.regularization or epoch >= len(cfg.clip_schedule):
        return 1.0
    return cfg.clip_schedule[epoch]


def input_gradient_penalty(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits (B, K), mean (‖∇_x Σ_k f_k(x)‖₂ − 1)² with the norm over dim 1) from one forward
    pass, differentiable in the parameters (the input gradient keeps its graph)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # (B, *input_shape)
    return logits, ((grad.norm(dim=1) - 1) ** 2).mean()  # norms (B,) or (B, H, W)


def expert_loss(model: nn.Module, x: Tensor, y: Tensor, cfg: ExpertConfig, epoch: int) -> Tensor:
    """c_e · CE, plus λ · gradient penalty when regularized; plain CE otherwise."""
    if cfg.regularization and cfg.gradient_penalty > 0:
        logits, penalty = input_gradient_penalty(model, x)
        return clip_factor(cfg, epoch) * F.cross_entropy(logits, y) + cfg.gradient_penalty * penalty
    return clip_factor(cfg, epoch) * F.cross_entropy(model(x), y)


def train_expert(model: nn.Module, x: Tensor, y: Tensor, cfg: ExpertConfig, g: torch.Generator,
                 on_epoch: Callable[[int, float], None] | None = None) -> Tensor:
    """Train ``model`` in place; returns its trajectory, (train_epochs + 1, P).

    Batches are drawn from ``g`` (one permutation per epoch), so a trajectory is a function of
    the initial weights, the data and the generator state only.
    """
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    snapshots = [flat_parameters(model)]
    model.train()
    for epoch in range(cfg.train_epochs):
        total = 0.0
        for idx in batches(len(x), cfg.batch_size, g):
            loss = expert_loss(model, x[idx], y[idx], cfg, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        snapshots.append(flat_parameters(model))
        if on_epoch is not None:
            on_epoch(epoch, total / len(x))
    model.eval()
    return torch.stack(snapshots)


def train_experts(make_model: Callable[[torch.Generator], nn.Module], x: Tensor, y: Tensor, cfg: ExpertConfig,
                  g: torch.Generator, label: str = "experts") -> Tensor:
    """E trajectories, (E, train_epochs + 1, P); every draw (init, batch order) from ``g``."""
    trajectories = []
    with progress_bar(label, cfg.count * cfg.train_epochs) as (bar, task):
        for k in range(cfg.count):
            def report(epoch: int, loss: float, k: int = k) -> None:
                bar.update(task, advance=1, description=f"{label} {k + 1}/{cfg.count} epoch {epoch + 1} loss {loss:.3f}")

            trajectories.append(train_expert(make_model(g), x, y, cfg, g, report))
    return torch.stack(trajectories)


def epoch_jumps(trajectory: Tensor) -> Tensor:
    """‖θ*_{e+1} − θ*_e‖₂ per epoch of one trajectory (T+1, P) -> (T,)."""
    return (trajectory[1:] - trajectory[:-1]).norm(dim=1)
