"""Retraining: newest data in, the pipeline run, the promotion gate applied, artifacts pushed.

``retrain`` is what the ``retrain-nightly`` (cron) and ``retrain-on-new-data`` (event)
deployments run: it picks the dataset (an explicit ``data_uri``, else the newest object under
``data_prefix``, else what the params file names), runs the pipeline flow as a sub-flow (the
evaluate stage applies ``evaluate.promotion`` against ``runs/champion.json``), appends the
decision to ``runs/decisions.jsonl`` and, when the workspace has a default DVC remote, pushes
the artifacts to it.

``watch_bucket`` polls an ``s3://bucket/prefix`` and emits the Prefect event
``slimforge.dataset.landed`` once per new object (remembered in ``runs/seen_datasets.json``);
the ``retrain-on-new-data`` deployment's trigger turns each such event into a retrain run.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run

from flows.pipeline import pipeline
from slimforge import remote
from slimforge.artifacts import write_json_atomic
from slimforge.config import ParamsError, load_params

DATASET_EVENT = "slimforge.dataset.landed"
DATA_SUFFIXES = (".npz", ".parquet")


@flow(name="slimforge-retrain", log_prints=True)
def retrain(params_file: str = "params/default.yaml", data_uri: str | None = None,
            data_prefix: str | None = None, workspace: str = ".", push: bool = True) -> dict:
    """Retrain on the newest data and decide whether the result becomes the champion.

    Args:
        params_file: the experiment (relative to the workspace); its evaluate.promotion rule is the gate.
        data_uri: the dataset to train on (s3://bucket/key or a local .npz/.parquet path).
        data_prefix: without data_uri, train on the newest .npz/.parquet object under this s3:// prefix.
        workspace: the directory holding dvc.yaml where the pipeline runs.
        push: push the artifacts to the workspace's default DVC remote when one is configured.
    """
    log = get_run_logger()
    root = Path(workspace).resolve()
    params_path = root / params_file  # an absolute path stays as it is
    if not load_params(params_path).evaluate.promotion.enabled:
        raise ParamsError(f"{params_file}: evaluate.promotion is disabled; retraining needs the gate "
                          "(set evaluate.promotion: {artifact: ..., max_accuracy_drop: ...})")
    uri = data_uri or (newest_object(data_prefix) if data_prefix else None)
    overrides = ["ingest.dataset=file", f"ingest.path={uri}"] if uri else []
    log.info("retraining on %s", uri or "the params file's dataset")
    timings = pipeline(params_file=str(params_path), overrides=overrides, workspace=str(root))
    decision = json.loads((root / "metrics" / "evaluate.json").read_text())["promotion"]
    record = {"timestamp": datetime.now(UTC).isoformat(), "flow_run": str(flow_run.get_id() or ""),
              "data": uri or "params", "promote": decision["promote"], "reason": decision["reason"],
              "stages_run": [s for s, t in timings.items() if t > 0]}
    _append(root / "runs" / "decisions.jsonl", record)
    log.info("promotion: %s (%s)", "promoted" if record["promote"] else "not promoted", record["reason"])
    record["pushed"] = _push(root) if push else None
    create_markdown_artifact(key="slimforge-promotion", markdown=_markdown(record),
                             description="slimforge: the retrain run's promotion decision")
    return record


@flow(name="slimforge-watch-bucket", log_prints=True)
def watch_bucket(bucket_uri: str, workspace: str = ".") -> list[str]:
    """Emit ``slimforge.dataset.landed`` for every .npz/.parquet object under ``bucket_uri``
    (s3://bucket/prefix) not seen before; returns the new objects' URIs."""
    root = Path(workspace).resolve()
    seen_path = root / "runs" / "seen_datasets.json"
    seen = json.loads(seen_path.read_text()) if seen_path.is_file() else {}
    new = []
    for uri, etag in list_objects(bucket_uri):
        if seen.get(uri) == etag:
            continue
        emit_event(event=DATASET_EVENT, resource={"prefect.resource.id": f"slimforge.dataset.{uri}"},
                   payload={"uri": uri, "etag": etag})
        seen[uri] = etag
        new.append(uri)
    write_json_atomic(seen_path, seen)
    get_run_logger().info("%d new dataset object(s) under %s", len(new), bucket_uri)
    return new


def list_objects(prefix_uri: str) -> list[tuple[str, str]]:
    """(s3 URI, ETag) of each dataset object under an s3://bucket/prefix, oldest first.
    Credentials and endpoint come from boto3's chain (AWS_* environment, profile)."""
    import boto3

    parts = urlsplit(prefix_uri)
    if parts.scheme != "s3" or not parts.hostname:
        raise ValueError(f"data prefix {prefix_uri!r}: expected s3://bucket[/prefix]")
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=parts.hostname,
                                                             Prefix=parts.path.lstrip("/"))
    objects = [o for page in pages for o in page.get("Contents", []) if o["Key"].endswith(DATA_SUFFIXES)]
    objects.sort(key=lambda o: (o["LastModified"], o["Key"]))
    return [(f"s3://{parts.hostname}/{o['Key']}", o["ETag"].strip('"')) for o in objects]


def newest_object(prefix_uri: str) -> str:
    objects = list_objects(prefix_uri)
    if not objects:
        raise ValueError(f"data prefix {prefix_uri!r}: no {'/'.join(DATA_SUFFIXES)} objects found")
    return objects[-1][0]


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _push(root: Path) -> int | None:
    """Objects pushed to the default DVC remote; None when the workspace has none."""
    if not remote.has_remote(root):
        get_run_logger().info("no default DVC remote configured: artifacts not pushed")
        return None
    summary = remote.push(root)
    get_run_logger().info("%s", summary)  # RemoteError and the summary are already scrubbed of secrets
    return summary.files


def _markdown(record: dict) -> str:
    verdict = "**promoted**" if record["promote"] else "**not promoted**"
    return (f"# slimforge retrain\n\n- data: `{record['data']}`\n- decision: {verdict}\n"
            f"- reason: {record['reason']}\n- stages run: {', '.join(record['stages_run']) or 'none'}\n")
