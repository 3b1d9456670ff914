"""Iterative magnitude pruning with weight rewinding (lottery tickets).

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
Networks" (ICLR 2019); rewinding to an early step k rather than to the init follows Frankle,
Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"
(ICML 2020). Starting from a trained network (round 0), each round prunes a fraction p of
the *remaining* prunable weights globally by magnitude, rewinds the survivors (and every
other parameter and buffer) to θ_k, and trains to completion with the mask held. After r
rounds the sparsity is 1 − (1 − p)^r; the last round prunes exactly to the target.

Reconstructed details (not fixed by the papers at this scale):
- Keep counts follow the formula, round((1 − p)^r · N) over the N prunable weights, rather
  than compounding rounded per-round counts, so round r's sparsity is exact to one weight.
- Each round re-runs the ``training`` schedule from its start (fresh optimizer, same data
  order from ``seed``); the papers resume the schedule at step k for T − k steps.
- θ_k is taken from the *same* trajectory as the base run: ``rewind_state_after`` replays
  the base run's ``fit`` with its config and generator and stops after exactly k steps.
- Optimizer state of pruned weights is held at 0 too (``slimforge.training.MaskHold``), not
  only the weights.

``prune_remaining`` and ``masked_trainer`` are shared with ``tasks.prune.gradual`` and ``soup``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from slimforge.training import FitConfig, MaskHold, fit
from tasks.prune.common import (
    PruneBase,
    PruneContext,
    Pruned,
    RecoveryParams,
    keep_largest,
    prunable,
    split_like,
)

# train_round(model, masks) trains ``model`` in place with ``masks`` held; may return losses.
TrainRound = Callable[[nn.Module, dict[str, Tensor]], list[float] | None]


class ImpConfig(PruneBase):
    method: Literal["imp"] = "imp"
    sparsity: float = Field(default=0.8, gt=0, lt=1, description="target share of prunable weights set to zero")
    rate: float = Field(default=0.2, gt=0, lt=1, description="share p of the remaining weights pruned per round")
    rounds: int | None = Field(default=None, ge=1,
                               description="pruning rounds R; None = smallest R with 1-(1-p)^R >= sparsity")
    rewind_steps: int = Field(default=0, ge=0,
                              description="optimizer steps k of the base run to rewind to; 0 = the init")
    training: FitConfig = Field(default_factory=FitConfig,
                                description="training of each round, to completion, and of the replay to step k")
    recovery_params: RecoveryParams = Field(
        default="none", description="the ticket is trained to completion already; 'none' skips the stage's recovery")
    seed: int = Field(default=0, description="seeds the data order of each round (the same every round)")

    @model_validator(mode="after")
    def _rounds_reach_target(self) -> ImpConfig:
        if self.rounds is not None and self.rounds > 1 and formula_sparsity(self.rate, self.rounds - 1) > self.sparsity:
            raise ValueError(f"prune.rounds: {self.rounds} rounds at rate {self.rate} pass sparsity {self.sparsity} "
                             f"before the last round; use at most {rounds_needed(self.sparsity, self.rate)} rounds")
        return self


@dataclass
class ImpResult:
    masks: dict[str, Tensor]  # name -> bool keep-mask of the final ticket
    history: list[dict] = field(default_factory=list)  # one row per round


def formula_sparsity(rate: float, r: int) -> float:
    """1 − (1 − p)^r: the sparsity after r rounds of pruning p of what remains."""
    return 1.0 - (1.0 - rate) ** r


def rounds_needed(sparsity: float, rate: float) -> int:
    """Smallest R with 1 − (1 − p)^R ≥ sparsity (a 1e-12 slack absorbs float error)."""
    return max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - rate) - 1e-12))


def round_sparsities(cfg: ImpConfig) -> list[float]:
    """Target sparsity after each round 1..R; the last one is exactly ``cfg.sparsity``."""
    rounds = cfg.rounds if cfg.rounds is not None else rounds_needed(cfg.sparsity, cfg.rate)
    return [formula_sparsity(cfg.rate, r) for r in range(1, rounds)] + [cfg.sparsity]


def prune_remaining(weights: dict[str, Tensor], masks: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Global magnitude masks keeping round((1 − s)·N) weights, chosen among the active ones.

    Pruned weights score −1, below every |w|, so the result is nested in ``masks`` even when a
    surviving weight is exactly 0; pruning never reactivates (a keep count above the active
    count keeps them all). Ties by index.
    """
    scores = torch.cat([torch.where(masks[n], w.detach().abs(), -1.0).flatten() for n, w in weights.items()])
    keep = min(round((1.0 - sparsity) * len(scores)), int((scores >= 0).sum()))
    return split_like(keep_largest(scores, keep), weights)


