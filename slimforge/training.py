"""The one training loop every stage uses (train, finetune, prune recovery, scoring).

Optimizers: SGD with momentum, AdamW. Schedule: linear decay to zero (the default,
"Straight to Zero: Why Linearly Decaying the Learning Rate to Zero Works Best",
Bergsma et al. 2025), cosine or constant. Data order comes from an explicit generator.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from slimforge.data import batches


class FitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=2e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only")
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=128, ge=1)
    schedule: Literal["linear_decay", "cosine", "constant"] = "linear_decay"


def make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the peak lr at ``step`` of ``total``."""
    if schedule == "linear_decay":
        return 1.0 - step / total
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    return 1.0


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: FitConfig,
    generator: torch.Generator,
    *,
    params: list[nn.Parameter] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    label: str = "train",
) -> list[float]:
    """Train ``model`` on (x, y) in place; returns the mean loss of each epoch.

    ``params`` restricts what is optimised (e.g. a head only); ``after_step`` runs after
    every optimiser step (e.g. re-applying a pruning mask).
    """
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, s, total))
    history = []
    model.train()
    with _progress(label, total) as (bar, task):
        for epoch in range(cfg.epochs):
            running = 0.0
            for idx in batches(len(x), cfg.batch_size, generator):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step(model)
                running += loss.item() * len(idx)
                bar.update(task, advance=1)
            history.append(running / len(x))
            bar.update(task, description=f"{label} epoch {epoch + 1}/{cfg.epochs} loss {history[-1]:.3f}")
    model.eval()
    return history


_LIVE = threading.Lock()  # rich allows one live display at a time; fan-out threads share it


class _NoBar:
    def update(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def _progress(label: str, total: int):
    """A rich progress bar, or a silent stand-in when another thread already shows one."""
    if not _LIVE.acquire(blocking=False):
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
