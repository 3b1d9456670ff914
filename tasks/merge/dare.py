"""DARE: drop and rescale delta parameters; DAREx-q's rescaling.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (ICML 2024), Eq. 1: m ~ Bernoulli(p) per entry, τ̃ = (1 − m) ⊙ τ / (1 − p), so
E[τ̃] = τ. Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned
Models" (DAREx-q) replace the factor 1/(1 − p), too large at high p, by 1/q with q > 1 − p
tuned on validation data (``rescale`` here is q itself; the merge stage searches every
(λ, q) pair of its grids on validation data).

Every tensor of every task draws its mask from its own seed, derived from (seed, task index,
tensor name), so the masks do not depend on the order tensors are visited in. The mask is counter
based (``kernels.merge.dare_keep``: a Philox uniform per flat index, from Triton's generator), and
the merge op (``kernels.merge.task_vector_merge``) drops and rescales: its GPU kernel draws
the same mask, and a block of rows (a merge streamed from disk)
draws the same bits as the whole tensor when it passes its flat ``offset``.
"""

from __future__ import annotations

import hashlib


def tensor_seed(seed: int, task: int, name: str) -> int:
    """The mask seed of one (task, tensor) pair, in [0, 2⁶³), independent of visiting order."""
    digest = hashlib.sha256(f"{seed}/{task}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