@torch.no_grad()
def rewind(model: nn.Module, state: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Load ``state`` bit-exactly (parameters and buffers), then zero the pruned weights."""
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].masked_fill_(~mask, 0.0)


def iterative_magnitude_pruning(model: nn.Module, rewind_state: dict[str, Tensor], train_round: TrainRound,
                                cfg: ImpConfig) -> ImpResult:
    """Run the IMP rounds on an already trained ``model`` (round 0); ``model`` ends as the
    trained ticket. ``rewind_state`` is θ_k, a full state dict of the same architecture."""
    weights = prunable(model)
    total = sum(w.numel() for w in weights.values())
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    history = []
    for r, target in enumerate(round_sparsities(cfg), start=1):
        masks = prune_remaining(prunable(model), masks, target)
        rewind(model, rewind_state, masks)
        losses = train_round(model, masks)
        kept = sum(int(m.sum()) for m in masks.values())
        history.append({"round": r, "target_sparsity": target, "kept": kept, "sparsity": 1 - kept / total,
                        "final_loss": losses[-1] if losses else None})
    return ImpResult(masks, history)


def masked_trainer(x: Tensor, y: Tensor, fit_cfg: FitConfig, seed: int, label: str = "imp round") -> TrainRound:
    """A ``train_round`` that runs ``fit`` from a fresh generator(seed), masks held at 0
    (weights and optimizer state) after every step."""

    def train_round(model: nn.Module, masks: dict[str, Tensor]) -> list[float]:
        return fit(model, x, y, fit_cfg, torch.Generator().manual_seed(seed), hold=MaskHold(model, masks),
                   label=label)

    return train_round


class _Stop(Exception):
    """Raised from ``after_step`` to end a replayed run after exactly k steps."""


def rewind_state_after(model_at_init: nn.Module, x: Tensor, y: Tensor, fit_cfg: FitConfig, steps: int,
                       generator: torch.Generator) -> dict[str, Tensor]:
    """θ_k: the state dict after exactly ``steps`` optimizer steps of ``fit`` (k = 0: the init).

    With the base run's init, data, config and generator seed this replays that run, so θ_k
    lies on its trajectory (same lr schedule, same batches). ``model_at_init`` is not changed.
    """
    total = fit_steps(len(x), fit_cfg)
    if steps > total:
        raise ValueError(f"prune.rewind_steps: {steps} exceeds the {total} steps of the base training run")
    model = copy.deepcopy(model_at_init)
    if steps > 0:
        done = 0

        def count(_: nn.Module) -> None:
            nonlocal done
            done += 1
            if done == steps:
                raise _Stop

        with contextlib.suppress(_Stop):
            fit(model, x, y, fit_cfg, generator, after_step=count, label="imp rewind point")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit_steps(n: int, fit_cfg: FitConfig) -> int:
    """Optimizer steps ``fit`` takes on n examples."""
    return fit_cfg.epochs * math.ceil(n / fit_cfg.batch_size)


def prune_imp(ctx: PruneContext, cfg: ImpConfig) -> Pruned:
    """Registry entry: θ_k replayed from the base's init with the train stage's generator and
    ``cfg.training`` (the base run's own trajectory when ``cfg.training`` is the train stage's
    config), then the IMP rounds on the trained base over the stage's training set."""
    if ctx.initial_model is None:
        raise ValueError("prune.method imp: rewinding needs the base's initialisation, which this run lacks")
    init, train_generator = ctx.initial_model()
    theta = rewind_state_after(init, ctx.x, ctx.y, cfg.training, cfg.rewind_steps, train_generator)
    result = iterative_magnitude_pruning(ctx.model, theta, masked_trainer(ctx.x, ctx.y, cfg.training, cfg.seed), cfg)
    return Pruned(ctx.model, result.masks, report={"imp_rounds": len(result.history),
                                                   "imp_rewind_steps": cfg.rewind_steps})
