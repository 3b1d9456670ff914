"""Register slimforge's Prefect deployments on a local process work pool.

    python infra/deploy.py [--pool slimforge-process] [--workspace PATH] [--bucket s3://slimforge/datasets]

Against the server PREFECT_API_URL names, it creates the process work pool when it is missing,
then creates or updates four deployments (the server keys a deployment by flow and name, and
Prefect replaces the automations a deployment owns, so running it again changes nothing):

  slimforge-pipeline/pipeline                  on demand: the UI's Run button shows a form of
                                               params_file, overrides, until and workspace
  slimforge-retrain/retrain-nightly            cron 0 3 * * * (UTC), on the newest dataset in the bucket
  slimforge-retrain/retrain-on-new-data        on every `slimforge.dataset.landed` event, with
                                               data_uri taken from the event's payload
  slimforge-watch-bucket/watch-bucket          every 5 minutes: polls the bucket and emits that event

Runs that write the workspace (pipeline, both retrains) share the work queue ``pipeline`` with a
concurrency limit of 1: DVC and the stages rewrite one dvc.lock and one artifacts/ tree, so two at
once would collide. watch-bucket polls on its own queue ``watch`` and never waits behind them.

Flows are referenced by module path (``flows.pipeline.pipeline``): the ``flows`` package is
installed with slimforge, so no image is built and no code is copied. A worker on this machine
(``prefect worker start --pool slimforge-process``) imports them from the same environment and
runs each flow with the workspace as its working directory, so a relative params file resolves
there, exactly as it does for ``slimforge run`` in that directory. Prefect 3.8's process worker
also puts that directory first on the flow's PYTHONPATH: a workspace holding its own copies of
slimforge/, tasks/ and kernels/ (dvc.yaml's code deps) runs those copies beside the installed
flows/, so keep such copies in step with the checkout.

The schedules need Prefect's scheduler service, which fails to insert runs under SQLAlchemy 2.1
("Can't evaluate bulk DML statement"); with SQLAlchemy 2.0 it plans them.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Module paths, not imports: flows/retrain.py is loaded only when registering, never at import time.
PIPELINE = "flows.pipeline.pipeline"
RETRAIN = "flows.retrain.retrain"
WATCH_BUCKET = "flows.retrain.watch_bucket"

DATASET_EVENT = "slimforge.dataset.landed"  # what flows/retrain.py:watch_bucket emits
NIGHTLY_CRON = "0 3 * * *"
WATCH_EVERY = timedelta(minutes=5)
TAGS = ["slimforge"]
RUNS_QUEUE, WATCH_QUEUE = "pipeline", "watch"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default="slimforge-process", help="process work pool (created if missing)")
    parser.add_argument("--workspace", type=Path, default=REPO,
                        help="directory holding dvc.yaml where the flows run (default: this repository)")
    parser.add_argument("--bucket", default="s3://slimforge/datasets",
                        help="s3://bucket/prefix that watch-bucket polls for new datasets")
    return parser.parse_args(argv)


def ensure_process_pool(name: str) -> bool:
    """Create the process work pool ``name`` unless it exists; True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
                return True
            except ObjectAlreadyExists:  # another deploy.py created it meanwhile
                return False
    if pool.type != "process":
        raise SystemExit(f"work pool {name!r} exists with type {pool.type!r}; expected 'process'")
    return False


def ensure_queue(pool: str, name: str, concurrency_limit: int | None) -> None:
    """Create the work queue or set its concurrency limit, so a re-run converges on the same state."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            queue = client.read_work_queue_by_name(name, work_pool_name=pool)
        except ObjectNotFound:
            client.create_work_queue(name, work_pool_name=pool, concurrency_limit=concurrency_limit)
            return
        if queue.concurrency_limit != concurrency_limit:
            client.update_work_queue(queue.id, concurrency_limit=concurrency_limit)


def dataset_trigger():
    """Run retrain for each landed dataset, its ``data_uri`` rendered from the event's payload."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="slimforge: retrain on new data",
        expect={DATASET_EVENT},
        match={"prefect.resource.id": "slimforge.dataset.*"},
        # The server renders this jinja template with the matching event in scope (RunDeployment).
        parameters={"data_uri": {"__prefect_kind": "jinja", "template": "{{ event.payload.uri }}"}},
    )


