"""DARE: drop and rescale delta parameters; DAREx-q's rescaling.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (ICML 2024), Eq. 1: m ~ Bernoulli(p) per entry, τ̃ = (1 − m) ⊙ τ / (1 − p), so
E[τ̃] = τ. Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned
Models" (DAREx-q) replace the factor 1/(1 − p), too large at high p, by 1/q with q > 1 − p
tuned on validation data (``rescale`` here is q itself; the merge stage searches every
(λ, q) pair of its grids on validation data).

Every tensor of every task draws its mask from its own generator, seeded from (seed, task
index, tensor name), so the masks do not depend on the order tensors are visited in: a merge
streamed tensor by tensor from disk draws the same masks as one done in memory.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def tensor_generator(seed: int, task: int, name: str) -> torch.Generator:
    """A generator for one (task, tensor) pair, independent of visiting order."""
    digest = hashlib.sha256(f"{seed}/{task}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare(delta: Tensor, p: float, generator: torch.Generator, rescale: float | None = None) -> Tensor:
    """Drop each entry of τ with probability p and divide the survivors by (1 − p), or by q."""
    if not 0 <= p < 1:
        raise ValueError(f"dare: drop probability must lie in [0, 1), got {p}")
    if p == 0 and rescale is None:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator) >= p  # Bernoulli(1 − p) keep mask
    factor = rescale if rescale is not None else 1.0 - p
    return torch.where(keep, delta / factor, torch.zeros_like(delta))
