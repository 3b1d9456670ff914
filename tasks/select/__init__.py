"""select: prune the training set (scores, per-epoch plans) or distil a synthetic one.

The registry below is the one place a ``select.method`` name is resolved. Each entry is
(config class, function(ctx: SelectContext, cfg) -> Subset | Plan | Synthetic).
"""

from collections.abc import Callable
from typing import Annotated, NamedTuple, Union

from pydantic import BaseModel, Field

from tasks.select.distribution_matching import (
    DistributionMatchingConfig,
    select_distribution_matching,
)
from tasks.select.el2n import El2nConfig, select_el2n
from tasks.select.forgetting import ForgettingConfig, select_forgetting
from tasks.select.gradient_matching import GradientMatchingConfig, select_gradient_matching
from tasks.select.gradnorm_sampling import GradnormSamplingConfig, select_gradnorm_sampling
from tasks.select.grand import GrandConfig, select_grand
from tasks.select.random import RandomConfig, select_random_subset
from tasks.select.rs2 import Rs2Config, select_rs2
from tasks.select.trajectory_matching import TrajectoryMatchingConfig, select_trajectory_matching


class Method(NamedTuple):
    config: type[BaseModel]
    select: Callable


METHODS: dict[str, Method] = {
    "random": Method(RandomConfig, select_random_subset),
    "el2n": Method(El2nConfig, select_el2n),
    "grand": Method(GrandConfig, select_grand),
    "forgetting": Method(ForgettingConfig, select_forgetting),
    "rs2": Method(Rs2Config, select_rs2),
    "gradnorm_sampling": Method(GradnormSamplingConfig, select_gradnorm_sampling),
    "gradient_matching": Method(GradientMatchingConfig, select_gradient_matching),
    "distribution_matching": Method(DistributionMatchingConfig, select_distribution_matching),
    "trajectory_matching": Method(TrajectoryMatchingConfig, select_trajectory_matching),
}

SelectConfig = Annotated[Union[tuple(m.config for m in METHODS.values())], Field(discriminator="method")]  # noqa: UP007
