"""The params schema: one section per stage, plus ``orchestrate`` (where the flow runs
fan-outs), validated before any stage runs.

``load_params`` is the one function that reads a params YAML file. Every error names the
file, the key path, the value and what would be valid, e.g.
``params.yaml: train.init: 'kaimig' is not valid (Input should be 'kaiming', 'xavier' or 'orthogonal')``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class OrchestrateConfig(BaseModel):
    """Where the Prefect flow runs fan-out items (per-task fine-tunes, seed sweeps).

    Not a stage's params: no dvc.yaml stage lists this section, because where an item runs
    does not change what it computes, so switching runners reruns nothing. ``dvc repro``
    ignores it (its stages fan out serially in one process).
    """

    model_config = ConfigDict(extra="forbid")

    task_runner: Literal["local", "dask"] = Field(
        "local", description="local: threads of the flow's process; dask: a Dask cluster via prefect-dask")
    # The rest matter only for dask; a local run ignores them, so switching runners is one key.
    dask_address: str | None = Field(
        None, description="tcp://host:port of a running Dask scheduler; null starts a LocalCluster per run")
    n_workers: int = Field(2, ge=1, description="LocalCluster worker processes")
    threads_per_worker: int = Field(1, ge=1, description="fan-out items one LocalCluster worker runs at once")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads in each Dask worker; null = as many as the flow's "
                                "process uses, which keeps weights bit-identical to the local runner's")

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, address: str | None) -> str | None:
        if address is None:
            return None
        parts = urlsplit(address)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError("expected tcp://host:port (or tls://host:port) of a running Dask scheduler, "
                             "or null for a LocalCluster")
        return address


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
    orchestrate: OrchestrateConfig = Field(default_factory=OrchestrateConfig)


class ParamsError(ValueError):
    """Invalid params: the message is one line per problem, naming file, key and value."""


def _format(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(_key(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f"{value!r} is not valid "
        msg = " ".join(str(e["msg"]).split())  # a validator's message may span lines; ours is one per problem
        lines.append(f"{source}: {loc or '(top level)'}: {shown}({msg})")
    return "\n".join(lines)


def _key(part) -> str:
    """A key of the error path as written: quoted when it is empty or holds a line break or
    other unprintable character, so each problem stays on its own line."""
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


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
    """The fully resolved params as YAML (what params.yaml holds for DVC).

    ``orchestrate`` is left out while it holds its defaults, so an experiment's params.yaml
    reads the same as before the section existed.
    """
    default_runner = params.orchestrate == OrchestrateConfig()
    raw = params.model_dump(mode="json", exclude={"orchestrate"} if default_runner else None)
    return yaml.safe_dump(raw, sort_keys=False)
