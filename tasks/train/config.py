"""train: the architecture, its initialisation and the optimiser, as one typed config."""

from __future__ import annotations


from pydantic import ConfigDict, Field

from slimforge.models import CNNConfig, ModelConfig
from slimforge.training import FitConfig
from tasks.train.init_config import InitField, KaimingConfig


class TrainConfig(FitConfig):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=CNNConfig)
    init: InitField = Field(default_factory=KaimingConfig, description="weight initialisation scheme")
    seed: int = 0

    def fit_config(self) -> FitConfig:
        return FitConfig(**{k: getattr(self, k) for k in FitConfig.model_fields})
