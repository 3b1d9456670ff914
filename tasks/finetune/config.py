"""finetune: K task models from the trained base, each with its own head."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimforge.training import FitConfig
from slimforge.transforms import TRANSFORMS


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="artifact directory name")
    transform: Literal[tuple(TRANSFORMS)]  # type: ignore[valid-type]


class FinetuneConfig(FitConfig):
    model_config = ConfigDict(extra="forbid")

    method: Literal["full", "head"] = "full"
    tasks: list[TaskSpec] = Field(
        default_factory=lambda: [TaskSpec(name="rot90", transform="rotate90"),
                                 TaskSpec(name="flip", transform="hflip"),
                                 TaskSpec(name="invert", transform="invert")],
        min_length=1,
    )
    lr: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=3, ge=1)
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return tasks

    def fit_config(self) -> FitConfig:
        return FitConfig(**{k: getattr(self, k) for k in FitConfig.model_fields})
