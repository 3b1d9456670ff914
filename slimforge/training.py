"""The one training loop every stage uses (train, finetune, prune recovery, scoring).

Optimizers: SGD with momentum, AdamW (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", ICLR 2019), Lion (Chen et al., "Symbolic Discovery of Optimization
Algorithms", NeurIPS 2023; ``slimforge.optim``). Schedule: optional linear warm-up, then
linear decay to zero (the default, "Straight to Zero: Why Linearly Decaying the Learning
Rate to Zero Works Best", Bergsma et al. 2025), cosine or constant. Data order comes from an
explicit generator: one permutation per epoch, over all of ``x`` or, with an ``EpochPlan``
(RS2, importance sampling), over that epoch's row of the plan. With ``checkpoint`` the loop writes exact-resume
checkpoints (``slimforge.resume``) and continues from the newest one it finds. With a ``Shard``
the loop is one rank of a data-parallel run (torch DistributedDataParallel,
``tasks.train.distributed``): every rank walks the same global batches and trains on its part.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from slimforge.data import batches
from slimforge.optim import Lion, lr_factor
from slimforge.resume import Checkpointing, Position, load_latest, restore, save_checkpoint

__all__ = ["Checkpointing", "EpochPlan", "FitConfig", "Shard", "accuracy", "fit", "lr_factor", "make_optimizer"]

# Fields that say how a run is saved, not what it computes (left out of resume fingerprints).
CHECKPOINT_FIELDS = frozenset({"checkpoint_every", "keep_checkpoints"})


class FitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["sgd", "adamw", "lion"] = Field(
        default="adamw", description="lion: use an lr 3-10x below and a weight decay 3-10x above AdamW's")
    lr: float = Field(default=2e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(default=1e-4, ge=0, description="decoupled for adamw and lion, L2 for sgd")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only")
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=128, ge=1)
    schedule: Literal["linear_decay", "cosine", "constant"] = "linear_decay"
    warmup_steps: int = Field(default=0, ge=0, description="optimizer steps of linear warm-up from 0 to the peak lr")
    checkpoint_every: int = Field(default=0, ge=0,
                                  description="optimizer steps between exact-resume checkpoints; 0 = off")
    keep_checkpoints: int = Field(default=2, ge=0, description="newest checkpoints kept; 0 keeps all")


@dataclass(frozen=True)
class EpochPlan:
    """The examples each epoch trains on: row ``e % E`` of ``indices`` in epoch ``e``."""

    indices: Tensor  # (E, k) positions into the x given to fit
    weights: Tensor | None = None  # (E, k) per-example loss weights, e.g. 1/(N·p) for importance sampling

    def fingerprint(self) -> str:
        blob = self.indices.numpy().tobytes() + (b"" if self.weights is None else self.weights.numpy().tobytes())
        return hashlib.sha256(blob).hexdigest()[:16]


Augment = Callable[[Tensor, torch.Generator], Tensor]  # (B, ...) batch, generator -> augmented batch


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel run of ``fit`` (one rank of torch DDP).

    Every rank draws the same permutation from its own copy of the generator, so all see
    the same global batches; each trains on its contiguous ``rows`` of every batch. ``forward``
    is the DistributedDataParallel wrapper of the model given to ``fit`` (its backward
    averages gradients over ranks); ``sum_across`` sums a scalar over all ranks; ``device`` is
    where the model lives (the data stay on the CPU, as in a single-process run).
    """

    forward: nn.Module
    rank: int
    world: int
    sum_across: Callable[[Tensor], Tensor]
    device: torch.device

    def rows(self, n: int) -> slice:
        """This rank's rows of a batch of ``n``: equal contiguous parts, the first ``n % world``
        one longer (as torch.tensor_split), so a short last batch is still covered whole."""
        q, r = divmod(n, self.world)
        lo = self.rank * q + min(self.rank, r)
        return slice(lo, lo + q + (self.rank < r))


