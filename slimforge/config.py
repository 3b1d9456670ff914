"""The params schema: one section per stage, validated before any stage runs.

``load_params`` is the one function that reads a params YAML file. Every error names the
file, the key path, the value and what would be valid, e.g.
``params.yaml: train.init: 'kaimig' is not valid (Input should be 'kaiming', 'xavier' or 'orthogonal')``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.evaluate.config import EvaluateConfig
from tasks.finetune.config import FinetuneConfig
from tasks.ingest.config import IngestConfig
from tasks.merge.config import MERGE_METHODS, MergeConfig, TaskVectorMerge
from tasks.prune import METHODS as PRUNE_METHODS
from tasks.prune import PruneConfig
from tasks.prune.magnitude import MagnitudeConfig
from tasks.quantize import METHODS as QUANTIZE_METHODS
from tasks.quantize.config import QuantizeConfig
from tasks.select import METHODS as SELECT_METHODS
from tasks.select import SelectConfig
from tasks.select.random import RandomConfig
from tasks.train.config import TrainConfig
from tasks.train.init_config import INIT_SCHEMES


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ingest: IngestConfig = Field(default_factory=IngestConfig)
    select: SelectConfig = Field(default_factory=RandomConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    prune: PruneConfig = Field(default_factory=MagnitudeConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    merge: MergeConfig = Field(default_factory=TaskVectorMerge)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


class ParamsError(ValueError):
    """Invalid params: the message is one line per problem, naming file, key and value."""


def _format(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f"{value!r} is not valid "
        lines.append(f"{source}: {loc}: {shown}({e['msg']})")
    return "\n".join(lines)


# Discriminated unions add the tag to the error location (select.random.keep_fraction);
# drop it so the path is the one the user wrote (select.keep_fraction).
_UNION_TAGS = {*SELECT_METHODS, *PRUNE_METHODS, *QUANTIZE_METHODS, *MERGE_METHODS, "mlp", "cnn", "vit", *INIT_SCHEMES}


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=0.01' -> (['train', 'lr'], 0.01); the value is parsed as YAML."""
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item!r}: {'.'.join(path[:-1])} is not a section")
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    return raw


def validate_params(raw: dict, source: str) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format(source, e)) from None


def load_params(path: Path, overrides: list[str] = ()) -> Params:
    """Read, override and validate a params file; raises ParamsError on any problem."""
    return validate_params(apply_overrides(read_yaml(path), list(overrides)), str(path))


def dump_params(params: Params) -> str:
    """The fully resolved params as YAML (what params.yaml holds for DVC)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
