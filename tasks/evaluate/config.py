"""evaluate: how every artifact is measured."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_batches: tuple[int, int] = Field(default=(1, 256), description="batch sizes timed (b1, b256 columns)")
    latency_repeats: int = Field(default=20, ge=1, description="timed forward passes; the median is reported")
    latency_warmup: int = Field(default=3, ge=0)
    seed: int = 0
