"""quantize stage: weight quantization methods, keyed by the ``method:`` name used in YAML.

Each method is a config class plus pure functions on tensors (``rtn.py``); packed storage
and low-bit execution shared by all of them live in ``packed.py``.
"""

from __future__ import annotations

from pydantic import BaseModel

from tasks.quantize.packed import load_packed_artifact, quantize_model, save_packed
from tasks.quantize.rtn import RtnConfig

__all__ = ["METHODS", "RtnConfig", "get_method", "load_packed_artifact", "quantize_model", "save_packed"]

METHODS: dict[str, type[BaseModel]] = {"rtn": RtnConfig}


def get_method(name: str) -> type[BaseModel]:
    """The config class registered under ``name``."""
    if name not in METHODS:
        raise ValueError(f"quantize.method: {name!r} is not one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
