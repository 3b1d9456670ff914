"""Concurrency: two runs in two workspaces do not touch each other; a second run on a busy
workspace stops with one clear line naming the workspace and the DVC lock, and leaves the
first run's artifacts as they were."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.repo import Repo

BIN = Path(sys.executable).parent
RUN = ["slimforge", "run", "--params", "params/tiny.yaml", "--until", "ingest"]


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "artifacts").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspaces(make_workspace, cli_env, tmp_path_factory):
    base = tmp_path_factory.mktemp("concurrency")
    return [make_workspace(base / name) for name in ("a", "b")], cli_env(base)


def test_two_workspaces_run_at_once_and_match_serial_runs(workspaces):
    (a, b), env = workspaces
    procs = [subprocess.Popen([BIN / RUN[0], *RUN[1:], "--set", f"ingest.seed={seed}"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for root, seed in ((a, 0), (b, 1))]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    ha, hb = _hashes(a), _hashes(b)
    assert ha and ha.keys() == hb.keys() and ha != hb  # different params, different artifacts
    serial = a.parent / "serial"
    subprocess.run(["cp", "-r", str(a), str(serial)], check=True)
    subprocess.run(["rm", "-rf", str(serial / "artifacts"), str(serial / "dvc.lock")], check=True)
    proc = subprocess.run([BIN / RUN[0], *RUN[1:], "--set", "ingest.seed=0"], cwd=serial, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {k: v for k, v in _hashes(serial).items() if not k.endswith("meta.json")}
    assert got == {k: v for k, v in ha.items() if not k.endswith("meta.json")}


def test_a_second_run_on_a_busy_workspace_stops_with_one_clear_line(workspaces):
    (a, _), env = workspaces
    before, params_before = _hashes(a), (a / "params.yaml").read_text()
    repo = Repo(str(a))
    repo.lock.lock()  # what a running `slimforge run` or `dvc repro` holds
    try:
        proc = subprocess.run([BIN / RUN[0], *RUN[1:], "--set", "ingest.seed=7"], cwd=a, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        repo.lock.unlock()
        repo.close()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]  # Prefect's own shutdown lines follow
    last = errors[0]
    assert last.startswith(f"error: workspace {a} is busy") and str(a / ".dvc/tmp/lock") in last, last
    assert _hashes(a) == before
    assert (a / "params.yaml").read_text() == params_before, "the refused run rewrote the holder's params.yaml"
    repro = subprocess.run([BIN / "dvc", "repro", "ingest"], cwd=a, env=env, capture_output=True, text=True,
                           timeout=300)
    assert repro.returncode == 0, repro.stderr
