"""finetune: K task models from the trained base, each with its own head.

Methods: ``full`` (every parameter), ``head`` (the head only) and ``lora`` (low-rank adapters
on the backbone's Linear layers plus the full head, folded back into dense weights after
training; ``lora_init: random | eva``). The ``lora_*`` fields matter only for ``lora`` and
the ``eva_*`` fields only for ``lora_init: eva``; setting them otherwise is an error, and
the resolved config (params.yaml, meta.json) leaves them out, so adding LoRA changes neither
the resolved params nor the DVC params hash of a ``full`` or ``head`` experiment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from slimforge.training import FitConfig
from slimforge.transforms import RELABELS, TRANSFORMS


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="artifact directory name")
    transform: Literal[tuple(TRANSFORMS)] = "identity"  # type: ignore[valid-type]
    relabel: Literal[tuple(RELABELS)] = Field(  # type: ignore[valid-type]
        default="identity", description="class mapping of the task (parity, mod3, high, prime) or identity")


_LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_init")
_EVA_FIELDS = ("eva_batches", "eva_rho")


class FinetuneConfig(FitConfig):
    model_config = ConfigDict(extra="forbid")

    method: Literal["full", "head", "lora"] = "full"
    tasks: list[TaskSpec] = Field(
        default_factory=lambda: [TaskSpec(name="rot90", transform="rotate90"),
                                 TaskSpec(name="flip", transform="hflip"),
                                 TaskSpec(name="invert", transform="invert")],
        min_length=1,
    )
    lr: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=3, ge=1)
    seed: int = 0
    lora_rank: int = Field(default=4, ge=1, description="lora: rank r per layer (EVA: mean rank)")
    lora_alpha: float = Field(default=8.0, gt=0, description="lora: the update is scaled by alpha/r")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["backbone.*"], min_length=1,
        description="lora: fnmatch patterns over module names; Linear layers only, never the head")
    lora_init: Literal["random", "eva"] = Field(
        default="random", description="lora: random A (Kaiming-uniform) or EVA (data SVD)")
    eva_batches: int = Field(default=4, ge=1, description="eva: calibration batches of batch_size")
    eva_rho: float = Field(default=2.0, ge=1, description="eva: per-layer rank cap is r·rho")

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return tasks

    @model_validator(mode="after")
    def _method_fields(self) -> FinetuneConfig:
        changed = [f"{f}={getattr(self, f)!r}" for f in self._unused_fields() if self._changed(f)]
        if changed:
            raise ValueError(f"{', '.join(changed)}: unused with method {self.method!r} (lora_* "
                             "need method 'lora', eva_* also lora_init 'eva')")
        return self

    @model_serializer(mode="wrap")
    def _drop_unused(self, handler: SerializerFunctionWrapHandler) -> dict:
        unused = set(self._unused_fields())
        return {k: v for k, v in handler(self).items() if k not in unused}

    def _unused_fields(self) -> tuple[str, ...]:
        lora = () if self.method == "lora" else _LORA_FIELDS
        eva = () if self.method == "lora" and self.lora_init == "eva" else _EVA_FIELDS
        return lora + eva

    def _changed(self, field: str) -> bool:
        info = type(self).model_fields[field]
        return getattr(self, field) != info.get_default(call_default_factory=True)

    def fit_config(self) -> FitConfig:
        return FitConfig(**{k: getattr(self, k) for k in FitConfig.model_fields})
