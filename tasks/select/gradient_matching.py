"""Dataset condensation by gradient matching (DC), with differentiable siamese augmentation.

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching" (ICLR 2021), Algorithm 1:
for K iterations draw a fresh network θ_0; then ``outer_loop`` times, per class c, take a
step on the synthetic images S_c minimising the gradient distance (eq. 9)

    D(∇θ ℓ(S_c; θ_t), ∇θ ℓ(B_c; θ_t)),   B_c a minibatch of real images of class c,

and train θ for ``inner_loop`` steps on S. D (eq. 10) sums over layers and output rows
(a gradient reshaped to (out, -1)) of 1 - cos; 1-D gradients (biases, norms) are left out,
as the reference ``distance_wb`` does. With DSA (Zhao & Bilen, ICML 2021, eq. 4) each
class's real and synthetic batches go through the same sampled augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from tasks.select.dsa import DIGIT_STRATEGY, DsaOp, batch_augment, derive_generator, siamese_augment
from tasks.select.progress import distill_progress
from tasks.select.selection import SelectContext, Synthetic
from tasks.select.synthetic_init import SyntheticInit, initial_synthetic

# (outer_loop, inner_loop) per images-per-class, from the reference code's get_loops.
PAPER_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


class GradientMatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["gradient_matching"] = "gradient_matching"
    ipc: int = Field(default=10, ge=1, description="synthetic images per class")
    iterations: int = Field(default=200, ge=1, description="K: fresh networks drawn, one per iteration")
    lr_img: float = Field(default=0.1, gt=0, description="SGD step size on the synthetic pixels")
    momentum: float = Field(default=0.5, ge=0, lt=1, description="SGD momentum on the synthetic pixels")
    lr_net: float = Field(default=0.01, gt=0, description="SGD step size of the inner network updates")
    real_batch: int = Field(default=128, ge=1, description="real examples per class in each matching step")
    outer_loop: int | None = Field(default=None, ge=1,
                                   description="matching steps per network; None = paper default for ipc")
    inner_loop: int | None = Field(default=None, ge=0,
                                   description="network steps on S between matching steps; None = paper default")
    dsa: bool = Field(default=True, description="differentiable siamese augmentation (4-D images only)")
    dsa_strategy: list[DsaOp] = Field(default=list(DIGIT_STRATEGY), min_length=1,
                                      description="ops DSA picks from; no flip for digits")
    init: SyntheticInit = Field(default="real", description="random real images, or k-means representatives")
    grad_clip: float | None = Field(default=10.0, gt=0,
                                    description="cap on each class's gradient norm on S_c; None = off")
    clamp: bool = Field(default=True, description="keep S within the real data's value range after each step")
    seed: int = 0

    @model_validator(mode="after")
    def _loops_known(self) -> GradientMatchingConfig:
        if (self.outer_loop is None or self.inner_loop is None) and self.ipc not in PAPER_LOOPS:
            raise ValueError(f"select.outer_loop/inner_loop: the paper gives defaults only for ipc in "
                             f"{sorted(PAPER_LOOPS)}; set both for ipc {self.ipc}")
        return self

    def loops(self) -> tuple[int, int]:
        outer, inner = PAPER_LOOPS.get(self.ipc, (None, None))
        return self.outer_loop or outer, inner if self.inner_loop is None else self.inner_loop


def layer_distance(a: Tensor, b: Tensor) -> Tensor:
    """Σ over output rows of 1 - cos between two gradients of one parameter; 0 for 1-D ones.

    A row that is zero in both (a unit dead for both batches) counts as matched, so identical
    gradients are at distance 0; the reference counts it 1, a constant with no gradient."""
    if a.dim() == 1:
        return a.new_zeros(())
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)  # (out, fan_in)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)  # (out,)
    cos = (a * b).sum(-1) / (na * nb + 1e-6)
    return ((1 - cos) * ((na > 0) | (nb > 0))).sum()


def gradient_distance(g_syn: list[Tensor], g_real: list[Tensor]) -> Tensor:
    """D of eq. 10: layer distances summed over the network's parameters."""
    return sum((layer_distance(s, r) for s, r in zip(g_syn, g_real, strict=True)), g_syn[0].new_zeros(()))


def loss_gradients(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = False) -> list[Tensor]:
    """∇θ of the mean cross-entropy on (x, y); kept differentiable in x with ``create_graph``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=create_graph))


def class_members(y: Tensor, num_classes: int) -> list[Tensor]:
    return [torch.nonzero(y == c).flatten() for c in range(num_classes)]


def real_batch(x: Tensor, members: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Up to ``size`` random real examples of one class, without replacement."""
    return x[members[torch.randperm(len(members), generator=g)[:size]]]