def build_deployments(workspace: Path, bucket: str) -> list:
    """The four RunnerDeployments, each run with ``workspace`` as its working directory."""
    from prefect.deployments.runner import EntrypointType
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron, Interval

    def on(queue: str, **parameters) -> dict:
        return {"work_queue_name": queue, "parameters": {"workspace": str(workspace), **parameters},
                "job_variables": {"working_dir": str(workspace)}, "tags": TAGS,
                "entrypoint_type": EntrypointType.MODULE_PATH}

    pipeline, retrain, watch = (load_flow_from_entrypoint(e) for e in (PIPELINE, RETRAIN, WATCH_BUCKET))
    return [
        pipeline.to_deployment(name="pipeline", **on(RUNS_QUEUE),
                               description="The dvc.yaml pipeline on demand: changed stages run, "
                                           "unchanged ones are skipped."),
        retrain.to_deployment(name="retrain-nightly", **on(RUNS_QUEUE, data_prefix=bucket),
                              schedules=[Cron(NIGHTLY_CRON, timezone="UTC", slug="nightly")],
                              description=f"Retrain every night at 03:00 UTC on the newest dataset under {bucket} "
                                          "and apply the promotion gate."),
        retrain.to_deployment(name="retrain-on-new-data", **on(RUNS_QUEUE), triggers=[dataset_trigger()],
                              description=f"Retrain on each dataset that lands (event {DATASET_EVENT})."),
        watch.to_deployment(name="watch-bucket", **on(WATCH_QUEUE, bucket_uri=bucket),
                            schedules=[Interval(WATCH_EVERY, timezone="UTC", slug="poll")],
                            description=f"Poll {bucket} and emit {DATASET_EVENT} for each new object."),
    ]


def describe(deployment) -> str:
    """One line: the deployment's schedules or triggers, as a person would read them."""
    whens = []
    for schedule in deployment.schedules or []:
        s = schedule.schedule
        whens.append(f"cron {s.cron} ({s.timezone})" if hasattr(s, "cron")
                     else f"every {s.interval}")
    whens += [f"on event {', '.join(sorted(t.expect))}" for t in deployment.triggers]
    return "; ".join(whens) or "on demand"


def register(pool: str, workspace: Path, bucket: str) -> dict[str, str]:
    """Create the pool if needed and apply every deployment; {flow/name: deployment id}."""
    if not os.environ.get("PREFECT_API_URL"):
        # Without it Prefect would register into a throwaway ephemeral server.
        raise SystemExit("PREFECT_API_URL is not set: point it at a running Prefect server's /api")
    if not (workspace / "dvc.yaml").is_file():
        raise SystemExit(f"--workspace {workspace}: no dvc.yaml there")
    created = ensure_process_pool(pool)
    ensure_queue(pool, RUNS_QUEUE, concurrency_limit=1)
    ensure_queue(pool, WATCH_QUEUE, concurrency_limit=None)
    print(f"work pool {pool!r} (process): {'created' if created else 'exists'}; "
          f"queues {RUNS_QUEUE!r} (one run at a time), {WATCH_QUEUE!r}")
    ids = {}
    for deployment in build_deployments(workspace, bucket):
        key = f"{deployment.flow_name}/{deployment.name}"
        ids[key] = str(deployment.apply(work_pool_name=pool))
        print(f"deployment {key} ({ids[key]}): {describe(deployment)}")
    print(f"workspace: {workspace}\nstart a worker: prefect worker start --pool {pool}")
    return ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    register(args.pool, args.workspace.resolve(), args.bucket)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
