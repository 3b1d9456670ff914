"""evaluate: how every artifact is measured."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.evaluate.promotion import PromotionConfig


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_batches: tuple[int, int] = Field(default=(1, 256), description="batch sizes timed (b1, b256 columns)")
    latency_repeats: int = Field(default=20, ge=1, description="timed forward passes; the median is reported")
    latency_warmup: int = Field(default=3, ge=0)
    bootstrap: int = Field(default=2000, ge=100, description="bootstrap resamples of the accuracy intervals")
    promotion: PromotionConfig = Field(default_factory=lambda: PromotionConfig(enabled=False),
                                       description="the rule deciding whether this run's model becomes the champion")
    gpu: Literal["auto", "off"] = Field(default="auto", description="auto: when CUDA is available, also time "
                                        "every artifact on the GPU (gpu_latency_ms_b1/_b256, gpu_peak_memory_bytes)")
    seed: int = 0
