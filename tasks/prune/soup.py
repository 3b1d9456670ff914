"""Sparse Model Soups (SMS): IMP whose every retraining is a soup of retrained copies.

Zimmer, Spiegel & Pokutta, "Sparse Model Soups: A Recipe for Improved Pruning via Model
Averaging" (ICLR 2024), the SMS pseudocode of Fig. 2. Starting from the trained dense model,
each of R prune–retrain phases prunes globally by magnitude a share p = 1 − (1 − s)^(1/R) of the
*remaining* weights, retrains m copies of that one pruned model with different randomness, and
replaces the model by their uniform average. The copies share one mask and pruned weights stay
at zero while they train, so the average has exactly that mask: averaging costs no sparsity.
The next phase prunes the average.

Checked against the paper and its code (github.com/ZIB-IOL/SMS):
- IMP is prune–retrain (Han et al. 2015), not lottery-ticket rewinding; after phase r the
  sparsity is 1 − (1 − p)^r (``strategies.IMP``), so the last phase reaches s.
- Ingredients differ in batch order (random seed) or weight decay, the paper's two main
  choices (``ensemble_by: pruned_seed | weight_decay``); the soup is the uniform average with
  the masks copied, not averaged (``UniformEnsembling``). Fig. 2 sketches m = 3, our default.

Reconstructed or left out:
- Only the uniform soup; the paper's greedy-soup merge is not offered here.
- The paper recalibrates BatchNorm statistics after averaging; our models have no BatchNorm,
  so buffers are averaged like weights (non-float buffers are taken from the first ingredient).
- Ingredient seeds are drawn from a generator seeded with ``seed``, one per (phase,
  ingredient); with ``vary: weight_decay`` the ingredients of a phase share one seed, so only
  their weight decay differs.
- Each retraining runs the whole ``training`` schedule with a fresh optimizer, pruned weights
  and their optimizer state held at 0 (``slimforge.training.MaskHold``, as in ``imp``).
- The average is ``slimforge.averaging.average_states``, θ₁ + mean_i(θ_i − θ₁), equal to
  mean_i θ_i in exact arithmetic, so a soup of identical ingredients is that model bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from slimforge.averaging import average_states
from slimforge.training import FitConfig, accuracy
from tasks.prune.common import PruneBase, PruneContext, Pruned, RecoveryParams, prunable
from tasks.prune.imp import formula_sparsity, masked_trainer, prune_remaining
from tasks.prune.magnitude import apply_masks

# retrain(model, masks, phase, ingredient) trains ``model`` in place with ``masks`` held at 0.
Retrain = Callable[[nn.Module, dict[str, Tensor], int, int], object]


class SparseSoupConfig(PruneBase):
    method: Literal["sparse_soup"] = "sparse_soup"
    sparsity: float = Field(default=0.8, gt=0, lt=1, description="target share of prunable weights set to zero")
    rounds: int = Field(default=3, ge=1, description="prune–retrain phases R; each prunes 1-(1-sparsity)^(1/R) "
                                                     "of the remaining weights")
    ingredients: int = Field(default=3, ge=2, description="m, retrained copies averaged per phase (models)")
    vary: Literal["seed", "weight_decay"] = Field(
        default="seed", description="what differs between ingredients: batch order (seed) or weight decay")
    weight_decays: list[float] | None = Field(
        default=None, description="one weight decay per ingredient (unitless coefficient); only with vary: weight_decay")
    training: FitConfig = Field(default_factory=lambda: FitConfig(epochs=2),
                                description="the retraining of each ingredient in each phase")
    recovery_params: RecoveryParams = Field(
        default="none", description="the soup is the retrained result; 'none' skips the stage's recovery")
    seed: int = Field(default=0, description="seeds the ingredients' batch orders")

    @model_validator(mode="after")
    def _weight_decays_match(self) -> SparseSoupConfig:
        if self.vary == "weight_decay":
            if self.weight_decays is None or len(self.weight_decays) != self.ingredients:
                raise ValueError(f"prune.weight_decays: vary: weight_decay needs one weight decay per ingredient "
                                 f"({self.ingredients}), got {self.weight_decays}")
            if any(wd < 0 for wd in self.weight_decays):
                raise ValueError(f"prune.weight_decays: must be >= 0, got {self.weight_decays}")
        elif self.weight_decays is not None:
            raise ValueError("prune.weight_decays: set only with vary: weight_decay")
        return self


@dataclass
class SoupResult:
    masks: dict[str, Tensor]  # name -> bool keep-mask of the final soup
    history: list[dict] = field(default_factory=list)  # one row per phase


def phase_sparsities(cfg: SparseSoupConfig) -> list[float]:
    """Target sparsity after each phase 1..R, 1 − (1 − p)^r; the last one is exactly ``cfg.sparsity``."""
    rate = 1.0 - (1.0 - cfg.sparsity) ** (1.0 / cfg.rounds)
    return [formula_sparsity(rate, r) for r in range(1, cfg.rounds)] + [cfg.sparsity]


def ingredient_seeds(cfg: SparseSoupConfig) -> list[list[int]]:
    """(R, m) data-order seeds: all distinct with ``vary: seed``, one per phase otherwise."""
    seeds = torch.randint(0, 2**62, (cfg.rounds, cfg.ingredients), generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.vary == "weight_decay":
        seeds[:] = seeds[:, :1]
    return seeds.tolist()


@torch.no_grad()
def average_sparse(states: list[dict[str, Tensor]], masks: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Uniform average of state dicts that share one sparsity mask; masked entries are exactly 0.

    ``masks[i]`` is ingredient i's name -> bool keep-mask. Refuses ingredients whose masks differ
    (averaging differing masks would lose sparsity) and, through ``average_states``, ingredients
    whose tensors differ in names or shapes. The average itself is ``average_states``.
    """
    if len(states) != len(masks) or not states:
        raise ValueError(f"sparse soup: need one mask per ingredient, got {len(states)} states and {len(masks)} masks")
    ref, ref_masks = states[0], masks[0]
    for i, mask in enumerate(masks):
        if mask.keys() != ref_masks.keys():
            raise ValueError(f"sparse soup: ingredient {i} masks {sorted(mask)}, ingredient 0 masks {sorted(ref_masks)}")
        differing = [n for n in mask if not torch.equal(mask[n], ref_masks[n])]
        if differing:
            raise ValueError(f"sparse soup: ingredient {i}'s mask differs from ingredient 0's at {differing[0]!r}; "
                             f"only models with one shared mask can be averaged without losing sparsity")
    unknown = set(ref_masks) - set(ref)
    if unknown:
        raise ValueError(f"sparse soup: masks name tensors the models lack: {sorted(unknown)}")
    out = average_states(states)
    for name, keep in ref_masks.items():
        out[name].masked_fill_(~keep, 0.0)
    return out