def make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lion":
        return Lion(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class MaskHold:
    """Pruned weights held at exactly 0 through training.

    ``fit`` binds its optimizer and calls ``apply`` after every step: each masked weight and
    every optimizer state tensor of its shape (momentum_buffer, exp_avg, exp_avg_sq) are zeroed
    where the mask is False, so no momentum can revive a pruned weight. A method that changes
    the masks between steps (gradual pruning) assigns ``masks`` and calls ``apply`` itself.
    """

    def __init__(self, model: nn.Module, masks: dict[str, Tensor]):
        named = dict(model.named_parameters())
        self.params = {n: named[n] for n in masks}
        self.masks = masks
        self.optimizer: torch.optim.Optimizer | None = None

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            p = self.params[name]
            p.masked_fill_(~mask, 0.0)
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for v in state.values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    v.masked_fill_(~mask, 0.0)


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: FitConfig,
    generator: torch.Generator,
    *,
    params: list[nn.Parameter] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    hold: MaskHold | None = None,
    label: str = "train",
    checkpoint: Checkpointing | None = None,
    plan: EpochPlan | None = None,
    augment: Augment | None = None,
    shard: Shard | None = None,
) -> list[float]:
    """Train ``model`` on (x, y) in place; returns the mean loss of each epoch.

    ``params`` restricts what is optimised (e.g. a head only); ``after_step`` runs after
    every optimiser step; ``hold`` keeps pruned weights and their optimiser state at 0 from
    the start and after every step, before ``after_step``. With ``checkpoint``, a run found
    in its directory is continued where it stopped, to bit-identical weights on CPU. With
    ``plan`` each epoch sees only its row of the plan, so the schedule runs over the reduced
    step count; ``augment`` transforms each batch with draws from ``generator``. With ``shard``
    this is one rank of a DDP run: each step's gradient is the mean over the global batch,
    the history is the global loss, and only rank 0 writes checkpoints and shows progress.
    """
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    per_epoch = len(x) if plan is None else plan.indices.shape[1]
    steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    lr_factor(cfg.schedule, 0, total, cfg.warmup_steps)  # refuses a warm-up longer than the run
    pos = Position()
    fingerprint = {"examples": len(x), "total_steps": total,
                   "config": cfg.model_dump(mode="json", exclude=set(CHECKPOINT_FIELDS))}
    if plan is not None:
        fingerprint["plan"] = plan.fingerprint()
    if checkpoint is not None and (loaded := load_latest(checkpoint, opt)) is not None:
        pos = restore(loaded, model, opt, generator, fingerprint)
    if hold is not None:
        hold.optimizer = opt
        hold.apply()
    model.train()
    writer = shard is None or shard.rank == 0  # DDP ranks hold identical weights; one writes
    with progress_bar(label, total, show=writer) as (bar, task):
        bar.update(task, completed=pos.step)
        while pos.epoch < cfg.epochs:
            for idx in _epoch_batches(per_epoch, cfg.batch_size, generator, pos):
                _set_lr(opt, cfg.lr * lr_factor(cfg.schedule, pos.step, total, cfg.warmup_steps))
                loss = _batch_loss(model, x, y, idx, pos.epoch, plan, augment, generator, shard)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if hold is not None:
                    hold.apply()
                if after_step is not None:
                    after_step(model)
                _advance(pos, _summed_loss(loss, len(idx), shard), steps_per_epoch, per_epoch, generator)
                bar.update(task, advance=1)
                if pos.batch == 0:
                    bar.update(task, description=f"{label} epoch {pos.epoch}/{cfg.epochs} loss {pos.history[-1]:.3f}")
                if checkpoint is not None and writer and checkpoint.due(pos.step, total):
                    _save(checkpoint, pos, model, opt, generator, cfg, total, fingerprint)
    model.eval()
    return list(pos.history)


