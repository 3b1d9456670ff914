"""quantize: the variants to produce (each a method config) and the kernel to run them with."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kernels import Kernel
from tasks.quantize import QuantizeMethod
from tasks.quantize.execution import CpuInt4
from tasks.quantize.rtn import RtnConfig
from tasks.select.output import DataSource


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variants: list[QuantizeMethod] = Field(
        default_factory=lambda: [RtnConfig(name="int8", bits=8, granularity="channel"),
                                 RtnConfig(name="int4", bits=4, granularity="group", group_size=32)],
        min_length=1,
        description="one quantized artifact per entry, written to artifacts/quantize/<name>; "
                    "each entry's method: rtn (default), gptq or awq",
    )
    kernel: Kernel = "auto"
    cpu_int4: CpuInt4 = Field(
        default="w4a16",
        description="how 2/3/4-bit layers run on CPU with kernel auto: w4a16 = torch's int4pack op, weight-only "
                    "(bf16 activations); w4a8 = onnxruntime's MatMulNBits, activations also quantized to int8 "
                    "per block of the group size (several times faster at small batches; needs the [cpu] extra)")
    calibration: DataSource = Field(
        default_factory=lambda: DataSource(size=256),
        description="the calibration set GPTQ and AWQ fit on; each variant's agreement with the float "
                    "model is measured on it")
    seed: int = 0

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[QuantizeMethod]) -> list[QuantizeMethod]:
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        return variants