def sparse_model_soup(model: nn.Module, retrain: Retrain, cfg: SparseSoupConfig,
                      score: Callable[[nn.Module], float] | None = None) -> SoupResult:
    """Run the SMS phases on an already trained ``model``, which ends as the final soup.
    ``score`` (e.g. held-out accuracy) is reported for every ingredient and every soup."""
    weights = prunable(model)
    total = sum(w.numel() for w in weights.values())
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    history = []
    for phase, target in enumerate(phase_sparsities(cfg), start=1):
        masks = prune_remaining(prunable(model), masks, target)
        apply_masks(model, masks)
        start = _state(model)
        states, scores = [], []
        for i in range(cfg.ingredients):
            model.load_state_dict(start)
            retrain(model, masks, phase, i)
            states.append(_state(model))
            scores.append(None if score is None else round(score(model), 6))
        model.load_state_dict(average_sparse(states, [masks] * cfg.ingredients))
        kept = sum(int(m.sum()) for m in masks.values())
        history.append({"round": phase, "target_sparsity": target, "sparsity": 1 - kept / total,
                        "ingredient_val_accuracy": scores,
                        "soup_val_accuracy": None if score is None else round(score(model), 6)})
    return SoupResult(masks, history)


def soup_retrainer(x: Tensor, y: Tensor, cfg: SparseSoupConfig) -> Retrain:
    """A ``retrain`` for ``sparse_model_soup``: ingredient i of phase r trains ``cfg.training``
    from its own seed (and, with ``vary: weight_decay``, its own weight decay), masks held."""
    seeds = ingredient_seeds(cfg)

    def retrain(model: nn.Module, masks: dict[str, Tensor], phase: int, i: int) -> list[float]:
        fit_cfg = cfg.training
        if cfg.weight_decays is not None:
            fit_cfg = fit_cfg.model_copy(update={"weight_decay": cfg.weight_decays[i]})
        label = f"soup phase {phase} ingredient {i + 1}/{cfg.ingredients}"
        return masked_trainer(x, y, fit_cfg, seeds[phase - 1][i], label=label)(model, masks)

    return retrain


def prune_sparse_soup(ctx: PruneContext, cfg: SparseSoupConfig) -> Pruned:
    """Registry entry: SMS on the trained base over the stage's training set; accuracies on the
    stage's held-out set when the context has one."""
    score = (lambda m: accuracy(m, *ctx.val)) if ctx.val is not None else None
    result = sparse_model_soup(ctx.model, soup_retrainer(ctx.x, ctx.y, cfg), cfg, score)
    rounds = {str(row["round"]): {k: v for k, v in row.items() if k != "round"} for row in result.history}
    return Pruned(ctx.model, result.masks, report={"soup_rounds": rounds, "soup_ingredients": cfg.ingredients,
                                                   "soup_vary": cfg.vary})


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
