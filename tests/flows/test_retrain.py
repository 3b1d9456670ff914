"""The retrain flow, run twice on a changed dataset: the promotion gate decides both ways.

Run 1 trains on real digits (no champion yet: promoted). Run 2 trains on the same digits with
60% of the labels replaced by random ones: its accuracy falls far below the champion's, so it is
not promoted and the champion stays. Each run is ``retrain`` in a subprocess with Prefect's
ephemeral API, as a deployment's worker would run it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _dataset(path: Path, noisy_share: float) -> str:
    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)[:600]
    y = y.astype(np.int64)[:600]
    rng = np.random.default_rng(0)
    flip = rng.random(len(y)) < noisy_share
    y[flip] = rng.integers(0, 10, flip.sum())
    np.savez(path, x=x, y=y)
    return str(path)


def _retrain(ws: Path, env: dict, data: str) -> dict:
    code = ("import json, sys; from flows.retrain import retrain; "
            "print('RESULT=' + json.dumps(retrain(params_file='params/retrain.yaml', data_uri=sys.argv[1], "
            "workspace=sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, data, str(ws)], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"retrain failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")][-1]
    return json.loads(line.removeprefix("RESULT="))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, make_workspace, cli_env):
    tmp = tmp_path_factory.mktemp("retrain")
    ws = make_workspace(tmp / "ws")
    shutil.copytree(REPO / "flows", ws / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ws / "params" / "tiny.yaml").read_text())
    params["evaluate"]["promotion"] = {"artifact": "train", "max_accuracy_drop": 0.002}
    (ws / "params" / "retrain.yaml").write_text(yaml.safe_dump(params))
    env = cli_env(tmp)
    env["PYTHONPATH"] = str(ws)
    clean = _dataset(tmp / "digits-v1.npz", 0.0)
    noisy = _dataset(tmp / "digits-v2.npz", 0.6)
    first = _retrain(ws, env, clean)
    champion_after_first = (ws / "runs" / "champion.json").read_text()
    second = _retrain(ws, env, noisy)
    return ws, first, second, champion_after_first


def test_first_run_is_promoted_and_becomes_the_champion(two_runs):
    _, first, _, champion = two_runs
    assert first["promote"] is True, first["reason"]
    assert json.loads(champion)["candidate"]["artifact"] == "train"


def test_worse_data_is_not_promoted_and_the_champion_stays(two_runs):
    ws, _, second, champion = two_runs
    assert second["promote"] is False, second["reason"]
    assert "accuracy" in second["reason"]
    assert (ws / "runs" / "champion.json").read_text() == champion


def test_each_decision_is_recorded_with_its_data(two_runs):
    ws, first, _, _ = two_runs
    lines = [json.loads(ln) for ln in (ws / "runs" / "decisions.jsonl").read_text().splitlines()]
    assert [r["promote"] for r in lines] == [True, False]
    assert lines[0]["data"].endswith("digits-v1.npz") and lines[1]["data"].endswith("digits-v2.npz")
    assert "ingest" in lines[1]["stages_run"], "a new dataset must re-run the pipeline from ingest"
    assert first["pushed"] is None  # no DVC remote in this workspace
