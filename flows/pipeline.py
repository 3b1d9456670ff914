"""The slimforge pipeline as a Prefect flow: the dvc.yaml stage graph, run in order.

Orchestration only: validate params, write them to params.yaml, then for each stage DVC
reports as changed run it as a Prefect task and record it in dvc.lock. Unchanged stages
are skipped, exactly as ``dvc repro`` skips them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.dvc_graph import before_run, open_repo, pipeline_stages, record_run, stage_changed
from slimforge.artifacts import write_json_atomic
from slimforge.config import dump_params, load_params
from slimforge.stages import run_stage
from slimforge.workspace import Workspace
from tasks.evaluate.schema import read_summary, validate_comparisons


@task(cache_policy=NO_CACHE, task_run_name="fan-out item {item}")
def _fanout_item(fn, item):
    return fn(item)


def prefect_fanout(fn, items: list) -> list:
    """Fan ``fn`` out over ``items`` through Prefect's task runner."""
    return [f.result() for f in _fanout_item.map(unmapped(fn), items)]


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def stage_task(name: str, root: str) -> dict:
    return run_stage(name, Workspace(Path(root)), fanout=prefect_fanout)


def write_params(ws: Workspace, params_file: Path, overrides: list[str]) -> None:
    """Validate first; write params.yaml only when the resolved params differ."""
    text = dump_params(load_params(params_file, overrides))
    if not ws.params.exists() or ws.params.read_text() != text:
        tmp = ws.params.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(ws.params)


@flow(name="slimforge-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None,
             until: str | None = None, workspace: str = ".") -> dict:
    """Run the dvc.yaml pipeline in ``workspace``; returns per-stage seconds (0 = skipped)."""
    log = get_run_logger()
    ws = Workspace(Path(workspace).resolve())
    write_params(ws, Path(params_file), list(overrides or []))
    timings: dict[str, float] = {}
    with open_repo(ws.root) as repo:
        stages = pipeline_stages(repo, until)
        for i, stage in enumerate(stages, 1):
            if not stage_changed(stage):
                log.info("[%d/%d] %s: unchanged, skipped", i, len(stages), stage.name)
                timings[stage.name] = 0.0
                continue
            log.info("[%d/%d] %s: running", i, len(stages), stage.name)
            start = time.perf_counter()
            before_run(stage)
            stage_task(stage.name, str(ws.root))
            record_run(stage)
            timings[stage.name] = round(time.perf_counter() - start, 2)
            log.info("[%d/%d] %s: done in %.1f s", i, len(stages), stage.name, timings[stage.name])
    write_json_atomic(ws.root / "runs" / "timings.json", timings)
    publish_summary(ws)
    return timings


def publish_summary(ws: Workspace) -> None:
    """The evaluate stage's metrics table, as a Prefect table artifact."""
    summary = ws.root / "metrics" / "summary.csv"
    if summary.exists():
        table = read_summary(summary).round(4).to_dict(orient="records")
        create_table_artifact(key="slimforge-summary", table=table,
                              description="slimforge: every artifact measured on one harness")
    comparisons = ws.root / "reports" / "comparisons.csv"
    if comparisons.exists():
        table = validate_comparisons(pd.read_csv(comparisons)).round(4).to_dict(orient="records")
        create_table_artifact(key="slimforge-baselines", table=table,
                              description="slimforge: each method against its stage's baseline, paired")
