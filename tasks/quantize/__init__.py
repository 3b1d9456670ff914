"""quantize stage: post-training and quantization-aware weight quantization, keyed by the
``method:`` name used in YAML.

The registry below is the one place a ``quantize.variants[*].method`` name is resolved. Each
entry is (config class, function(model, calibration inputs x, cfg) -> {layer name:
QuantizedLayer}); a method registered with ``data="train"`` (QAT) gets the labelled train split
(x, y) in place of x. Two grid options apply on top of a method: ``lorc_rank`` (``lorc.py``, after
any PTQ method) and ``group_axis`` (``adadim.py``). ``packed.py`` stores any method's result in
one packed format and loads it; ``execution.py`` holds the modules that run it with the real
low-bit kernels. A variant that names no method is an RTN one. Every PTQ method quantizes each
attention's stacked q/k/v in-projection as the layer ``<attn>.in_proj`` (``attention.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple, Union

from pydantic import BaseModel, Discriminator, Tag

from tasks.quantize.adadim import AdadimConfig, quantize_adadim
from tasks.quantize.awq import AwqConfig, quantize_awq
from tasks.quantize.flexround import FlexRoundConfig, quantize_flexround
from tasks.quantize.gptq import GptqConfig, quantize_gptq
from tasks.quantize.layerwise import QuantizedLayer, quantize_rtn
from tasks.quantize.packed import (
    dequantized_state,
    load_packed_artifact,
    quantize_model,
    read_packed,
    save_packed,
)
from tasks.quantize.qat import QatConfig, quantize_qat
from tasks.quantize.rtn import RtnConfig
from tasks.quantize.smoothquant import SmoothQuantConfig, quantize_smoothquant

__all__ = ["METHODS", "AwqConfig", "GptqConfig", "Method", "QuantizeMethod", "QuantizedLayer", "RtnConfig",
           "dequantized_state", "get_method", "load_packed_artifact", "quantize_model", "read_packed", "save_packed"]


class Method(NamedTuple):
    config: type[BaseModel]
    quantize: Callable
    # what the stage passes as x: calibration inputs, or (x, y) of the labelled train split (QAT)
    data: Literal["calibration", "train"] = "calibration"


METHODS: dict[str, Method] = {
    "rtn": Method(RtnConfig, quantize_rtn),
    "gptq": Method(GptqConfig, quantize_gptq),
    "awq": Method(AwqConfig, quantize_awq),
    "smoothquant": Method(SmoothQuantConfig, quantize_smoothquant),
    "flexround": Method(FlexRoundConfig, quantize_flexround),
    "adadim": Method(AdadimConfig, quantize_adadim),
    "qat": Method(QatConfig, quantize_qat, data="train"),
}

DEFAULT_METHOD = "rtn"


def get_method(name: str) -> Method:
    """The method registered under ``name``."""
    if name not in METHODS:
        raise ValueError(f"quantize.method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def _method_of(value) -> str:
    """The union's tag: a variant that names no method is an RTN one."""
    if isinstance(value, dict):
        return value.get("method", DEFAULT_METHOD)
    # not a mapping (a list, a number): the default method's model reports the wrong type
    return getattr(value, "method", DEFAULT_METHOD)


QuantizeMethod = Annotated[Union[tuple(Annotated[m.config, Tag(name)] for name, m in METHODS.items())],  # noqa: UP007
                           Discriminator(_method_of)]
