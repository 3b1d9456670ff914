"""End to end on the tiny preset: `dvc repro` and the Prefect flow give the same artifacts.

The flow runs as `slimforge run` in a subprocess (Prefect's ephemeral API, no server).
Measured latencies differ between any two runs, so the files that carry them (the
latency columns of metrics/summary.csv and the rendered reports) are compared without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slimforge.artifacts import content_hash

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


STAGES = ["ingest", "select", "train", "finetune", "prune", "quantize", "merge"]
TIMED = {"latency_ms_b1", "latency_ms_b256"}


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def two_ways(e2e_root, make_workspace, cli_env):
    env = cli_env(e2e_root)
    via_dvc = make_workspace(e2e_root / "dvc")
    _run([BIN / "slimforge", "validate", "params/tiny.yaml"], via_dvc, env)
    (via_dvc / "params.yaml").write_text(_resolved(via_dvc / "params/tiny.yaml"))
    _run([BIN / "dvc", "repro", "-q"], via_dvc, env)
    via_flow = make_workspace(e2e_root / "flow")
    first = _run([BIN / "slimforge", "run", "--params", "params/tiny.yaml"], via_flow, env)
    second = _run([BIN / "slimforge", "run", "--params", "params/tiny.yaml"], via_flow, env)
    return via_dvc, via_flow, first, second


def _resolved(path):
    from slimforge.config import dump_params, load_params

    return dump_params(load_params(path))


def test_same_artifact_hashes(two_ways):
    via_dvc, via_flow, *_ = two_ways
    for stage in STAGES:
        assert content_hash(via_dvc / "artifacts" / stage) == content_hash(via_flow / "artifacts" / stage), stage
    assert (via_dvc / "params.yaml").read_text() == (via_flow / "params.yaml").read_text()


def test_same_metrics(two_ways):
    via_dvc, via_flow, *_ = two_ways
    for stage in STAGES + ["evaluate"]:
        a = json.loads((via_dvc / "metrics" / f"{stage}.json").read_text())
        b = json.loads((via_flow / "metrics" / f"{stage}.json").read_text())
        assert a == b, stage
    a = pd.read_csv(via_dvc / "metrics/summary.csv").drop(columns=list(TIMED))
    b = pd.read_csv(via_flow / "metrics/summary.csv").drop(columns=list(TIMED))
    pd.testing.assert_frame_equal(a, b)


def test_same_dvc_lock_except_measured_latency(two_ways):
    via_dvc, via_flow, *_ = two_ways
    a = yaml.safe_load((via_dvc / "dvc.lock").read_text())["stages"]
    b = yaml.safe_load((via_flow / "dvc.lock").read_text())["stages"]
    assert a.keys() == b.keys() == set(STAGES + ["evaluate"])
    for stage in STAGES:
        assert a[stage] == b[stage], stage
    assert a["evaluate"]["deps"] == b["evaluate"]["deps"]
    assert a["evaluate"]["params"] == b["evaluate"]["params"]


def test_second_run_runs_no_stage(two_ways):
    *_, first, second = two_ways
    assert "train: running" in first.stdout + first.stderr
    log = second.stdout + second.stderr
    assert ": running" not in log, log[-2000:]
    assert log.count("unchanged, skipped") == len(STAGES) + 1


def test_dvc_repro_after_the_flow_has_nothing_to_do(two_ways, cli_env):
    _, via_flow, *_ = two_ways
    proc = _run([BIN / "dvc", "status"], via_flow, cli_env(via_flow.parent))
    assert "up to date" in proc.stdout, proc.stdout


def test_summary_holds_every_artifact(two_ways):
    _, via_flow, *_ = two_ways
    from tasks.evaluate.schema import read_summary

    df = read_summary(via_flow / "metrics/summary.csv")
    assert {"train", "prune", "quantize/int8", "quantize/int4", "merge"} <= set(df.artifact)
    assert (via_flow / "reports/report.html").is_file()
    assert ((df.accuracy_low <= df.accuracy) & (df.accuracy <= df.accuracy_high)).all() and (df.flops > 0).all()


def test_merge_is_compared_with_the_uniform_soup_and_lineage_is_fresh(two_ways):
    _, via_flow, *_ = two_ways
    import json

    import pandas as pd

    comparisons = pd.read_csv(via_flow / "reports/comparisons.csv")
    soup = comparisons[(comparisons.artifact == "merge") & (comparisons.baseline == "uniform soup")]
    tasks = len(list((via_flow / "artifacts/finetune").iterdir()))
    assert len(soup) == tasks + 1 and (soup.low <= soup.difference).all() and (soup.difference <= soup.high).all()
    metrics = json.loads((via_flow / "metrics/evaluate.json").read_text())
    assert metrics["stale_lineage_edges"] == 0 and metrics["promotion"]["reason"] == "promotion disabled"
    html = (via_flow / "reports/report.html").read_text()
    assert "<h2>Lineage</h2>" in html and "<h2>Against the baselines</h2>" in html
