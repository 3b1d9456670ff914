"""The fan-out stages on a two-process Dask LocalCluster give the local runner's weights, bit for bit.

One subprocess (one Prefect ephemeral API) runs the pipeline flow up to finetune on the tiny
preset with a three-seed train sweep: first with the local runner; then, in a copy of that
workspace without the train and finetune artifacts, with ``orchestrate.task_runner: dask``;
then once more against a scheduler address where nothing listens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from slimforge.artifacts import content_hash

pytestmark = pytest.mark.slow
SWEEP = ["train.seeds=[1, 2]"]  # seeds 0, 1, 2; the tiny preset fine-tunes 3 tasks
FANNED_OUT = ("train", "finetune")

DRIVER = """
import json, os, shutil, socket, sys, time
from pathlib import Path
from flows.pipeline import pipeline

params, local, dask = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
sweep = json.loads(sys.argv[4])
out = {"pid": os.getpid()}
os.chdir(local)  # DVC's stage cache resolves paths against the working directory
out["local"] = pipeline(params_file=params, overrides=sweep, until="finetune", workspace=str(local))
shutil.copytree(local, dask)
for stage in ("train", "finetune"):
    shutil.rmtree(dask / "artifacts" / stage)
on_dask = sweep + ["orchestrate.task_runner=dask"]
os.chdir(dask)
out["dask"] = pipeline(params_file=params, overrides=on_dask, until="finetune", workspace=str(dask))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
start = time.perf_counter()
try:
    pipeline(params_file=params, overrides=on_dask + [f"orchestrate.dask_address=tcp://127.0.0.1:{port}"],
             until="finetune", workspace=str(dask))
except Exception as e:
    out["unreachable"] = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
print("RESULT=" + json.dumps(out))
"""


def _session(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of each live process of session ``sid``: the driver and all it started."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append((p.pid, " ".join(p.cmdline())[:120]))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_workspace, cli_env):
    tmp = tmp_path_factory.mktemp("dask-fanout")
    local = make_workspace(tmp / "local")
    dask = tmp / "dask"
    args = [sys.executable, "-c", DRIVER, str(local / "params" / "tiny.yaml"), str(local), str(dask),
            json.dumps(SWEEP)]
    # A session of its own: whatever the run leaves behind (Dask workers included) is found
    # by session id, reported, and killed, pass or fail.
    proc = subprocess.Popen(args, cwd=tmp, env=cli_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the flows did not finish in 400 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        time.sleep(1)  # the driver has exited; give its children a moment to follow
        leftovers = _session(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"driver failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    result = json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT=")][-1].removeprefix("RESULT="))
    result["leftovers"] = leftovers
    return local, dask, result, stdout + stderr


def _fanout(ws: Path) -> dict:
    return json.loads((ws / "runs" / "fanout.json").read_text())


def test_dask_weights_are_bit_identical_to_the_local_runners(runs):
    local, dask, result, _ = runs
    assert all(result["dask"][stage] > 0 for stage in FANNED_OUT), result["dask"]
    for stage in FANNED_OUT:
        weights = sorted(p.relative_to(local) for p in (local / "artifacts" / stage).rglob("*.safetensors"))
        assert len(weights) == 3, weights  # three seeds; three tasks
        for rel in weights:
            assert (local / rel).read_bytes() == (dask / rel).read_bytes(), rel
        assert content_hash(local / "artifacts" / stage) == content_hash(dask / "artifacts" / stage), stage
        a = json.loads((local / "metrics" / f"{stage}.json").read_text())
        assert a == json.loads((dask / "metrics" / f"{stage}.json").read_text()), stage


def test_the_runner_is_no_stage_param(runs):
    local, dask, result, _ = runs
    assert result["dask"]["ingest"] == result["dask"]["select"] == 0.0  # unchanged: skipped
    assert "orchestrate:" in (dask / "params.yaml").read_text()
    assert "orchestrate" not in (local / "params.yaml").read_text()  # the default is left out
    lock_local = yaml.safe_load((local / "dvc.lock").read_text())["stages"]
    assert lock_local == yaml.safe_load((dask / "dvc.lock").read_text())["stages"]


def test_dask_items_ran_in_two_worker_processes(runs):
    local, dask, result, log = runs
    driver = result["pid"]
    for stage in FANNED_OUT:
        on_dask, at_home = _fanout(dask)[stage], _fanout(local)[stage]
        assert [p["item"] for p in on_dask] == [p["item"] for p in at_home] and len(on_dask) == 3
        assert {p["pid"] for p in at_home} == {driver} and all(p["worker"] is None for p in at_home)
        pids = {p["pid"] for p in on_dask}
        assert len(pids) >= 2 and not pids & {driver, os.getpid()}, on_dask
        assert all(p["worker"].startswith("tcp://") for p in on_dask), on_dask
    assert "Creating a new Dask cluster" in log


def test_no_process_outlives_the_flows(runs):
    _, dask, result, _ = runs
    assert result["leftovers"] == [], f"still running after the driver exited: {result['leftovers']}"
    workers = {p["pid"] for stage in FANNED_OUT for p in _fanout(dask)[stage]}
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_an_unreachable_scheduler_fails_fast_and_changes_nothing(runs):
    _, dask, result, _ = runs
    failed = result["unreachable"]
    assert failed["error"].startswith("SchedulerUnreachable: "), failed
    assert "tiny.yaml: orchestrate.dask_address: no Dask scheduler answers at tcp://127.0.0.1:" in failed["error"]
    assert failed["seconds"] < 20, failed  # the flow run's own overhead plus at most a 5 s connect timeout
    assert "dask_address: null" in (dask / "params.yaml").read_text()  # the bad address was never written

