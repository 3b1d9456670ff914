"""WeLore: non-uniform low rank from the singular-value tail, then fine-tune only the low-rank parts.

Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from
Low-Rank Gradients" (2024; code: VITA-Group/WeLore). Data-free and one-shot:
  1. each weight matrix W (m x n; a conv kernel as (C_out, C_in·kh·kw)) has its singular
     values min-max normalised, σ̂_i = (σ_i − σ_min)/(σ_max − σ_min) ∈ [0, 1];
  2. one global threshold τ: every matrix keeps the k = #{σ̂_i ≥ τ} largest singular values
     and drops the rest (heavy-tailed spectra lose many, flat ones few);
  3. a matrix whose rank reduction (min(m, n) − k)/min(m, n) reaches ``min_reduction`` is a
     Low-rank Component (LRC) and is stored as its rank-k factors B (m x k) @ A (k x n)
     with B = U_kΣ_k^{1/2}, A = Σ_k^{1/2}V_kᵀ; the others are Non-Low-rank Components
     (N-LRC) and stay dense and untouched;
  4. fine-tuning trains only the LRC factors; N-LRCs are frozen (``Pruned.trainable``,
     honoured by the stage's recovery with ``recovery_params: all``).

Checked against the reference code: the min-max normalisation and the ``σ̂ < τ`` drop rule
(``utils.adaptive_rank_pruning``), the LRC rule "rank reduction > min_ratio" with
min_ratio = 0.4999, i.e. at least half the rank removed (``welore_continual_finetune.py``,
``lib/rank_reduction.do_rank_reduction``, which also sets ``requires_grad = False`` on
N-LRC weights), and the balanced Σ^{1/2} split of the factors (``lib/LowRankLayer.py``).

Reconstructed details (not fixed by the paper at this scale):
- The budget. The released code looks τ up in a hand-tuned table per LLaMa size and target
  *rank* reduction (e.g. τ = 0.175 for 50 %). Here τ is bisected to a *parameter* budget,
  ``compression`` = removed share of the factorable weights' parameters, Σ_LRC (mn − k(m+n))
  over Σ mn, so methods compare at equal size. Only the σ̂ values themselves are candidate
  thresholds (the kept ranks change nowhere else) and the compression is non-decreasing in
  τ, so bisecting over the sorted candidates finds the smallest τ that removes at least the
  budget: one candidate lower keeps one more singular value and misses it.
- An LRC must also pay off, k(m + n) < mn (``lowrank.pays_off``); at the paper's cutoff of
  one half this only excludes the break-even case of a square matrix at exactly half rank.
- A matrix with σ_max = σ_min (no tail at all) normalises to all ones and is never cut.
- The head is never factored (as in ``svd``): fine-tuning swaps heads, merging reads it.
- Only the factor weights are trained, not the LRC biases: LLaMa's projections have none, and
  "only the low-rank factors" is the paper's claim (its code also leaves RMSNorm gains
  trainable; here norms and biases stay frozen with the N-LRCs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tasks.prune.common import PruneBase, PruneContext, Pruned
from tasks.prune.lowrank import factorable, factorize_with_ranks, pays_off


class WeLoreConfig(PruneBase):
    method: Literal["welore"] = "welore"
    compression: float = Field(default=0.5, gt=0, lt=1,
                               description="share of the factorable weights' parameters (Linear/Conv2d weights "
                                           "outside the head) to remove, unitless; the global threshold is the "
                                           "smallest that removes at least this share")
    min_reduction: float = Field(default=0.5, gt=0, lt=1,
                                 description="a matrix becomes a low-rank component (factored, fine-tuned) when "
                                             "this share of its rank min(m, n) is dropped, unitless; below it the "
                                             "matrix stays dense and frozen (the paper's code: 0.4999, strict >)")


@dataclass(frozen=True)
class Spectrum:
    """One weight matrix's min-max normalised singular values (descending) and its shape."""

    normalized: Tensor  # (min(m, n),) float64 in [0, 1], σ̂_0 = 1
    m: int
    n: int


def normalized_spectrum(weight: Tensor) -> Spectrum:
    """σ̂ = (σ − σ_min)/(σ_max − σ_min) of ``weight`` as a matrix (a conv kernel as (C_out, C_in·kh·kw))."""
    matrix = weight.detach().flatten(1).double()
    s = torch.linalg.svdvals(matrix)
    span = s[0] - s[-1]
    normalized = torch.ones_like(s) if span <= 0 else (s - s[-1]) / span
    return Spectrum(normalized, *matrix.shape)


def kept_rank(spectrum: Spectrum, threshold: float) -> int:
    """k = #{σ̂ ≥ τ}: the singular values a threshold keeps (at least 1 for τ ≤ 1)."""
    return int((spectrum.normalized >= threshold).sum())


def low_rank_components(spectra: dict[str, Spectrum], threshold: float, min_reduction: float) -> dict[str, int]:
    """{name: k} of the matrices the threshold makes LRCs: (min(m,n) − k)/min(m,n) ≥ min_reduction, paying off."""
    out = {}
    for name, sp in spectra.items():
        full, k = len(sp.normalized), kept_rank(sp, threshold)
        if (full - k) / full >= min_reduction and pays_off(k, sp.m, sp.n):
            out[name] = k
    return out


def compression(spectra: dict[str, Spectrum], ranks: dict[str, int]) -> float:
    """Removed share of the parameters: Σ_LRC (mn − k(m+n)) / Σ_all mn."""
    total = sum(sp.m * sp.n for sp in spectra.values())
    saved = sum(spectra[name].m * spectra[name].n - k * (spectra[name].m + spectra[name].n)
                for name, k in ranks.items())
    return saved / total


def find_threshold(spectra: dict[str, Spectrum], target: float, min_reduction: float) -> float:
    """The smallest candidate τ (a σ̂ value) whose LRCs remove at least ``target``, by bisection."""

    def achieved(threshold: float) -> float:
        return compression(spectra, low_rank_components(spectra, threshold, min_reduction))

    candidates = torch.unique(torch.cat([sp.normalized for sp in spectra.values()]))  # ascending; the last is 1
    most = achieved(float(candidates[-1]))
    if most < target:
        raise ValueError(f"prune.compression: {target:g} cannot be met; this model's factorable layers allow at "
                         f"most {most:.4f} (rank 1 wherever it pays off), so the valid range is (0, {most:.4f}]")
    lo, hi = 0, len(candidates) - 1  # invariant: achieved(candidates[hi]) >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if achieved(float(candidates[mid])) >= target:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def prune_welore(ctx: PruneContext, cfg: WeLoreConfig) -> Pruned:
    """Registry entry: factor the LRCs in place at the bisected threshold; recovery (``all``)
    then trains only their factors."""
    spectra = {name: normalized_spectrum(m.weight) for name, m in factorable(ctx.model).items()}
    if not spectra:
        raise ValueError("prune.method welore: the model has no factorable layer outside the head")
    threshold = find_threshold(spectra, cfg.compression, cfg.min_reduction)
    ranks = low_rank_components(spectra, threshold, cfg.min_reduction)
    factorize_with_ranks(ctx.model, ranks)
    trainable = [f"{name}.{part}.weight" for name in ranks for part in ("down", "up")]
    report = {"welore_threshold": round(threshold, 6), "ranks": ranks, "welore_lrc": list(ranks),
              "welore_threshold_ranks": {name: kept_rank(sp, threshold) for name, sp in spectra.items()},
              "welore_compression": round(compression(spectra, ranks), 6)}
    return Pruned(ctx.model, ranks=ranks, trainable=trainable, report=report)
