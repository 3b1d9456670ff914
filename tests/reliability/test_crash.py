"""SIGKILL in the middle of every stage, then run again (issue 10, "Crashes").

One uninterrupted `dvc repro` of the tiny preset is the reference. For each stage, a copy
of the finished reference workspace loses that stage's outputs, and `dvc repro <stage>` is
SIGKILLed (the whole process group: dvc and the `slimforge stage` it runs) while the stage
is writing its temp directory. Then: nothing partial is visible where DVC or a later stage
looks, DVC reports the stage as changed, and a plain `dvc repro` reruns only that stage,
gives byte-identical artifacts, clears the temp directory and leaves DVC up to date.

The kill moment is deterministic: a ``sitecustomize`` on the killed run's PYTHONPATH stops
the process at its first ``os.replace`` into (or of) the stage's temp directory; the test
waits for the marker it leaves, then kills. Resuming training from its own checkpoints
after a SIGKILL is tests/tasks/train/test_train_stage.py::
test_a_sigkilled_run_resumes_to_bit_identical_weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slimforge.artifacts import content_hash

BIN = Path(sys.executable).parent
STAGES = ["ingest", "select", "train", "finetune", "prune", "quantize", "merge", "evaluate"]
TIMED = {"latency_ms_b1", "latency_ms_b256"}  # measured latency differs between any two runs
TABLE: dict[str, dict[str, int]] = {}

# Stops the process at the first os.replace whose source or destination lies under a path
# component starting with $SLIMFORGE_CRASH_PREFIX, after writing $SLIMFORGE_CRASH_MARKER.
INJECTOR = '''
import os
if os.environ.get("SLIMFORGE_CRASH_PREFIX"):
    import json, time
    from pathlib import Path
    _prefix, _marker, _replace = os.environ["SLIMFORGE_CRASH_PREFIX"], os.environ["SLIMFORGE_CRASH_MARKER"], os.replace

    def _find(p):
        p = Path(p).absolute()
        return next((q for q in [p, *p.parents] if q.name.startswith(_prefix)), None)

    def replace(src, dst, *a, **k):
        hit = _find(dst) or _find(src)
        if hit is not None:
            Path(_marker).write_text(json.dumps({"temp": str(hit), "src": str(src), "dst": str(dst)}))
            while True:  # wait for the SIGKILL
                time.sleep(1)
        return _replace(src, dst, *a, **k)

    os.replace = replace
'''


def _outputs(stage: str) -> list[str]:
    """What DVC tracks for the stage (outs and metrics), relative to the workspace."""
    main = ["reports", "metrics/summary.csv"] if stage == "evaluate" else [f"artifacts/{stage}"]
    return [*main, f"metrics/{stage}.json"]


def _fingerprint(ws: Path) -> dict[str, str]:
    """Content hash of every output; reports by file list and the summary without its latency."""
    out = {}
    for stage in STAGES:
        for rel in _outputs(stage):
            p = ws / rel
            if rel == "reports":
                out[rel] = ",".join(sorted(f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file()))
            elif rel == "metrics/summary.csv":
                csv = pd.read_csv(p).drop(columns=list(TIMED)).to_csv(index=False)
                out[rel] = hashlib.sha256(csv.encode()).hexdigest()
            else:
                out[rel] = content_hash(p)
    return out


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _temps(ws: Path, stage: str) -> list[Path]:
    return [p for rel in _outputs(stage) for p in (ws / rel).parent.glob(f".{Path(rel).name}.*-*")]


def _forget_cached(ws: Path, stage: str) -> None:
    """Drop the stage's outputs from the DVC cache (and the run cache), so that `dvc repro` must
    rerun the stage rather than check its outputs out."""
    shutil.rmtree(ws / ".dvc/cache/runs", ignore_errors=True)
    for out in yaml.safe_load((ws / "dvc.lock").read_text())["stages"][stage]["outs"]:
        md5 = out.get("md5")
        if md5 and md5.endswith(".dir"):
            (ws / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()


def _changed(ws: Path) -> set[str]:
    """Stages DVC would rerun (an output only missing from the emptied cache does not count)."""
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        status = repo.status()
    return {name.rsplit(":", 1)[-1] for name, entries in status.items()
            if any(v != "not in cache" for e in entries if isinstance(e, dict) for c in e.values() for v in c.values())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_workspace, cli_env):
    from slimforge.config import dump_params, load_params

    root = tmp_path_factory.mktemp("crash")
    ws = make_workspace(root / "reference")
    (ws / "params.yaml").write_text(dump_params(load_params(ws / "params/tiny.yaml")))
    env = cli_env(root)
    _run([BIN / "dvc", "repro", "-q"], ws, env)
    (root / "inject").mkdir()
    (root / "inject/sitecustomize.py").write_text(INJECTOR)
    return root, ws, env, _fingerprint(ws)


def _kill_mid_write(ws: Path, stage: str, env: dict, inject: Path) -> dict:
    """`dvc repro <stage>` stopped inside its temp directory, then SIGKILLed; returns the marker."""
    marker = ws.parent / f"{stage}.marker"
    main = Path(_outputs(stage)[0]).name
    env = {**env, "SLIMFORGE_CRASH_PREFIX": f".{main}.tmp-", "SLIMFORGE_CRASH_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(inject), env.get("PYTHONPATH")]))}
    log = open(ws.parent / f"{stage}.killed.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([BIN / "dvc", "repro", stage], cwd=ws, env=env, stdout=log, stderr=log,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.is_file():
            assert proc.poll() is None, f"{stage} ended before the fault point: " + log.name
            assert time.monotonic() < deadline, f"{stage}: fault point not reached"
            time.sleep(0.01)
        time.sleep(0.05)  # the marker is written just before the process blocks
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    return json.loads(marker.read_text())


def _crash_and_recover(stage: str, root: Path, reference_ws: Path, env: dict, want: dict) -> None:
    ws = root / f"killed-{stage}"
    shutil.copytree(reference_ws, ws, symlinks=True)
    _forget_cached(ws, stage)
    for rel in _outputs(stage):
        shutil.rmtree(ws / rel) if (ws / rel).is_dir() else (ws / rel).unlink()

    hit = _kill_mid_write(ws, stage, env, root / "inject")
    temp = Path(hit["temp"])
    assert temp.parent.resolve() == (ws / _outputs(stage)[0]).parent.resolve(), hit
    assert temp.is_dir() and any(temp.iterdir()), f"{stage}: killed before writing into {temp}"
    partial = [rel for rel in _outputs(stage) if (ws / rel).exists()]
    assert not partial, f"{stage}: partial output visible after SIGKILL: {partial}"
    assert stage in _changed(ws), f"{stage}: DVC calls a killed stage up to date"

    log = _run([BIN / "dvc", "repro"], ws, env)
    ran = [s for s in STAGES if f"Running stage '{s}'" in log]
    assert ran == [stage], f"recovering {stage} reran {ran}: later stages saw a different artifact"
    assert _fingerprint(ws) == want, f"{stage}: recovered artifacts differ from the uninterrupted run"
    assert not _temps(ws, stage), f"{stage}: temp directories left after the rerun: {_temps(ws, stage)}"
    assert not _changed(ws)
    TABLE[stage] = {"faults": 1, "recovered": 1, "lost": 0, "partial": len(partial)}
    shutil.rmtree(ws, ignore_errors=True)


@pytest.mark.slow
def test_sigkill_mid_stage_recovers_to_identical_artifacts(reference):
    root, ws, env, want = reference
    with ThreadPoolExecutor(2) as pool:  # mostly process start-up: two at a time on 2 cores
        for job in [pool.submit(_crash_and_recover, s, root, ws, env, want) for s in STAGES]:
            job.result()
    rows = [f"| {s} | {r['faults']} | {r['recovered']} | {r['lost']} | {r['partial']} |" for s in STAGES if (r := TABLE.get(s))]
    print("\n| stage | faults injected | runs recovered | artifacts lost | partial outputs seen |\n"
          "|---|---|---|---|---|\n" + "\n".join(rows))
    assert set(TABLE) == set(STAGES)


def test_a_killed_writers_temp_dir_is_swept_and_a_live_ones_kept(tmp_path):
    from slimforge.artifacts import atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "artifacts" / "train"
    final.parent.mkdir(parents=True)
    stale = [final.parent / f".train.tmp-{dead.pid}-0badc0de", final.parent / f".train.old-{dead.pid}-0badc0de"]
    live = final.parent / f".train.tmp-{os.getpid()}-00000000"  # another writer, still running
    for d in [*stale, live]:
        (d / "half").mkdir(parents=True)
    with atomic_dir(final) as d:
        (d / "meta.json").write_text("{}")
    assert sorted(p.name for p in final.parent.iterdir()) == sorted([live.name, "train"])
