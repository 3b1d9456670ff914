"""train: the architecture, its initialisation and the optimiser, as one typed config."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from slimforge.models import CNNConfig, ModelConfig
from slimforge.training import FitConfig
from tasks.train.init_config import InitField, KaimingConfig


class TrainConfig(FitConfig):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=CNNConfig)
    init: InitField = Field(default_factory=KaimingConfig, description="weight initialisation scheme")
    augment: Literal["none", "dsa"] = Field(
        default="none", description="dsa: a random scale/rotate/crop/cutout per image each step (images only); "
                                    "the protocol distilled sets are evaluated with")
    seed: int = Field(default=0, description="seed of the main run, the one later stages build on")
    seeds: list[int] = Field(default_factory=list,
                             description="extra seeds of a seed sweep; evaluate reports mean ± std over all runs")
    random_baseline: bool = Field(
        default=False, description="when select chose a subset or distilled a set by a method other than random, "
                                   "also train train/random_baseline on a random real subset of the same size and "
                                   "class counts (same init seed and schedule): the baseline selection must beat")

    @model_validator(mode="after")
    def _distinct_seeds(self) -> TrainConfig:
        runs = [self.seed, *self.seeds]
        if len(set(runs)) != len(runs):
            raise ValueError(f"seeds: {self.seeds} must be distinct and must not repeat seed {self.seed}")
        return self

    def fit_config(self) -> FitConfig:
        return FitConfig(**{k: getattr(self, k) for k in FitConfig.model_fields})
