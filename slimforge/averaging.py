"""Uniform averaging of state dicts, shared by every stage that makes a soup.

The merge stage's ``average`` and ``greedy_soup`` and the prune stage's ``sparse_soup`` all
average models of one architecture; this is their one implementation, so neither stage
imports the other's internals. The average is written θ₁ + mean_i(θ_i − θ₁): equal to
mean_i θ_i in exact arithmetic, and a soup of identical models is that model bit for bit
(each difference is exactly 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_same_layout(states: list[dict[str, Tensor]]) -> None:
    """Refuse an empty list, or states whose tensor names, shapes or dtypes differ from the first's."""
    if not states:
        raise ValueError("averaging: no state dicts to average")
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        missing, extra = [n for n in ref if n not in state], [n for n in state if n not in ref]
        if missing or extra:
            name, where = (missing[0], "lacks") if missing else (extra[0], "has an extra")
            raise ValueError(f"averaging: state {i} {where} tensor {name!r} (state 0 has {len(ref)} tensors, "
                             f"state {i} has {len(state)})")
        for name, first in ref.items():
            if state[name].shape != first.shape or state[name].dtype != first.dtype:
                raise ValueError(f"averaging: tensor {name!r} of state {i} is {tuple(state[name].shape)} "
                                 f"{state[name].dtype}, state 0 has {tuple(first.shape)} {first.dtype}")


@torch.no_grad()
def average_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Uniform average of state dicts with the same names, shapes and dtypes.

    Float entries are θ₁ + Σ_i(θ_i − θ₁)/n, in the first state's key order; other entries
    (integer buffers, step counters) are copied from the first state. Inputs are not modified.
    """
    check_same_layout(states)
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        # sum(...) starts at 0, so a single state gives first + 0 = first exactly
        out[name] = first + sum(s[name] - first for s in states) / len(states)
    return out
