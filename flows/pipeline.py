"""The slimforge pipeline as a Prefect flow: the dvc.yaml stage graph, run in order.

Orchestration only: validate params, write them to params.yaml, then for each stage DVC
reports as changed run it as a Prefect task and record it in dvc.lock. Unchanged stages
are skipped, exactly as ``dvc repro`` skips them.

The stages run in a sub-flow whose task runner ``params.orchestrate`` picks (flows/runners.py):
a flow's runner is fixed when it starts, and the choice is only known once params are read.
Fan-out stages map their items through that runner: threads here, or Dask workers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.dvc_graph import before_run, open_repo, pipeline_stages, record_run, stage_changed
from flows.runners import PrefectFanout, api_for_workers, task_runner, worker_torch_threads
from slimforge.artifacts import write_json_atomic
from slimforge.config import dump_params, load_params
from slimforge.stages import STAGE_NAMES, run_stage
from slimforge.workspace import Workspace
from tasks.evaluate.schema import read_summary, validate_comparisons

# A Literal, so the Prefect UI's run form offers the stages as a dropdown.
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def stage_task(name: str, root: str, torch_threads: int | None = None) -> list[dict]:
    """Run one stage; returns where its fan-out items ran (empty for a stage without one)."""
    fanout = PrefectFanout(torch_threads)
    run_stage(name, Workspace(Path(root)), fanout=fanout)
    return fanout.placements


def write_params(ws: Workspace, text: str) -> None:
    """Write params.yaml only when the resolved params differ (DVC compares its sections)."""
    if not ws.params.exists() or ws.params.read_text() != text:
        tmp = ws.params.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(ws.params)


@flow(name="slimforge-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None,
             until: StageName | None = None, workspace: str = ".") -> dict:
    """Run the dvc.yaml pipeline in ``workspace``; returns per-stage seconds (0 = skipped).

    Args:
        params_file: the experiment (a preset in params/ or params.yaml), relative to the workspace.
        overrides: key.path=value items, e.g. ``train.epochs=3``.
        until: stop after this stage (it and the stages it depends on).
        workspace: the directory holding dvc.yaml.
    """
    ws = Workspace(Path(workspace).resolve())
    params = load_params(ws.root / params_file, list(overrides or []))  # an absolute path stays as it is
    orchestrate = params.orchestrate
    runner = task_runner(orchestrate, params_file)  # a dead scheduler fails here, params.yaml untouched
    with api_for_workers(orchestrate):
        timings, placements = run_stages.with_options(task_runner=runner)(
            str(ws.root), dump_params(params), until, worker_torch_threads(orchestrate))
    write_json_atomic(ws.root / "runs" / "timings.json", timings)
    write_json_atomic(ws.root / "runs" / "fanout.json", placements)
    publish_summary(ws)
    return timings


@flow(name="slimforge-stages", log_prints=True)
def run_stages(root: str, params_text: str, until: str | None = None,
               torch_threads: int | None = None) -> tuple[dict, dict]:
    """Under the workspace's lock, write params.yaml and run the changed stages in order:
    (seconds per stage, where each fan-out item ran). A run refused because another holds the
    lock has changed nothing, its params.yaml included."""
    log = get_run_logger()
    timings: dict[str, float] = {}
    placements: dict[str, list[dict]] = {}
    with open_repo(Path(root)) as repo:
        write_params(Workspace(Path(root)), params_text)
        stages = pipeline_stages(repo, until)
        for i, stage in enumerate(stages, 1):
            if not stage_changed(stage):
                log.info("[%d/%d] %s: unchanged, skipped", i, len(stages), stage.name)
                timings[stage.name] = 0.0
                continue
            log.info("[%d/%d] %s: running", i, len(stages), stage.name)
            start = time.perf_counter()
            before_run(stage)
            if ran := stage_task(stage.name, root, torch_threads):
                placements[stage.name] = ran
                log.info("%s: %d fan-out items in %d processes", stage.name, len(ran),
                         len({(p["host"], p["pid"]) for p in ran}))
            record_run(stage)
            timings[stage.name] = round(time.perf_counter() - start, 2)
            log.info("[%d/%d] %s: done in %.1f s", i, len(stages), stage.name, timings[stage.name])
    return timings, placements


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