def class_batches(x: Tensor, members: list[Tensor], syn: Tensor, cfg, g_data: torch.Generator,
                  g_aug: torch.Generator) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Per class c: (c, a real batch B_c, S_c), both under one siamese augmentation when cfg.dsa
    (GM and DM configs share ipc, real_batch, dsa and dsa_strategy)."""
    for c, idx in enumerate(members):
        real = real_batch(x, idx, cfg.real_batch, g_data)
        s = syn[c * cfg.ipc : (c + 1) * cfg.ipc]  # S is grouped by class: (ipc, *input_shape)
        if cfg.dsa:
            real, s = siamese_augment(real, s, cfg.dsa_strategy, g_aug)
        yield c, real, s


def matching_loss(model: nn.Module, x: Tensor, members: list[Tensor], syn: Tensor, cfg: GradientMatchingConfig,
                  g_data: torch.Generator, g_aug: torch.Generator) -> Tensor:
    """Σ_c D(∇θ ℓ(A(S_c)), ∇θ ℓ(A(B_c))) at the model's current θ; differentiable in ``syn``."""
    loss = syn.new_zeros(())
    for c, real, s in class_batches(x, members, syn, cfg, g_data, g_aug):
        g_real = [t.detach() for t in loss_gradients(model, real, torch.full((len(real),), c))]
        g_syn = loss_gradients(model, s, torch.full((len(s),), c), create_graph=True)
        loss = loss + gradient_distance(g_syn, g_real)
    return loss


def train_on_synthetic(model: nn.Module, opt: torch.optim.Optimizer, syn: Tensor, labels: Tensor, steps: int,
                       cfg: GradientMatchingConfig, g_aug: torch.Generator) -> None:
    """``steps`` passes of θ over the (detached) synthetic set, batches of 256 as in the reference."""
    augment = batch_augment(cfg.dsa_strategy) if cfg.dsa else None
    syn = syn.detach()
    for _ in range(steps):
        for i in range(0, len(syn), 256):
            xb = syn[i : i + 256] if augment is None else augment(syn[i : i + 256], g_aug)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), labels[i : i + 256]).backward()
            opt.step()


@torch.no_grad()
def clip_per_class(grad: Tensor, num_classes: int, max_norm: float) -> None:
    """Scale each class's block of ∇S (grouped by class) down to norm ``max_norm`` at most.
    A row whose synthetic gradient sums few active positions (max-pool, ReLU) has a tiny
    ‖g_S‖ and a 1 - cos that turns sharply with it: rare steps 20x the usual norm, on a few
    pixels, that SGD would otherwise write into S as salt-and-pepper noise."""
    blocks = grad.view(num_classes, -1)  # (C, ipc * prod(input_shape))
    blocks.mul_((max_norm / (blocks.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0))


@torch.no_grad()
def keep_in_range(syn: Tensor, bounds: tuple[float, float]) -> None:
    """Project S back into the real data's range. The paper's ConvNet instance-normalises, so
    pixel scale is free there; a network without normalisation trained on S is not, and the
    1 - cos terms of nearly inactive rows (gradient ∝ 1/‖g_S‖) can push single pixels far out."""
    syn.clamp_(*bounds)


def select_gradient_matching(ctx: SelectContext, cfg: GradientMatchingConfig) -> Synthetic:
    """Algorithm 1; history is the matching loss per class, averaged over each iteration's outer loop."""
    outer, inner = cfg.loops()
    g_nets, g_aug = derive_generator(ctx.generator), derive_generator(ctx.generator)
    images, labels = initial_synthetic(ctx.x, ctx.y, ctx.num_classes, cfg.ipc, cfg.init, ctx.generator)
    syn = images.float().requires_grad_(True)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
    members = class_members(ctx.y, ctx.num_classes)
    bounds = (ctx.x.min().item(), ctx.x.max().item())
    history: list[float] = []
    with distill_progress("gradient matching", cfg.iterations) as update:
        for _ in range(cfg.iterations):
            model = ctx.make_model(g_nets)
            model.train()
            opt_net = torch.optim.SGD(model.parameters(), lr=cfg.lr_net)
            total = 0.0
            for step in range(outer):
                loss = matching_loss(model, ctx.x, members, syn, cfg, ctx.generator, g_aug)
                syn.grad = torch.autograd.grad(loss, syn)[0]  # only S moves here; θ's grads are not needed
                if cfg.grad_clip is not None:
                    clip_per_class(syn.grad, ctx.num_classes, cfg.grad_clip)
                opt_img.step()
                if cfg.clamp:
                    keep_in_range(syn, bounds)
                total += loss.item()
                if step < outer - 1:  # the last θ update would never be matched against
                    train_on_synthetic(model, opt_net, syn, labels, inner, cfg, g_aug)
            history.append(total / (outer * ctx.num_classes))
            update(history[-1])
    return Synthetic(syn.detach().clone(), labels, history)

