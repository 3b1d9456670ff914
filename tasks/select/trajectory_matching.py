"""Dataset distillation by matching training trajectories (MTT), with the AST options.

Cazenavette et al., "Dataset Distillation by Matching Training Trajectories" (CVPR 2022),
Algorithm 1 and reference ``distill.py`` / ``reparam_module.py``
(GeorgeCazenavette/mtt-distillation). Experts are trained on the real data first
(``tasks.select.experts``). Each iteration picks an expert trajectory and a start epoch
t ≤ T⁺ (``max_start_epoch``), sets θ̂_0 = θ*_t and takes N (``syn_steps``) SGD steps
θ̂_{n+1} = θ̂_n − α ∇ℓ(S_n; θ̂_n) on minibatches S_n of the synthetic set, keeping the graph
(a flat parameter vector fed through ``torch.func.functional_call``, as ReparamModule does).
The loss ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² is minimised over the pixels of S (SGD,
momentum 0.5, ``lr_img``) and over α (SGD, momentum 0.5, ``lr_lr``). As in the reference, α
is optimised directly (not its log), starts at the expert lr, and t is uniform; the paper's
"t ≤ T⁺" is taken inclusively (the reference draws t < T⁺).

Options of Shen, Yang & Lam, "Efficient Dataset Distillation through Alignment with Smooth and
High-Quality Expert Trajectories" (AST, arXiv 2310.10541), forms and weights read from their
reference code (shenjiyuan123/AST-Alignment-with-Smooth-Expert, ``distill.py``), not from the
paper text, which we could not read:
  experts.regularization  clipping loss + gradient penalty on the experts (see experts.py);
  init: representative    real images nearest per-class k-means centroids (synthetic_init.py);
  balanced_inner_loss     the inner cross-entropy is scaled by log₅(t − ⌊T⁺/2⌋ + 8) when
                          t ≥ ⌊T⁺/2⌋, else divided by log₅(⌊T⁺/2⌋ − t + 8) (``--balance_loss``);
  intermediate_matching   also match θ̂ at step ⌊N/M⌋·i to θ*_{t+i}, i = 1..M−1, each term
                          normalised by ‖θ̂_0 − θ*_{t+i}‖² and added with weight 1
                          (``--agg_middle_loss``);
  weight_perturbation     α_p > 0 starts from θ ← θ + α_p · (d/‖d‖_F) ⊙ θ, d ~ N(0, I) drawn per
                          parameter tensor (``weightPerturb``, α_p = 1 in their runs); the
                          perturbed start is also the loss's denominator, as in their code.
AST also runs the unrolled student with heavy-ball momentum 0.9 to match momentum-trained
experts; that is ``inner_momentum`` here (0 by default, as in MTT).

Defaults for MNIST-5k (pixels in [0, 1], no ZCA, 3,500 train images), set by measurement:
N = 20, M = 2, T⁺ = 5 as given; ``lr_img`` 10, not 100: an expert epoch is only 14 SGD steps,
so ‖θ*_t − θ*_{t+M}‖² is small, the normalised loss is steep (per-pixel gradients up to ~0.1
on late segments) and 100 or 30 diverged to NaN at IPC 1 and 10. ``lr_lr`` 1e-7, not 1e-5: the
α-gradient is 1–10³ here and 1e-5 drove α negative (NaN) in one IPC-10 run. No augmentation
(MTT uses DSA during distillation; not wired in here).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from tasks.select.experts import ExpertConfig, train_experts
from tasks.select.progress import distill_progress
from tasks.select.selection import SelectContext, Synthetic
from tasks.select.synthetic_init import SyntheticInit, initial_synthetic


class TrajectoryMatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["trajectory_matching"] = "trajectory_matching"
    ipc: int = Field(default=10, ge=1, description="synthetic images per class")
    iterations: int = Field(default=300, ge=1, description="outer steps on S, one expert segment each")
    syn_steps: int = Field(default=20, ge=1, description="N: unrolled student steps on S per iteration")
    expert_epochs: int = Field(default=2, ge=1, description="M: expert epochs the N student steps must cover")
    max_start_epoch: int = Field(default=5, ge=0, description="T+: latest expert epoch a segment starts at")
    lr_img: float = Field(default=10.0, gt=0, description="SGD step size on the synthetic pixels (in [0, 1])")
    lr_lr: float = Field(default=1e-7, gt=0, description="SGD step size on the learnable student lr α")
    lr_init: float | None = Field(default=None, gt=0, description="α_0, the student lr at the start; None = experts.lr")
    momentum: float = Field(default=0.5, ge=0, lt=1, description="SGD momentum on the pixels and on α")
    syn_batch: int | None = Field(default=None, ge=1, description="synthetic minibatch per student step; None = all")
    inner_momentum: float = Field(default=0.0, ge=0, lt=1,
                                  description="heavy-ball momentum of the student steps (AST 0.9)")
    init: SyntheticInit = Field(default="real", description="random real images, or k-means representatives (AST)")
    balanced_inner_loss: bool = Field(default=False, description="AST: scale the inner CE by the start epoch")
    intermediate_matching: bool = Field(default=False,
                                        description="AST: also match the student to θ*_{t+i} midway, i < M")
    weight_perturbation: float = Field(default=0.0, ge=0,
                                       description="AST α_p of the start-point perturbation; 0 = off, AST 1")
    experts: ExpertConfig = Field(default_factory=ExpertConfig, description="how the expert trajectories are trained")
    seed: int = 0

    @model_validator(mode="after")
    def _segment_fits(self) -> TrajectoryMatchingConfig:
        if self.max_start_epoch + self.expert_epochs > self.experts.train_epochs:
            raise ValueError(f"select.max_start_epoch {self.max_start_epoch} + expert_epochs {self.expert_epochs} "
                             f"exceeds experts.train_epochs {self.experts.train_epochs}")
        if self.intermediate_matching and self.syn_steps < self.expert_epochs:
            raise ValueError(f"select.intermediate_matching needs syn_steps ({self.syn_steps}) ≥ "
                             f"expert_epochs ({self.expert_epochs})")
        return self


class FlatModel:
    """Runs ``model`` with its parameters taken from one flat vector (P,), as MTT's ReparamModule."""

    def __init__(self, model: nn.Module):
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}
        return functional_call(self.model, params, (x,))


