"""The slimforge command line: run, stage, validate, report, remote add, push, pull."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from slimforge.artifacts import ArtifactError
from slimforge.config import ParamsError, load_params
from slimforge.stages import STAGE_NAMES
from slimforge.workspace import Workspace

app = typer.Typer(help="slimforge: make a model smaller, faster and more capable, reproducibly.",
                  no_args_is_help=True, add_completion=False)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)  # unwrapped: one line per problem
    raise typer.Exit(code)


@app.command()
def run(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params file (a preset in params/ or params.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.epochs=3 (repeatable)"),
    until: str | None = typer.Option(None, "--until", help=f"stop after this stage: {', '.join(STAGE_NAMES)}"),
) -> None:
    """Run the pipeline through the Prefect flow (stages whose inputs did not change are skipped)."""
    try:
        load_params(params, set_)  # reject bad params before Prefect or DVC start
    except ParamsError as e:
        _fail(str(e))
    if until is not None and until not in STAGE_NAMES:
        _fail(f"--until: {until!r} is not one of {', '.join(STAGE_NAMES)}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's 20 s wait for its ephemeral API is too short on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.dvc_graph import WorkspaceBusy
    from flows.pipeline import pipeline
    from flows.runners import SchedulerUnreachable

    try:  # the params file as this shell names it, whichever directory is the workspace
        timings = pipeline(params_file=str(params.resolve()), overrides=list(set_), until=until,
                           workspace=str(Workspace.current().root))
    except (SchedulerUnreachable, WorkspaceBusy) as e:
        _fail(str(e))
    table = Table(title="seconds per stage (0 = skipped)", min_width=40)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, secs in timings.items():
        table.add_row(name, f"{secs:.1f}")
    table.add_row("total", f"{sum(timings.values()):.1f}")
    Console().print(table)


@app.command()
def stage(name: str = typer.Argument(..., help=f"one of {', '.join(STAGE_NAMES)}")) -> None:
    """Run one stage with params.yaml (what dvc.yaml's commands call)."""
    from slimforge.stages import run_stage

    if name not in STAGE_NAMES:
        _fail(f"stage {name!r} is not one of {', '.join(STAGE_NAMES)}")
    try:
        run_stage(name, Workspace.current())
    except (ParamsError, ArtifactError, ValueError) as e:
        _fail(str(e), code=1)


@app.command()
def validate(file: Path = typer.Argument(..., help="params file to check")) -> None:
    """Check a params file; exit status 2 and one line per problem when it is invalid."""
    try:
        load_params(file)
    except ParamsError as e:
        _fail(str(e))
    Console().print(f"{file}: valid")


@app.command()
def report(
    summary: Path = typer.Option(Path("metrics/summary.csv"), help="metrics table written by the evaluate stage"),
    out: Path = typer.Option(Path("reports"), help="directory for report.html, report.md and the plot"),
) -> None:
    """Render the HTML/Markdown report from metrics/summary.csv."""
    from tasks.evaluate.report import render_report
    from tasks.evaluate.schema import read_summary
    from tasks.evaluate.stage import saved_sections

    try:
        paths = render_report(read_summary(summary), out, **saved_sections(summary.resolve().parent.parent, out))
    except (ValueError, OSError) as e:
        _fail(str(e), code=1)
    for p in paths:
        Console().print(str(p))


remote_app = typer.Typer(help="The DVC remote on S3 (credentials from the environment or an AWS profile only).",
                         no_args_is_help=True)
app.add_typer(remote_app, name="remote")


@remote_app.command("add")
def remote_add(
    url: str = typer.Argument(..., help="s3://bucket/prefix"),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)"),
    name: str = typer.Option("storage", "--name", help="remote name"),
    local: bool = typer.Option(False, "--local", help="write .dvc/config.local (this machine only) instead of .dvc/config"),
) -> None:
    """Configure the S3 remote and make it DVC's default."""
    from slimforge.remote import RemoteError, configure_remote, scrub

    try:
        configure_remote(Workspace.current().root, url, endpoint_url, name=name, level="local" if local else "repo")
    except RemoteError as e:
        _fail(str(e))
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    typer.echo(scrub(f"remote {name!r}: {url}" + (f" at {endpoint_url}" if endpoint_url else "") + ", the default"))


@app.command()
def push() -> None:
    """Push every DVC-tracked artifact to the default remote."""
    from slimforge.remote import RemoteError
    from slimforge.remote import push as push_artifacts

    try:
        typer.echo(str(push_artifacts(Workspace.current().root)))
    except RemoteError as e:
        _fail(str(e), code=1)


@app.command()
def pull() -> None:
    """Pull every DVC-tracked artifact from the default remote into the workspace."""
    from slimforge.remote import RemoteError
    from slimforge.remote import pull as pull_artifacts

    try:
        typer.echo(str(pull_artifacts(Workspace.current().root)))
    except RemoteError as e:
        _fail(str(e), code=1)


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())
