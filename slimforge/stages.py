"""The stage registry: dvc.yaml stage name -> the runner that does its I/O.

Both ways in call ``run_stage``: ``slimforge stage NAME`` (what dvc.yaml's commands run)
and the Prefect flow. Each runner reads params.yaml through ``load_params`` and its inputs
from the workspace, and writes its artifact directory and ``metrics/<stage>.json``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from slimforge.artifacts import write_json_atomic
from slimforge.config import load_params
from slimforge.workspace import Workspace

STAGE_NAMES = ("ingest", "select", "train", "finetune", "prune", "quantize", "merge", "evaluate")

Fanout = Callable[[Callable, list], list]


def stage_runner(name: str) -> Callable:
    if name not in STAGE_NAMES:
        raise ValueError(f"stage {name!r} is not one of {', '.join(STAGE_NAMES)}")
    # Each stage's runner lives in tasks/<stage>/stage.py; import only the one asked for.
    return importlib.import_module(f"tasks.{name}.stage").run


def run_stage(name: str, ws: Workspace, fanout: Fanout | None = None) -> dict:
    """Run one stage in ``ws`` with the params in ``ws.params``; returns its metrics."""
    runner = stage_runner(name)
    params = load_params(ws.params)
    metrics = runner(params, ws, fanout)
    write_json_atomic(ws.metrics(name), metrics)
    return metrics