def balance_factor(start_epoch: int, max_start_epoch: int) -> float:
    """AST's inner-CE factor: > 1 for late starts, < 1 for early ones (reference ``--balance_loss``)."""
    half = max_start_epoch // 2
    if start_epoch >= half:
        return math.log(start_epoch - half + 8, 5)
    return 1 / math.log(half - start_epoch + 8, 5)


def perturb(flat: Tensor, sizes: list[int], alpha: float, g: torch.Generator) -> Tensor:
    """θ + α (d/‖d‖_F) ⊙ θ per parameter tensor, d ~ N(0, I); (P,) -> (P,)."""
    pieces = []
    for p in flat.split(sizes):
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)
        pieces.append(p + alpha * d / d.norm() * p)
    return torch.cat(pieces)


def normalized_distance(theta: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """‖θ − θ*‖² / ‖θ_start − θ*‖²: 1 at the start, 0 on the target."""
    return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()


def unroll_and_match(net: FlatModel, start: Tensor, targets: dict[int, Tensor], syn: Tensor, labels: Tensor,
                     lr: Tensor, g: torch.Generator, batch: int | None = None, momentum: float = 0.0,
                     ce_scale: float = 1.0) -> Tensor:
    """Σ over {step n: θ*} in ``targets`` of ‖θ̂_n − θ*‖² / ‖θ̂_0 − θ*‖², after N = max(targets)
    student steps from θ̂_0 = ``start`` (P,) on minibatches of ``syn`` (graph kept, so the result
    is differentiable in ``syn`` and ``lr``). Minibatches: a permutation from ``g`` cut into
    chunks of ``batch``, redrawn when used up."""
    steps, batch = max(targets), batch or len(syn)
    start = start.detach()
    theta, velocity = start.clone().requires_grad_(True), None
    chunks: list[Tensor] = []
    loss = syn.new_zeros(())
    for n in range(steps + 1):
        if n in targets:
            loss = loss + normalized_distance(theta, start, targets[n])
        if n == steps:
            break
        if not chunks:
            chunks = list(torch.randperm(len(syn), generator=g).split(batch))
        idx = chunks.pop(0)
        ce = F.cross_entropy(net(theta, syn[idx]), labels[idx]) * ce_scale
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)  # (P,), differentiable in syn
        velocity = grad if velocity is None else momentum * velocity + grad
        theta = theta - lr * velocity
    return loss