def _batch_loss(model: nn.Module, x: Tensor, y: Tensor, idx: Tensor, epoch: int, plan: EpochPlan | None,
                augment: Augment | None, generator: torch.Generator, shard: Shard | None = None) -> Tensor:
    """Mean (or, with plan weights, importance-weighted mean) cross-entropy of one batch."""
    weights = None
    if plan is not None:
        row = epoch % plan.indices.shape[0]
        idx, weights = plan.indices[row][idx], None if plan.weights is None else plan.weights[row][idx]
    if shard is not None:
        return _shard_loss(shard, x, y, idx, weights, augment, generator)
    xb = x[idx] if augment is None else augment(x[idx], generator)
    if weights is None:
        return F.cross_entropy(model(xb), y[idx])
    return (F.cross_entropy(model(xb), y[idx], reduction="none") * weights).mean()


def _shard_loss(shard: Shard, x: Tensor, y: Tensor, idx: Tensor, weights: Tensor | None,
                augment: Augment | None, generator: torch.Generator) -> Tensor:
    """This rank's share of the global batch's loss, scaled so that DDP's gradient average
    over ranks is the gradient of the global batch mean: world · Σ_rows loss / len(idx).
    Dividing by the global count (not this rank's) keeps a short last batch, split unevenly,
    exact."""
    rows = shard.rows(len(idx))
    # augment draws from the generator per example of the batch it is given: every rank
    # augments the whole global batch so its generator stays in step with a single-process run
    xb = x[idx[rows]] if augment is None else augment(x[idx], generator)[rows]
    losses = F.cross_entropy(shard.forward(xb.to(shard.device)), y[idx[rows]].to(shard.device), reduction="none")
    if weights is not None:
        losses = losses * weights[rows].to(shard.device)
    return losses.sum() * (shard.world / len(idx))


def _summed_loss(loss: Tensor, n: int, shard: Shard | None) -> float:
    """The batch's loss summed over its ``n`` examples (the history's numerator); on a shard,
    over every rank's part."""
    if shard is None:
        return loss.item() * n
    return shard.sum_across(loss.detach().clone()).item() * n / shard.world


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator, pos: Position) -> list[Tensor]:
    """The batches of ``pos.epoch`` not yet done; mid-epoch (after a resume) its permutation
    is drawn again from the generator state saved at the epoch's start."""
    if pos.batch == 0:
        pos.epoch_rng = generator.get_state()  # uint8 state; what a checkpoint stores
        return list(batches(n, batch_size, generator))
    now = generator.get_state()
    generator.set_state(pos.epoch_rng)
    chunks = list(batches(n, batch_size, generator))
    generator.set_state(now)
    return chunks[pos.batch:]


def _advance(pos: Position, batch_loss: float, steps_per_epoch: int, n: int, generator: torch.Generator) -> None:
    """Count one optimizer step; at the end of an epoch record its mean loss."""
    pos.step += 1
    pos.batch += 1
    pos.running += batch_loss
    if pos.batch == steps_per_epoch:
        pos.history.append(pos.running / n)
        pos.epoch, pos.batch, pos.running = pos.epoch + 1, 0, 0.0
        pos.epoch_rng = generator.get_state()


def _save(ckpt: Checkpointing, pos: Position, model: nn.Module, opt: torch.optim.Optimizer,
          generator: torch.Generator, cfg: FitConfig, total: int, fingerprint: dict) -> None:
    """Checkpoint after ``pos.step`` steps; ``lr`` is what the next step would use (0 at the
    end of a linear decay)."""
    factor = lr_factor(cfg.schedule, pos.step, total, cfg.warmup_steps)
    schedule = {"name": cfg.schedule, "warmup_steps": cfg.warmup_steps, "total_steps": total, "factor": factor}
    save_checkpoint(ckpt, pos, model, opt, generator,
                    {"schedule": schedule, "lr": cfg.lr * factor, "fingerprint": fingerprint})


_LIVE = threading.Lock()  # rich allows one live display at a time; fan-out threads share it


class _NoBar:
    def update(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def progress_bar(label: str, total: int, show: bool = True):
    """A rich progress bar, or a silent stand-in when another thread already shows one (or
    ``show`` is False)."""
    if not show or not _LIVE.acquire(blocking=False):
        yield _NoBar(), None
        return
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn()) as bar:
            yield bar, bar.add_task(label, total=total)
    finally:
        _LIVE.release()


@torch.inference_mode()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = sum((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)
