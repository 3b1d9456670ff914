"""train: the architecture, its initialisation and the optimiser, as one typed config."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from slimforge.models import CNNConfig, ModelConfig
from slimforge.training import FitConfig
from tasks.train.distributed import DistributedConfig
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
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, exclude_if=lambda v: v == DistributedConfig(),
        description="one run across processes or machines with torch DDP (torchrun): each optimizer step sees the "
                    "same global batch_size examples as one process, split evenly over nproc_per_node × nnodes. Left "
                    "out of the dump when default, so a one-process run's params, meta.json and run key are unchanged")

    @model_validator(mode="after")
    def _distinct_seeds(self) -> TrainConfig:
        runs = [self.seed, *self.seeds]
        if len(set(runs)) != len(runs):
            raise ValueError(f"seeds: {self.seeds} must be distinct and must not repeat seed {self.seed}")
        return self

    @model_validator(mode="after")
    def _fits_the_world(self) -> TrainConfig:
        world = self.distributed.world_size
        if self.batch_size % world:
            raise ValueError(f"train.batch_size {self.batch_size} must be divisible by the world size {world} "
                             f"(train.distributed.nproc_per_node {self.distributed.nproc_per_node} × nnodes "
                             f"{self.distributed.nnodes}) so every process takes an equal part of each batch")
        if self.distributed.nnodes > 1:  # every node must launch the same runs in the same order, on one port
            for key, on in (("seeds", bool(self.seeds)), ("random_baseline", self.random_baseline),
                            ("checkpoint_every", self.checkpoint_every > 0)):
                if on:
                    raise ValueError(f"train.{key}: not supported with train.distributed.nnodes > 1 (one run, "
                                     "no checkpoints, across machines); leave it at its default")
        return self

    def fit_config(self) -> FitConfig:
        return FitConfig(**{k: getattr(self, k) for k in FitConfig.model_fields})
