"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled inputs.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024).
The merged backbone is θ = θ₀ + Σ_k λ_k τ_k (task-wise: one λ per task) or, per backbone
tensor l, θ^l = θ₀^l + Σ_k λ_k^l τ_k^l (layer-wise). The coefficients minimise

    Σ_k mean_{x ∈ batch_k} H(softmax(head_k(f_θ(x)))),   H(p) = −Σ_c p_c log p_c,

over unlabeled inputs of every task, with Adam on λ only: base, task vectors and heads stay
fixed, and the merged backbone is run through ``torch.func.functional_call``. The labeled
variant (Self Positioning: "Improving General Text Embedding Model: Tackling Task Conflict and
Data Imbalance through Model Merging") replaces the entropy by the cross-entropy on a small
labeled dev set (``objective: cross_entropy``).

Checked against the reference (github.com/EnnengYang/AdaMerging,
``src/main_{task,layer}_wise_adamerging.py``):
- λ starts at 0.3 (``prior``) and is clamped to [0, 1] where it is used
  (``torch.clamp(lambdas_raw, 0, 1)``); Adam (lr 1e-3, betas (0.9, 0.999), no weight decay)
  updates the raw, unclamped λ. Here too; ``coefficients`` are the clamped values.
- Layer-wise means one λ per task per parameter tensor of the encoder (weights and biases
  separately); θ₀'s own coefficient is fixed at 1.
- The loss per step is the sum over tasks of the batch-mean entropy; 500 steps.

Reconstructed or changed:
- The reference draws, per task and step, two shuffled batches of 16 test images (its loop
  breaks after the second) and sums their mean entropies. We draw one batch of ``batch_size``
  inputs per task and step, without replacement, from the task's ``inputs`` with the given
  generator; ``batch_size: 32`` matches the reference's sample count.
- Non-float backbone entries (integer buffers) are taken from θ₀ and get no λ.
- The Self Positioning cross-entropy variant is written from the summary in METHODS.md, not
  from its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.func import functional_call

from slimforge.models import Classifier
from slimforge.training import progress_bar

State = dict[str, Tensor]


class AdaMergingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["adamerging"] = "adamerging"
    granularity: Literal["task", "layer"] = Field(
        default="layer", description="task: one λ per task; layer: one λ per task per backbone tensor")
    lambda_init: float = Field(default=0.3, ge=0, le=1,
                               description="starting λ for every coefficient; λ is clamped to [0, 1]")
    lr: float = Field(default=1e-3, ge=0, description="Adam learning rate on λ")
    steps: int = Field(default=500, ge=0, description="Adam steps; 0 returns task arithmetic at lambda_init")
    batch_size: int = Field(default=16, ge=1, description="inputs drawn per task per step")
    objective: Literal["entropy", "cross_entropy"] = Field(
        default="entropy", description="entropy on unlabeled inputs (AdaMerging) or cross-entropy on "
                                       "labeled dev inputs (Self Positioning)")
    seed: int = Field(default=0, description="seeds the batch draws")


@dataclass
class AdaMerged:
    backbone: State  # merged backbone state dict, detached
    coefficients: Tensor  # (K,) task-wise or (K, L) layer-wise, clamped to [0, 1]
    entropy_history: list[float]  # objective per step on that step's batches, before the update


def float_names(base: State) -> list[str]:
    """Backbone tensors that get coefficients, in ``base`` order: the L columns of layer-wise λ."""
    return [name for name, w in base.items() if w.is_floating_point()]


def merged_backbone(base: State, taus: list[State], coefficients: Tensor) -> State:
    """θ₀ + Σ_k λ_k τ_k per float tensor; differentiable in ``coefficients``.

    ``coefficients`` is (K,) (one λ per task) or (K, L) (one per task and float tensor, columns
    in ``float_names(base)`` order). Non-float entries are θ₀'s.
    """
    names = float_names(base)
    if coefficients.dim() not in (1, 2) or coefficients.shape[0] != len(taus) or (
            coefficients.dim() == 2 and coefficients.shape[1] != len(names)):
        raise ValueError(f"adamerging: coefficients of shape {tuple(coefficients.shape)} fit neither "
                         f"({len(taus)},) nor ({len(taus)}, {len(names)}) = (tasks, float backbone tensors)")
    column = {name: l for l, name in enumerate(names)}
    out = {}
    for name, w0 in base.items():
        if name not in column:
            out[name] = w0
            continue
        lam = coefficients if coefficients.dim() == 1 else coefficients[:, column[name]]  # (K,)
        out[name] = w0 + sum(lam[k] * tau[name] for k, tau in enumerate(taus))
    return out


def softmax_entropy(logits: Tensor) -> Tensor:
    """(B, C) logits -> (B,) entropy of their softmax, in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def merging_loss(model: Classifier, backbone: State, heads: list[State], batches: list[Tensor],
                 labels: list[Tensor] | None = None) -> Tensor:
    """Σ_k mean loss of task k's batch through ``backbone`` + head k: entropy without
    ``labels``, cross-entropy with them. ``batches[k]`` is (B_k, *input_shape)."""
    total = 0
    for k, (head, x) in enumerate(zip(heads, batches, strict=True)):
        params = {f"backbone.{n}": w for n, w in backbone.items()} | {f"head.{n}": w for n, w in head.items()}
        logits = functional_call(model, params, (x,), strict=True)  # (B_k, C)
        loss = softmax_entropy(logits).mean() if labels is None else F.cross_entropy(logits, labels[k])
        total = total + loss
    return total


def adamerging(model: Classifier, base: State, taus: list[State], heads: list[State], inputs: list[Tensor],
               cfg: AdaMergingConfig, generator: torch.Generator, labels: list[Tensor] | None = None) -> AdaMerged:
    """Learn the merging coefficients of ``taus`` on ``inputs[k]`` (task k's inputs, (N_k, ...)).

    ``model`` supplies only the architecture (its own weights are never read or changed);
    ``heads[k]`` is task k's head state dict; ``labels[k]`` (N_k,) is needed with
    ``objective: cross_entropy``. ``generator`` draws the batches.
    """
    check_tasks(base, taus, heads, inputs, labels, cfg.objective)
    base = {n: w.detach() for n, w in base.items()}
    taus = [{n: t.detach() for n, t in tau.items()} for tau in taus]
    heads = [{n: w.detach() for n, w in head.items()} for head in heads]
    labels = labels if cfg.objective == "cross_entropy" else None
    shape = (len(taus),) if cfg.granularity == "task" else (len(taus), len(float_names(base)))
    ref = next(iter(base.values()))
    dtype = next((base[n].dtype for n in float_names(base)), torch.float32)
    raw = torch.full(shape, cfg.lambda_init, dtype=dtype, device=ref.device, requires_grad=True)  # (K,) | (K, L)
    opt = torch.optim.Adam([raw], lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    history = []
    with progress_bar("adamerging", cfg.steps) as (bar, task):
        for _ in range(cfg.steps):
            idx = [torch.randperm(len(x), generator=generator)[: cfg.batch_size] for x in inputs]
            batches = [x[i].to(ref.device) for x, i in zip(inputs, idx, strict=True)]
            batch_labels = None if labels is None else [y[i].to(ref.device) for y, i in zip(labels, idx, strict=True)]
            loss = merging_loss(model, merged_backbone(base, taus, raw.clamp(0.0, 1.0)), heads, batches, batch_labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
            bar.update(task, advance=1, description=f"adamerging loss {history[-1]:.4f}")
    with torch.no_grad():
        coefficients = raw.detach().clamp(0.0, 1.0)
        backbone = {n: w.detach().clone() for n, w in merged_backbone(base, taus, coefficients).items()}
    return AdaMerged(backbone, coefficients, history)


def check_tasks(base: State, taus: list[State], heads: list[State], inputs: list[Tensor],
                labels: list[Tensor] | None, objective: str) -> None:
    """One task vector, head and input tensor per task, task vectors shaped like ``base``."""
    n = len(taus)
    if n == 0:
        raise ValueError("adamerging: no task vectors to merge")
    counts = [("heads", heads), ("input tensors", inputs)] + ([("label tensors", labels)] if labels is not None else [])
    for what, items in counts:
        if len(items) != n:
            raise ValueError(f"adamerging: {n} task vectors but {len(items)} {what}; one per task, in task order")
    if objective == "cross_entropy" and labels is None:
        raise ValueError("adamerging: objective 'cross_entropy' needs labels, one (N_k,) tensor per task")
    for k, x in enumerate(inputs):
        if len(x) == 0 or x.shape[1:] != inputs[0].shape[1:]:
            raise ValueError(f"adamerging: task {k}'s inputs have shape {tuple(x.shape)}; each task needs a "
                             f"non-empty batch shaped like task 0's (N, {', '.join(map(str, inputs[0].shape[1:]))})")
        if labels is not None and len(labels[k]) != len(x):
            raise ValueError(f"adamerging: task {k} has {len(x)} inputs but {len(labels[k])} labels")
    for k, tau in enumerate(taus):
        for name in float_names(base):
            if name not in tau or tau[name].shape != base[name].shape:
                got = "no such tensor" if name not in tau else f"shape {tuple(tau[name].shape)}"
                raise ValueError(f"adamerging: task vector {k} has {got} for backbone tensor {name!r}, "
                                 f"base has shape {tuple(base[name].shape)}")
