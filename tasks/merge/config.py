"""The ``merge:`` params section: one method config per ``method`` name, plus the stage's inputs.

Each method module keeps its own config (its settings only); the classes here add what the
stage needs around it: ``checkpoints`` (merge safetensors checkpoints from disk instead of the
pipeline's task models; streaming methods only), ``patch`` (also write every task vector as a
compact patch) and, for weight matching, the ``models`` to align.
"""

from __future__ import annotations

import math
from typing import Annotated, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from tasks.merge.adamerging import AdaMergingConfig
from tasks.merge.checkpoints import CheckpointInputs
from tasks.merge.patches import PatchConfig
from tasks.merge.soup import AverageConfig, GreedySoupConfig
from tasks.merge.task_arithmetic import TaskVectorConfig
from tasks.merge.weight_matching import WeightMatchingConfig

_CHECKPOINTS = Field(default=None, description="merge these safetensors checkpoints (base + models), "
                                               "streamed tensor by tensor, instead of the pipeline's task models")
_PATCH = Field(default=None, description="also store every task vector as a compact patch")


class TaskVectorMerge(TaskVectorConfig):
    checkpoints: CheckpointInputs | None = _CHECKPOINTS
    patch: PatchConfig | None = _PATCH

    @field_validator("lambdas")
    @classmethod
    def _finite_lambdas(cls, lambdas: list[float]) -> list[float]:
        bad = next((i for i, lam in enumerate(lambdas) if not math.isfinite(lam)), None)
        if bad is not None:  # a NaN λ would turn every merged weight into NaN
            raise ValueError(f"lambdas[{bad}] is {lambdas[bad]}; expected finite scaling coefficients")
        return lambdas

    @model_validator(mode="after")
    def _one_lambda_for_checkpoints(self) -> TaskVectorMerge:
        if self.checkpoints is not None and (len(self.lambdas) != 1 or len(self.rescales or [0]) != 1):
            raise ValueError(f"lambdas {self.lambdas}: merging checkpoints has no validation data to search on; "
                             "give one λ (and at most one rescale)")
        return self


class AverageMerge(AverageConfig):
    checkpoints: CheckpointInputs | None = _CHECKPOINTS
    patch: PatchConfig | None = _PATCH


class GreedySoupMerge(GreedySoupConfig):
    patch: PatchConfig | None = _PATCH


class AdaMergingMerge(AdaMergingConfig):
    patch: PatchConfig | None = _PATCH


class WeightMatchingMerge(WeightMatchingConfig):
    models: list[str] = Field(min_length=2, description="model artifact directories (trained from different "
                                                       "inits) to align to the first and merge")


MERGE_CONFIGS = {"task_arithmetic": TaskVectorMerge, "ties": TaskVectorMerge, "dare": TaskVectorMerge,
                 "average": AverageMerge, "greedy_soup": GreedySoupMerge, "adamerging": AdaMergingMerge,
                 "weight_matching": WeightMatchingMerge}
MERGE_METHODS = tuple(MERGE_CONFIGS)


def _method_of(value) -> str:
    """The union's tag: a section that names no method is a task-arithmetic one."""
    if isinstance(value, dict):
        return value.get("method", "task_arithmetic")
    # not a mapping (a list, a number): the default method's model reports the wrong type
    return getattr(value, "method", "task_arithmetic")


MergeConfig = Annotated[Union[tuple(Annotated[c, Tag(name)] for name, c in MERGE_CONFIGS.items())],  # noqa: UP007
                        Discriminator(_method_of)]
