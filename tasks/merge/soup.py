"""Model soups: the uniform soup and the greedy soup.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (ICML 2022). Ingredients are fine-tunes of one
base. The uniform soup (``average``) is the mean of all ingredients' weights. The greedy soup
is the paper's Recipe 1: sort the ingredients by their own held-out score, descending; start
the soup from the best; walk down the list and keep an ingredient if the soup with it scores
at least as well as the soup without it (the paper's ``>=``); the soup is the uniform average
of the kept ingredients.

In the merge stage an ingredient is a task model's backbone and ``score`` the caller's
held-out measure (e.g. mean accuracy over the tasks, each with its own head); heads are
never averaged.

Details:
- The average is ``slimforge.averaging.average_states``, θ₁ + mean_i(θ_i − θ₁), so a soup of
  identical models is that model bit for bit.
- Kept ingredients are averaged in the order they were kept (best first), so permuting the
  inputs leaves the soup unchanged bit for bit when the ingredients' scores differ. Equal
  ingredient scores are ordered by input position (a stable sort).
- ``score`` is called once per ingredient and once per candidate soup: 2K − 1 calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from slimforge.averaging import average_states, check_same_layout

State = dict[str, Tensor]


class AverageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["average"] = "average"


class GreedySoupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["greedy_soup"] = "greedy_soup"


def average(states: list[State]) -> State:
    """The uniform soup: the mean of every ingredient's state dict."""
    return average_states(states)


def greedy_soup(states: list[State], score: Callable[[State], float]) -> tuple[State, list[int]]:
    """Recipe 1 of the paper; returns the soup and the indices (into ``states``) of the kept
    ingredients, in the order they were kept (the best ingredient first).

    ``score(state)`` is a held-out measure where higher is better (accuracy, not loss).
    """
    check_same_layout(states)
    own = [float(score(s)) for s in states]
    order = sorted(range(len(states)), key=lambda i: -own[i])  # stable: ties keep input order
    kept = [order[0]]
    soup, soup_score = average_states([states[order[0]]]), own[order[0]]  # a copy, bit for bit
    for i in order[1:]:
        candidate = average_states([states[j] for j in kept + [i]])
        candidate_score = float(score(candidate))
        if candidate_score >= soup_score:  # the paper keeps an ingredient that does not hurt
            kept.append(i)
            soup, soup_score = candidate, candidate_score
    return soup, kept