def segment_targets(trajectory: Tensor, start_epoch: int, cfg: TrajectoryMatchingConfig) -> dict[int, Tensor]:
    """{student step: expert parameters}: θ*_{t+M} at step N, plus the intermediate epochs."""
    targets = {cfg.syn_steps: trajectory[start_epoch + cfg.expert_epochs]}
    if cfg.intermediate_matching:
        for i in range(1, cfg.expert_epochs):
            targets[(cfg.syn_steps // cfg.expert_epochs) * i] = trajectory[start_epoch + i]
    return targets


def iteration_loss(net: FlatModel, trajectories: Tensor, syn: Tensor, labels: Tensor, lr: Tensor,
                   cfg: TrajectoryMatchingConfig, g: torch.Generator) -> Tensor:
    """One MTT iteration: draw an expert and start epoch from ``g``, unroll, match."""
    expert = trajectories[int(torch.randint(len(trajectories), (1,), generator=g))]  # (T+1, P)
    t = int(torch.randint(cfg.max_start_epoch + 1, (1,), generator=g))
    start = expert[t]
    if cfg.weight_perturbation > 0:
        start = perturb(start, net.sizes, cfg.weight_perturbation, g)
    scale = balance_factor(t, cfg.max_start_epoch) if cfg.balanced_inner_loss else 1.0
    return unroll_and_match(net, start, segment_targets(expert, t, cfg), syn, labels, lr, g,
                            cfg.syn_batch, cfg.inner_momentum, scale)


def distill_trajectories(x: Tensor, y: Tensor, num_classes: int, net: FlatModel, trajectories: Tensor,
                         cfg: TrajectoryMatchingConfig, g: torch.Generator) -> tuple[Synthetic, float]:
    """Algorithm 1 given the expert ``trajectories`` (E, T+1, P); returns S and the learned α."""
    images, labels = initial_synthetic(x, y, num_classes, cfg.ipc, cfg.init, g)
    syn = images.to(trajectories.dtype).requires_grad_(True)
    lr = torch.tensor(cfg.lr_init or cfg.experts.lr, dtype=trajectories.dtype, requires_grad=True)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
    opt_lr = torch.optim.SGD([lr], lr=cfg.lr_lr, momentum=cfg.momentum)
    history: list[float] = []
    with distill_progress("trajectory matching", cfg.iterations) as update:
        for it in range(cfg.iterations):
            loss = iteration_loss(net, trajectories, syn, labels, lr, cfg, g)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"select: trajectory matching diverged at iteration {it + 1} (loss "
                                         f"{loss.item()}); lower select.lr_img ({cfg.lr_img}) or select.lr_lr "
                                         f"({cfg.lr_lr}), or select.max_start_epoch")
            opt_img.zero_grad(set_to_none=True)
            opt_lr.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            opt_lr.step()
            history.append(loss.item())
            update(history[-1])
    return Synthetic(syn.detach().clone(), labels, history), lr.item()


def select_trajectory_matching(ctx: SelectContext, cfg: TrajectoryMatchingConfig) -> Synthetic:
    """Train the experts on the train split with ``train.model``, then distil S for that network."""
    trajectories = train_experts(ctx.make_model, ctx.x, ctx.y, cfg.experts, ctx.generator)
    net = FlatModel(ctx.make_model(ctx.generator))  # architecture only; its weights are never used
    synthetic, _ = distill_trajectories(ctx.x, ctx.y, ctx.num_classes, net, trajectories, cfg, ctx.generator)
    return synthetic
